"""A Gemma 3n GGUF file written by llama.cpp's own converter (tests/data/gguf_llamacpp/make.py) against
transformers' logits on the checkpoint it was converted from, recorded there.

The checkpoint's matrices were rounded to Q8_0's values before it was saved, so the Q8_0 file holds
exactly the weights transformers computed with.

llama.cpp's logits (on the file widened to F32, recorded there and computed live where
llama-cpp-python is installed) differ from transformers' by ~1.2 on this small, chaotic model,
through two numeric choices of llama.cpp's gemma3n graph: its gaussian top-k divides the variance
by N-1 (transformers by N), and its GELU reads a float16 table. gemmakit with those two choices
swapped in agrees with llama.cpp within 2e-2 (~8e-3 measured); a misread tensor or metadata key
moves the logits by their whole range (~3.5).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import gemmakit
from gemmakit.kernels import ops
from gemmakit.models import layers

DATA = Path(__file__).parent / "data" / "gguf_llamacpp"
FILE = DATA / "gemma3n-altup-laurel-ple.gguf"
RECORDED = json.loads((DATA / "gemma3n_logits.json").read_text())


@pytest.fixture(scope="module")
def dequantised():
    return gemmakit.load(FILE, quant="none")


def test_the_file_says_what_the_model_is(dequantised):
    model, _ = dequantised
    c = model.config
    assert (c.family, c.norm_offset, c.attention_scale, c.final_logit_softcap) == ("gemma3n", 0.0, 1.0, 30.0)
    assert (c.altup_inputs, c.laurel_rank, c.per_layer_input_dim, c.intermediate_size) == (4, 64, 256, 128)
    # the converter pads the 320-row PLE table with zero rows up to the 384-token vocabulary
    assert (c.vocab_size, c.per_layer_vocab_size) == (384, 320)
    assert c.activation_sparsity == (0.95,) * 10 + (0.0,) * 12
    assert c.num_kv_shared_layers == 2 and [p.kv_source for p in c.layer_plan][18:] == [18, 19, 18, 18]
    assert c.sliding_window == 8 and c.layer_kinds[:5] == ("local",) * 4 + ("global",)


@pytest.mark.parametrize("which", ["transformers", "transformers_beyond_ple"])
def test_logits_match_transformers(dequantised, which):
    model, _ = dequantised
    ids = RECORDED["ids" if which == "transformers" else "ids_beyond_ple"]
    if which == "transformers_beyond_ple":
        assert max(ids) >= model.config.per_layer_vocab_size  # they read the table's row 0, as in transformers
    got = model(torch.tensor([ids]))[0]
    assert (got - torch.tensor(RECORDED[which])).abs().max().item() <= 1e-4


def test_quantised_blocks_compute_the_same_model():
    """Loaded as it is stored (the file's Q8_0 blocks on the block kernel), the same model up to
    float32 rounding in another order, which this small random model amplifies to ~2e-4."""
    model, _ = gemmakit.load(FILE, prefill_dtype="float32", activations="float32")
    assert any(type(m).__name__ == "GroupedLinear" for m in model.modules())
    got = model(torch.tensor([RECORDED["ids"]]))[0]
    assert (got - torch.tensor(RECORDED["transformers"])).abs().max().item() <= 1e-3


def test_cached_greedy_equals_stepwise_full_forward(dequantised):
    from gemmakit.engine.generate import generate_steps

    model, _ = dequantised
    prompt = RECORDED["ids"][:12]  # longer than the window of 8
    produced = [s.tokens[0] for s in generate_steps(model, [prompt], 10)]
    seq = list(prompt)
    for _ in range(10):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert produced == seq[len(prompt):]


def test_converted_to_hf_transformers_computes_the_same(tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma3nForCausalLM"):
        pytest.skip("this transformers has no Gemma 3n")
    from gemmakit.convert import convert

    out = convert(FILE, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["vocab_size_per_layer_input"] == 320
    hf = transformers.Gemma3nForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        for key, which in (("ids", "transformers"), ("ids_beyond_ple", "transformers_beyond_ple")):
            got = hf(torch.tensor([RECORDED[key]])).logits[0]
            assert (got - torch.tensor(RECORDED[which])).abs().max().item() <= 1e-4


def test_tokenizer_matches_llama_cpp(dequantised):
    llama_cpp = pytest.importorskip("llama_cpp")
    _, tokenizer = dequantised
    llm = llama_cpp.Llama(model_path=str(FILE), n_ctx=64, verbose=False, n_threads=2, vocab_only=True)
    # (turn markers left out: this tiny vocabulary's are normal pieces, one of which llama.cpp
    # still treats as its end-of-turn token)
    for text in ["Hello world! The quick brown fox.", "  two  spaces\n\nand newlines\n", "ünïcödé 0123 {x}"]:
        assert tokenizer.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True)


def _make_module():
    spec = importlib.util.spec_from_file_location("gguf_llamacpp_make", DATA / "make.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    return make


@pytest.fixture
def llama_cpp_numerics(monkeypatch):
    """gemmakit's float32 path with llama.cpp's gaussian top-k (std over N-1) and its GELU (the
    float16 input looked up in a float16 table, 0 below -10 and the identity above 10)."""
    torch_gelu = torch.nn.functional.gelu

    def table_gelu(x, approximate="none"):
        y = torch_gelu(x.half().float(), approximate=approximate).half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))

    def top_k_n_minus_1(x, stds):
        mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True, correction=1)
        return torch.relu(x - (mean + std * stds))

    monkeypatch.setattr(torch.nn.functional, "gelu", table_gelu)
    monkeypatch.setattr(ops, "gelu_mul", lambda gate, up: None)
    monkeypatch.setattr(layers, "gaussian_top_k", top_k_n_minus_1)


def _worst_gap(model, reference) -> tuple[float, float]:
    ids = torch.tensor([RECORDED["ids"]])
    reference = torch.as_tensor(reference)
    return (model(ids)[0] - reference).abs().max().item(), reference.abs().max().item()


def test_logits_match_recorded_llama_cpp_with_its_numerics(dequantised, llama_cpp_numerics):
    gap, span = _worst_gap(dequantised[0], RECORDED["llama_cpp_f32"])
    assert span > 2.0 and gap <= 2e-2


def test_logits_match_llama_cpp_live_with_its_numerics(dequantised, tmp_path, llama_cpp_numerics):
    pytest.importorskip("llama_cpp")
    make = _make_module()
    make.float32_copy(FILE, tmp_path / "f32.gguf")
    live = make.llama_cpp_logits(tmp_path / "f32.gguf", RECORDED["ids"])
    gap, span = _worst_gap(dequantised[0], live)
    assert span > 2.0 and gap <= 2e-2
