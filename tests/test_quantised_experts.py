"""A Gemma 4 mixture's quantised expert tensors stay in their GGML blocks (quant/grouped.py
``GGMLExperts``): against the same file dequantised (``--quant none``), and against llama.cpp.

The files are llama.cpp's tiny Gemma 4 mixture widened so that its rows split into K-quant blocks
(tests/tiny.py ``gemma4_experts_gguf``): Q8_0 and Q4_0 written by gguf-py, so that most tests run
without llama.cpp, and Q4_K_M (Q4_K and Q6_K experts) requantised by llama.cpp itself where
llama-cpp-python is installed.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import gemmakit
from gemmakit.checkpoints.gguf_reader import open_gguf
from gemmakit.engine.generate import generate_steps
from gemmakit.kernels.gemm import bf16_supported
from gemmakit.quant.grouped import GGMLExperts
from gemmakit.quant.linear import quantize_model
from tiny import LLAMACPP_DATA, gemma4_experts_gguf, llama_cpp_quantize

IDS = [2] + np.random.RandomState(0).randint(6, 380, size=15).tolist()
LLAMA_CPP_NOISE = 2e-2  # llama.cpp's float16 GELU table (tests/test_gemma4_gguf.py)
QUANTISED = ["Q8_0", "Q4_0", "Q4_K_M"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("experts")
    out = {"F32": gemma4_experts_gguf(d / "f32.gguf")}
    out.update({q: gemma4_experts_gguf(d / f"{q}.gguf", quant=q) for q in ("Q8_0", "Q4_0")})
    if importlib.util.find_spec("llama_cpp") is not None:
        out["Q4_K_M"] = llama_cpp_quantize(out["F32"], d / "Q4_K_M.gguf")
    return out


@pytest.fixture(scope="module", params=QUANTISED)
def loaded(request, files):
    if request.param not in files:
        pytest.skip("llama-cpp-python is not installed (it writes the Q4_K_M file)")
    path = files[request.param]
    model, _ = gemmakit.load(path, activations="float32")  # the dequantised model's numerics
    dequantised, _ = gemmakit.load(path, quant="none")
    return path, model, dequantised


def _experts(model) -> list:
    return [layer.moe.experts for layer in model.layers]


def test_experts_stay_in_the_files_blocks(loaded):
    path, model, dequantised = loaded
    tensors = open_gguf(path).tensors
    for i, experts in enumerate(_experts(model)):
        for ours, theirs in (("gate_up_proj", "ffn_gate_up_exps"), ("down_proj", "ffn_down_exps")):
            stack, stored = getattr(experts, ours), tensors[f"blk.{i}.{theirs}.weight"]
            assert isinstance(stack, GGMLExperts) and stack.types == [stored.ggml_type]
            (blocks,) = stack.parts()
            assert blocks.dtype == torch.uint8 and blocks.numel() == stored.raw.nbytes
            assert torch.equal(blocks.reshape(-1), torch.from_numpy(np.array(stored.raw)))
    # no float matrices of experts anywhere in the model; --quant none expands them as before
    assert not any(t.is_floating_point() and t.dim() == 3 for t in model.state_dict().values())
    assert all(isinstance(e.gate_up_proj, torch.nn.Parameter) for e in _experts(dequantised))
    if path.name.startswith("Q4_K_M"):
        assert {t for e in _experts(model) for t in e.down_proj.types} == {12, 14}  # Q4_K and Q6_K, as llama.cpp chose


def test_logits_equal_the_dequantised_model(loaded):
    _, model, dequantised = loaded
    ids = torch.tensor([IDS])
    assert (model(ids) - dequantised(ids)).abs().max().item() < 1e-4
    # a prompt long enough that each expert takes a dequantised product (over 16 rows), in float32
    path = loaded[0]
    float32_prefill, _ = gemmakit.load(path, prefill_dtype="float32")
    long = torch.randint(6, 380, (2, 64), generator=torch.Generator().manual_seed(3))
    assert (float32_prefill(long) - dequantised(long)).abs().max().item() < 1e-4


def test_bfloat16_prefill_covers_the_experts(loaded):
    _, model, _ = loaded
    expected = torch.bfloat16 if bf16_supported() else torch.float32  # load's "auto"
    assert all(s.prefill_dtype == expected for e in _experts(model) for s in (e.gate_up_proj, e.down_proj))


def test_cached_greedy_equals_stepwise_full_forward(loaded):
    _, model, _ = loaded
    prompt = IDS[:12]  # longer than the window of 8
    produced = [s.tokens[0] for s in generate_steps(model, [prompt], 10)]
    seq = list(prompt)
    for _ in range(10):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert produced == seq[len(prompt):]


def _llama_cpp_logits(path, ids):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_batch=64, verbose=False, n_threads=2,
                          type_k=0, type_v=0)  # float32 K/V
    llm.eval(ids)
    return torch.tensor(np.asarray(llm.scores[:len(ids)], dtype=np.float32))


def test_logits_match_llama_cpp_on_the_same_weights(loaded, tmp_path):
    """llama.cpp on the file widened to F32 (its blocks dequantised by gguf-py) computes the weights
    gemmakit runs in place, without quantising its activations as its block products do."""
    spec = importlib.util.spec_from_file_location("make_gguf_llamacpp", LLAMACPP_DATA / "make.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    path, model, _ = loaded
    make.float32_copy(path, tmp_path / "widened.gguf")
    expected = _llama_cpp_logits(tmp_path / "widened.gguf", IDS)
    assert (model(torch.tensor([IDS]))[0] - expected).abs().max().item() < LLAMA_CPP_NOISE


def test_logits_track_llama_cpp_on_the_quantised_file(loaded, files):
    """On the quantised file itself llama.cpp rounds activations to 8 bits for each block product,
    which can also flip a near-tie in the router; still its logits are much closer to gemmakit's on
    the file than to the float model's (mean distances measured, gemmakit / float model: Q8_0 0.13 /
    0.25, Q4_0 0.05 / 0.50, Q4_K_M 0.06 / 0.35), and the greedy picks agree."""
    path, _, _ = loaded
    model, _ = gemmakit.load(path)  # the default activations: int8 where the CPU has AVX2
    expected = _llama_cpp_logits(path, IDS)
    float_model, _ = gemmakit.load(files["F32"])
    ids = torch.tensor([IDS])
    got = model(ids)[0]
    assert (got - expected).abs().mean() < 0.75 * (expected - float_model(ids)[0]).abs().mean()
    assert (got.argmax(-1) == expected.argmax(-1)).sum().item() >= len(IDS) - 2


def test_convert_dequantises_the_experts_and_info_reads_them(loaded, tmp_path):
    from gemmakit.convert import convert
    from gemmakit.info import describe

    path, _, dequantised = loaded
    out = convert(path, tmp_path / "hf")
    from_hf, _ = gemmakit.load(out)
    assert all(e.gate_up_proj.dtype == torch.float32 for e in _experts(from_hf))
    a, b = from_hf.state_dict(), dequantised.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    ids = torch.tensor([IDS])
    # The same weights; their expert matmuls may sum in another order where the layouts differ.
    torch.testing.assert_close(from_hf(ids), dequantised(ids), rtol=0, atol=1e-5)
    report = describe(str(path))
    assert report["experts"] == {"count": 8, "per_token": 2, "width": 256}
    assert report["file_bytes"] == path.stat().st_size


def test_requantised_experts_equal_quantising_the_dequantised_model(files):
    """``--quant int8`` from a quantised file requantises the expert blocks directly, to the bytes
    that quantising the dequantised float model gives."""
    direct, _ = gemmakit.load(files["Q4_0"], quant="int8", activations="float32")  # quantize_model's default
    via_float = quantize_model(gemmakit.load(files["Q4_0"], quant="none")[0], "int8")
    a, b = direct.state_dict(), via_float.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(s.types == [8] for e in _experts(direct) for s in (e.gate_up_proj, e.down_proj))  # Q8_0
    ids = torch.tensor([IDS])
    assert torch.equal(direct(ids), via_float(ids))


def test_int8_of_a_float_model_is_the_q8_0_files_experts(files):
    """A float file loaded with ``--quant int8`` holds its experts as Q8_0 blocks: byte for byte
    those gguf-py's quantiser wrote into the Q8_0 file of the same weights."""
    requantised, _ = gemmakit.load(files["F32"], quant="int8")
    stored, _ = gemmakit.load(files["Q8_0"])
    for a, b in zip(_experts(requantised), _experts(stored)):
        for name in ("gate_up_proj", "down_proj"):
            assert isinstance(getattr(a, name), GGMLExperts)
            assert torch.equal(getattr(a, name).parts()[0], getattr(b, name).parts()[0])


def test_a_bfloat16_directorys_experts_stay_16_bit(files, tmp_path):
    """A bfloat16 checkpoint's expert stacks run on the block kernel as BF16, widened exactly: the
    logits of the float32 expansion."""
    from gemmakit.convert import convert

    out = convert(files["F32"], tmp_path / "bf16", dtype=torch.bfloat16)
    kept, _ = gemmakit.load(out)
    widened, _ = gemmakit.load(out, dtype="float32")
    assert all(e.gate_up_proj.types == [30] for e in _experts(kept))  # GGML's BF16
    ids = torch.tensor([IDS])
    assert (kept(ids) - widened(ids)).abs().max().item() < 1e-4
