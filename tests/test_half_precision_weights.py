"""bfloat16 / float16 checkpoints on the CPU keep their 16-bit matrices, with float32 compute.

By default (no ``dtype`` asked for) a safetensors directory's or a GGUF's 16-bit float matrices stay
as they are stored and run on the block kernel (kernels/csrc/ggml_matmul.cpp, types F16 and BF16):
half of float32's memory. Every 16-bit weight widens to float32 exactly, so the model is the float32
expansion's model; the checks here compare against that expansion (``dtype="float32"``) and against
transformers in float32 on the same files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gemmakit
from gemmakit.api import LoadOptions, load_model
from gemmakit.engine.generate import generate_steps
from gemmakit.quant.ggml import packable
from gemmakit.quant.grouped import GGMLWeight
from tiny import random_hf_model, random_model, tiny_config, write_gguf

IDS = torch.tensor([[2, 17, 99, 5, 30, 41, 7, 8, 9, 250, 3, 64]])


def _kept_types(model) -> set[int]:
    return {t for m in model.modules() if isinstance(m, GGMLWeight) for t in m.types}


def _weight_bytes(model) -> int:
    return sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())


def _greedy(model, n: int = 12) -> list[int]:
    return [s.tokens[0] for s in generate_steps(model, [IDS[0].tolist()], n)]


@pytest.fixture(scope="module")
def kernel_or_skip():
    from gemmakit.kernels.build import kernel

    if kernel() is None:
        pytest.skip("CPU kernel unavailable")


@pytest.mark.parametrize("dtype,ggml_type,name", [(torch.bfloat16, 30, "bfloat16"), (torch.float16, 1, "float16")])
def test_hf_half_precision_directory_keeps_its_weights(tmp_path, kernel_or_skip, dtype, ggml_type, name) -> None:
    from transformers import AutoModelForCausalLM

    random_hf_model("gemma3").to(dtype).save_pretrained(tmp_path / "hf")
    kept, _, kept_report = load_model(tmp_path / "hf")
    expanded, _, expanded_report = load_model(tmp_path / "hf", LoadOptions(dtype="float32"))
    assert kept_report.weights == f"{name} (float32 compute)" and expanded_report.weights == "float32"
    assert _kept_types(kept) == {ggml_type} and not _kept_types(expanded)
    # every projection and the tied embedding stay 16-bit: about half of float32's bytes
    assert _weight_bytes(kept) < 0.52 * _weight_bytes(expanded)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.inference_mode():
        got, ref, oracle = kept(IDS), expanded(IDS), hf(IDS).logits
    scale = oracle.abs().max().item()
    assert (got - ref).abs().max().item() <= 1e-5 * scale  # the same weights, summed in another order
    assert (got - oracle).abs().max().item() <= 1e-4 * max(1.0, scale)
    # decoding runs the kept weights through the one-token kernels and the fused step
    assert _greedy(kept) == _greedy(expanded)


@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_half_precision_gguf_keeps_its_weights(tmp_path, kernel_or_skip, qtype) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", random_model(tiny_config("gemma2"), seed=4), quant=qtype)
    kept, _ = gemmakit.load(path)
    expanded, _ = gemmakit.load(path, quant="none")
    assert _kept_types(kept) == {1 if qtype == "F16" else 30}
    with torch.inference_mode():
        got, ref = kept(IDS), expanded(IDS)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert _greedy(kept) == _greedy(expanded)


def test_which_matrices_can_stay_16_bit() -> None:
    assert packable(30, (64, 96)) and packable(1, (300, 64))
    assert not packable(30, (64, 48))  # rows must be a multiple of the kernel's 32 weights
    assert not packable(30, (64,)) and not packable(0, (64, 64))  # vectors, and float32 matrices
    assert packable(12, (64, 256))  # quantised types as before


@pytest.mark.parametrize("kind", ["paligemma", "gemma3"])
def test_vision_language_checkpoint_keeps_its_decoder_16_bit(tmp_path, kernel_or_skip, kind) -> None:
    """A bfloat16 PaliGemma / Gemma 3 directory: the language decoder's matrices stay 16-bit, the
    vision tower and projector are floats as before, and the logits over text and an image equal
    the float32 expansion's."""
    from test_vision import _hf_model, _inputs, _tokenizer

    torch.manual_seed(0)
    _hf_model(kind).to(torch.bfloat16).save_pretrained(tmp_path / "vlm")
    _tokenizer().save_pretrained(tmp_path / "vlm")
    kept, tokenizer = gemmakit.load(tmp_path / "vlm")
    expanded, _ = gemmakit.load(tmp_path / "vlm", dtype="float32")
    assert _kept_types(kept.decoder) == {30} and not _kept_types(kept.vision) and not _kept_types(expanded)
    ids, pixel_values = _inputs(kept, tokenizer, "what is this", 1)
    with torch.inference_mode():
        got, ref = kept(ids, pixel_values=pixel_values), expanded(ids, pixel_values=pixel_values)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_half_precision_model_products_of_few_rows(kernel_or_skip, dtype, rows) -> None:
    """A bfloat16/float16 model's decode-sized products (``--dtype bfloat16``) go through the block
    kernel's 16-bit path: float32 sums of the exact products, rounded once, as torch's are (so at
    most an ulp apart, from the order of the sums), with the bias added before that rounding."""
    from gemmakit.kernels import gemm

    g = torch.Generator().manual_seed(rows)
    w, x, b = (torch.randn(*s, generator=g).to(dtype) for s in ((300, 96), (2, rows, 96), (300,)))
    got = gemm.linear(x, w, b)
    ref = (x.float() @ w.float().T + b.float()).to(dtype)
    assert got.dtype == dtype and got.shape == (2, rows, 300)
    assert torch.allclose(got.float(), ref.float(), rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10, atol=0)
    assert (got != ref).float().mean().item() < 0.05  # mostly the very same numbers


def test_misshapen_16_bit_matrix_is_a_clear_error(tmp_path, kernel_or_skip) -> None:
    """A kept matrix is checked like an expanded one, and the error names the file's tensor."""
    from safetensors.torch import load_file, save_file

    from gemmakit.errors import CheckpointError

    random_hf_model("gemma3").to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = tensors[name].t().contiguous()
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {name} has shape"):
        gemmakit.load(tmp_path / "hf")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_kept_matrices_are_the_files_own_pages(tmp_path, kernel_or_skip) -> None:
    """Like a GGUF's blocks, the kept matrices are read in place from the safetensors file's memory
    map (safetensors maps the file; nothing on the way copies): a large checkpoint then never
    needs its size twice, and its pages are the page cache's, which the kernel can drop and read
    again."""
    random_hf_model("gemma3").to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    kept, _ = gemmakit.load(tmp_path / "hf")
    file = str((tmp_path / "hf" / "model.safetensors").resolve())
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == file:
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            spans.append((lo, hi))
    weights = [t for m in kept.modules() if isinstance(m, GGMLWeight) for t in m.parts()]
    assert spans and weights
    assert all(any(lo <= t.data_ptr() < hi for lo, hi in spans) for t in weights)


def test_bfloat16_gemma_pytorch_ckpt_keeps_its_weights(tmp_path, kernel_or_skip) -> None:
    """A gemma_pytorch ``.ckpt`` in bfloat16 (as published): its matrices, q/k/v as row ranges of
    the fused qkv tensor, stay 16-bit; logits equal the float32 expansion's and transformers'."""
    from tiny import write_ckpt

    hf = random_hf_model("gemma2").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    ckpt = write_ckpt(tmp_path / "model.ckpt", hf.state_dict(), freqs_cis=torch.ones(4, 2))
    config = gemmakit.load(tmp_path / "hf", quant="none")[0].config
    kept, _ = gemmakit.load(ckpt, config=config)
    expanded, _ = gemmakit.load(ckpt, config=config, dtype="float32")
    assert _kept_types(kept) == {30} and not _kept_types(expanded)
    with torch.inference_mode():
        got, ref, oracle = kept(IDS), expanded(IDS), hf.float()(IDS).logits
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert (got - oracle).abs().max().item() <= 1e-4 * max(1.0, oracle.abs().max().item())


def test_kept_model_is_not_exported_half_written(tmp_path, kernel_or_skip) -> None:
    """Writing a model whose matrices are kept as stored would miss them: refused in one line, and
    nothing is written; loaded with quant="none" it exports as before."""
    from gemmakit.errors import InvalidRequestError
    from gemmakit.train.export import save_hf_directory

    random_hf_model("gemma3").to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    kept, tokenizer = gemmakit.load(tmp_path / "hf")
    with pytest.raises(InvalidRequestError, match="quant='none'"):
        save_hf_directory(kept, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    expanded, tokenizer = gemmakit.load(tmp_path / "hf", quant="none")
    save_hf_directory(expanded, tokenizer, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_without_the_kernel_16_bit_checkpoints_expand_as_before(tmp_path, monkeypatch) -> None:
    """No built kernel (GEMMAKIT_KERNELS=0, no compiler): keeping 16-bit matrices would widen them
    on every product, so the default is the float32 expansion again."""
    from gemmakit.kernels import build as kernels

    random_hf_model("gemma3").to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    monkeypatch.setattr(kernels, "kernel", lambda: None)
    model, _, report = load_model(tmp_path / "hf")
    assert report.weights == "float32" and not _kept_types(model)
