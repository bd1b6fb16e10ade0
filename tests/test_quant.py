"""Weight-only int8 / int4 layers against the float path they replace.

Tolerances, and why:
- Quantisers: rounding to the nearest level leaves at most half a step per weight (exact property;
  Q8_0 and Q4_1 store their scales (and minimum) in float16, which adds their rounding).
- Kernels: the CPU's int8 and int4 (Q8_0 and Q4_1 blocks) run on the block kernels in float32, so they equal
  a float32 matmul with the dequantised weight up to accumulation order (1e-5). The off-CPU int4
  layers dequantise and call F.linear: the same bound.
- Whole model: int8 absmax per group of 32 on Gaussian-like weights gives a weight error of about
  absmax/127/sqrt(12) ~ 0.7% of the weights' RMS; through 7 layers the logits stay within a few %
  (bound 8%). int4 (Q4_1: 16 levels over each group of 32's range) is a ~7% weight error; on this
  deliberately noisy 7-layer model the logits move by ~30% in relative L2 (bound 45%); the int4
  kernels themselves are checked tightly against dequantise-then-matmul above.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gemmakit.quant.grouped import GGMLWeight, GroupedEmbedding, GroupedLinear, dequantize_rows
from gemmakit.quant.ggml_ops import ggml_dequantize
from gemmakit.quant.linear import (
    Q4_1, Q8_0, Int4Linear, QuantTiedEmbedding, dequantize_int4, quantize_blocks, quantize_int4,
    quantize_int8_groups, quantize_model,
)
from tiny import random_model, tiny_config


def test_int8_quantiser_error_is_at_most_half_a_step():
    w = torch.randn(48, 64)
    packed = quantize_int8_groups(w)
    assert packed.codes.dtype == torch.int8 and packed.scale.shape == (48, 2) and packed.group == 32
    err = (dequantize_rows(*packed) - w).abs().reshape(48, 2, 32)
    assert (err <= packed.scale[..., None] / 2 + 1e-6).all()


def test_int4_quantiser_error_is_at_most_half_a_step():
    w = torch.randn(48, 128)
    q, scale, low = quantize_int4(w, 32)
    assert int(q.max()) <= 15 and int(q.min()) >= 0
    err = (dequantize_int4(q, scale, low, torch.float32) - w).abs().reshape(48, 4, 32)
    assert (err <= scale[..., None] / 2 + 1e-5).all()


def test_q8_0_quantiser_error_is_at_most_half_a_step():
    w = torch.randn(48, 128) * torch.rand(48, 1) * 3
    blocks = quantize_blocks(w, Q8_0)
    assert blocks.blocks.shape == (48, 4 * 34) and blocks.ggml_type == Q8_0
    err = (ggml_dequantize(blocks.blocks, Q8_0, 128) - w).abs().reshape(48, 4, 32)
    amax = w.reshape(48, 4, 32).abs().amax(-1)
    # the float16 scale: a relative 2^-11, times up to 127 levels
    assert (err <= (amax / 127 / 2 + 2.0**-11 * amax)[..., None] + 1e-6).all()


def test_q4_1_quantiser_error_is_at_most_half_a_step():
    w = torch.randn(48, 128) * torch.rand(48, 1) * 3
    blocks = quantize_blocks(w, Q4_1)
    assert blocks.blocks.shape == (48, 4 * 20) and blocks.ggml_type == Q4_1
    err = (ggml_dequantize(blocks.blocks, Q4_1, 128) - w).abs().reshape(48, 4, 32)
    g = w.reshape(48, 4, 32)
    step = (g.amax(-1) - g.amin(-1)) / 15
    # float16 scale and minimum: a relative 2^-11 each, the scale's times up to 15 levels
    slack = 2.0**-11 * (g.abs().amax(-1) + 15 * step)
    assert (err <= (step / 2 + slack)[..., None] + 1e-6).all()


@pytest.mark.parametrize("ggml_type", [Q4_1, Q8_0])
def test_kernel_quantiser_rounds_as_llama_cpp_s(ggml_type):
    """The kernel's Q4_1 and Q8_0 quantisers write gguf-py's bytes (its copy of llama.cpp's
    reference): on Gaussian rows of many scales and on edge groups (constant, all zero, levels
    exactly at .5)."""
    import gguf

    from gemmakit.kernels.build import kernel
    from gemmakit.quant.ggml_ops import ggml_quantize

    if kernel() is None:
        pytest.skip("no CPU kernel on this machine: gguf-py's quantiser is the one used")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 640, generator=g) * torch.rand(3000, 1, generator=g) * 3
    x[0, :32], x[1, 32:64], x[3] = 1.5, 0.0, -x[3].abs()
    x[2, :32] = torch.arange(32.0) / 31 * 15
    x[4, :32] = torch.tensor([0.0] * 31 + [15.0])
    x[5, :32] = torch.arange(32.0) % 16 + 0.5  # every Q4_1 code sits on a rounding boundary
    x[6, :32] = torch.arange(32.0) - 15.5  # Q8_0: absmax 16.5, so codes k * 127 / 16.5
    x[7, :32] = (torch.arange(32.0) - 16) * 127 / 16 + 0.5  # Q8_0 codes near .5 boundaries
    ours = ggml_quantize(x, ggml_type)
    theirs = torch.from_numpy(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType(ggml_type)))
    assert torch.equal(ours, theirs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("slab_rows", [4096, 40], ids=["one-slab", "three-slabs"])
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_linear_equals_dequantised_matmul(rows, slab_rows, monkeypatch):
    """The int8 layer used where the block kernel does not run, on all its slabs of output rows."""
    from gemmakit.quant import grouped

    monkeypatch.setattr(grouped, "_SLAB_ROWS", slab_rows)
    w, x = torch.randn(96, 64), torch.randn(rows, 3, 64)
    packed = quantize_int8_groups(w)
    out = GroupedLinear(packed)(x)
    ref = F.linear(x.double(), dequantize_rows(*packed).double())
    assert out.shape == (rows, 3, 96) and out.dtype == torch.float32
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("ggml_type", [Q4_1, Q8_0])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_block_linear_equals_dequantised_matmul(rows, ggml_type):
    w, x = torch.randn(96, 128), torch.randn(rows, 2, 128)
    blocks = quantize_blocks(w, ggml_type)
    out = GroupedLinear(blocks)(x)
    ref = F.linear(x.double(), ggml_dequantize(blocks.blocks, ggml_type, 128).double())
    assert out.shape == (rows, 2, 96) and out.dtype == torch.float32
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_off_cpu_int4_linear_equals_dequantised_matmul(dtype):
    """The layer used where the block kernel does not run (checked here on the CPU's tensors)."""
    w, x = torch.randn(96, 128), torch.randn(3, 2, 128).to(dtype)
    q, scale, low = quantize_int4(w, 32)
    out = Int4Linear(w, 32, dtype)(x)
    assert out.shape == (3, 2, 96) and out.dtype == dtype
    assert torch.equal(out, F.linear(x, dequantize_int4(q, scale.to(dtype), low.to(dtype), dtype)))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quant_embedding_lookup_and_head_agree_with_its_own_rows(scheme):
    w = torch.randn(300, 64)
    if scheme == "int8":
        emb, dtype, tol = GroupedEmbedding(quantize_int8_groups(w), torch.float32), torch.float32, 1e-5
        step = (w.reshape(300, 2, 32).abs().amax(-1) / 127).amax(-1)
    else:  # the off-CPU int4 embedding (the CPU's is Q4_1 blocks in a GroupedEmbedding)
        emb, dtype, tol = QuantTiedEmbedding(w, torch.float32, group=32), torch.float32, 1e-5
        step = (w.amax(1) - w.amin(1)) / 15
    ids = torch.tensor([[0, 5, 299], [7, 7, 1]])
    rows = emb(ids)
    assert rows.shape == (2, 3, 64) and rows.dtype == dtype
    assert ((rows.float() - w[ids]).abs() <= step[ids][..., None] / 2 + 1e-2 * w.abs().max()).all()
    # the head is the same matrix: logits of the full row table equal its Gram products
    h = torch.randn(4, 64).to(dtype)
    table = emb(torch.arange(300)[None])[0].float()
    ref = h.float() @ table.T
    assert (emb.project(h).float() - ref).abs().max() <= tol * ref.abs().max()
    assert emb.weight.dtype == dtype and emb.weight.numel() == 0


@pytest.mark.parametrize("scheme,bound", [("int8", 0.08), ("int4", 0.45)])
def test_quantised_model_logits_track_float_model(scheme, bound):
    model = random_model(tiny_config("gemma3"), seed=1).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(ids)
        qmodel = quantize_model(copy.deepcopy(model), scheme, group=32)
        out = qmodel(ids)
    assert out.dtype == torch.float32 and qmodel.dtype == torch.float32  # both on the CPU's block kernels
    assert not any(isinstance(m, torch.nn.Linear) for m in qmodel.modules())
    # every matrix, the tied embedding included, in Q8_0 / Q4_1 blocks
    weights = [m for m in qmodel.modules() if isinstance(m, GGMLWeight)]
    assert len(weights) == 1 + 4 * model.config.num_layers  # embedding; qkv, o, gate-up, down
    assert all(set(w.types) == {Q8_0 if scheme == "int8" else Q4_1} for w in weights)
    rel = _rel(out, ref)
    assert rel < bound, rel
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= (0.75 if scheme == "int8" else 0.4), agree  # random logits are near-flat: many near-ties


def test_int8_model_without_the_kernel_runs_on_grouped_codes(monkeypatch):
    """With no CPU kernel (or off the CPU) int8 is int8 codes + float32 scales, dequantised per
    matmul, q/k/v and gate/up stacked into one weight each: the same bounds as the block form."""
    from gemmakit.kernels import build
    from gemmakit.quant.grouped import GroupedWeight

    monkeypatch.setattr(build, "kernel", lambda: None)
    model = random_model(tiny_config("gemma3"), seed=1).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(ids)
        qmodel = quantize_model(copy.deepcopy(model), "int8")
        out = qmodel(ids)
        cache = qmodel.new_cache(2, 20)
        stepped = torch.cat([qmodel(ids[:, :10], cache=cache)]
                            + [qmodel(ids[:, i:i + 1], cache=cache) for i in range(10, 20)], dim=1)
    weights = [m for m in qmodel.modules() if isinstance(m, GroupedWeight)]
    assert len(weights) == 1 + 4 * model.config.num_layers  # embedding; stacked qkv, o, stacked gate-up, down
    assert not any(isinstance(m, (torch.nn.Linear, GGMLWeight)) for m in qmodel.modules())
    assert _rel(out, ref) < 0.08
    assert _rel(stepped, out) < 1e-4


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantised_model_decodes_with_cache_like_full_forward(scheme):
    """The cache path and the full forward agree to float32 rounding: the kernels see other input
    shapes there and round differently."""
    model = quantize_model(random_model(tiny_config("gemma3"), seed=2).eval(), scheme, group=32)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 12)
        steps = [model(ids[:, :6], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(6, 12)]
    stepped = torch.cat(steps, dim=1)
    assert _rel(stepped, full) < 1e-4
    assert cache.layers[0].keys.dtype == torch.float32


def test_unknown_scheme_is_a_typed_error():
    from gemmakit.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        quantize_model(random_model(tiny_config("gemma3")), "int3")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("quant", ["Q5_0", "Q8_0"])
def test_requantised_gguf_blocks_equal_quantising_the_float_model(tmp_path, quant, scheme):
    """``load(gguf, quant="int8" or "int4")`` requantises the file's blocks directly (no float copy
    of the model): the same codes and scales as quantising the dequantised float model, so the same
    logits."""
    import gemmakit
    from tiny import random_model, tiny_config, write_gguf

    config = tiny_config("gemma3", hidden_size=256, intermediate_size=512, num_layers=2)
    path = write_gguf(tmp_path / f"tiny-{quant}.gguf", random_model(config, seed=9), quant=quant)
    direct, _ = gemmakit.load(path, quant=scheme, activations="float32")  # quantize_model's default
    via_float, _ = gemmakit.load(path, quant="none")
    via_float = quantize_model(via_float, scheme)
    a, b = direct.state_dict(), via_float.state_dict()
    assert a.keys() == b.keys() and any(v.dtype == torch.uint8 for v in a.values())
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids = torch.tensor([[2, 40, 41, 200, 7, 9]])
    with torch.inference_mode():
        assert torch.equal(direct(ids), via_float(ids))
