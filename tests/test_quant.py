"""Weight-only int8 / int4 layers against the float path they replace.

Tolerances, and why:
- Quantisers: rounding to the nearest level leaves at most half a step per weight (exact property).
- Kernels: int8 runs on the grouped kernel in float32, so it equals a float32 matmul with the
  dequantised weight up to accumulation order (1e-5). The packed int4 kernel takes bfloat16
  activations and returns bfloat16, so it is compared with a float32 matmul of the same bf16 inputs
  and the same dequantised weight; the difference is bf16 output rounding plus accumulation order:
  a few parts in 1e3 of the output's scale.
- Whole model: int8 absmax per group of 32 on Gaussian-like weights gives a weight error of about
  absmax/127/sqrt(12) ~ 0.7% of the weights' RMS; through 7 layers the logits stay within a few %
  (bound 8%). int4 groups of 64 use 16 levels over ~5 sigma, a ~10%
  weight error (measured 44% relative logit L2 on this deliberately noisy 7-layer model, bound 60%);
  the int4 kernels themselves are checked tightly against dequantise-then-matmul above.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gemmakit.quant.grouped import GroupedEmbedding, GroupedLinear
from gemmakit.quant.kernels import dequantize_rows
from gemmakit.quant.linear import (
    Int4Linear, QuantTiedEmbedding, dequantize_int4, quantize_int4, quantize_int8_groups, quantize_model,
)
from tiny import random_model, tiny_config


def test_int8_quantiser_error_is_at_most_half_a_step():
    w = torch.randn(48, 64)
    packed = quantize_int8_groups(w)
    assert packed.codes.dtype == torch.int8 and packed.scale.shape == (48, 2) and packed.offset is None
    err = (dequantize_rows(*packed) - w).abs().reshape(48, 2, 32)
    assert (err <= packed.scale[..., None] / 2 + 1e-6).all()


def test_int4_quantiser_error_is_at_most_half_a_step():
    w = torch.randn(48, 128)
    q, scale, low = quantize_int4(w, 32)
    assert int(q.max()) <= 15 and int(q.min()) >= 0
    err = (dequantize_int4(q, scale, low, torch.float32) - w).abs().reshape(48, 4, 32)
    assert (err <= scale[..., None] / 2 + 1e-5).all()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_linear_equals_dequantised_matmul(rows):
    w, x = torch.randn(96, 64), torch.randn(rows, 3, 64)
    packed = quantize_int8_groups(w)
    out = GroupedLinear(packed)(x)
    ref = F.linear(x.double(), dequantize_rows(*packed).double())
    assert out.shape == (rows, 3, 96) and out.dtype == torch.float32
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("rows", [1, 5])
def test_int4_linear_equals_dequantised_matmul(rows):
    w, x = torch.randn(96, 128), torch.randn(rows, 2, 128).bfloat16()
    layer = Int4Linear(w, 32, torch.bfloat16)
    q, scale, low = quantize_int4(w, 32)
    # the kernel holds scales and zeros in bf16: dequantise with the same rounded values
    wref = dequantize_int4(q, scale.bfloat16(), (low + 8 * scale).bfloat16().float() - 8 * scale.bfloat16().float(),
                           torch.float32)
    ref = F.linear(x.float(), wref)
    out = layer(x)
    assert out.shape == (rows, 2, 96)
    assert (out.float() - ref).abs().max() <= 8e-3 * ref.abs().max()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quant_embedding_lookup_and_head_agree_with_its_own_rows(scheme):
    w = torch.randn(300, 64)
    if scheme == "int8":
        emb, dtype, tol = GroupedEmbedding(quantize_int8_groups(w), torch.float32), torch.float32, 1e-5
        step = (w.reshape(300, 2, 32).abs().amax(-1) / 127).amax(-1)
    else:
        # int4: the head's copy holds zero = low + 8 * scale in bf16, the rows' copy low itself: two roundings
        emb, dtype, tol = QuantTiedEmbedding(w, torch.bfloat16, group=32), torch.bfloat16, 2e-2
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


@pytest.mark.parametrize("scheme,bound", [("int8", 0.08), ("int4", 0.6)])
def test_quantised_model_logits_track_float_model(scheme, bound):
    model = random_model(tiny_config("gemma3"), seed=1).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(ids)
        qmodel = quantize_model(copy.deepcopy(model), scheme, group=32)
        out = qmodel(ids)
    dtype = torch.float32 if scheme == "int8" else torch.bfloat16  # int4's packed kernel wants bf16
    assert out.dtype == dtype and qmodel.dtype == dtype
    assert not any(isinstance(m, torch.nn.Linear) for m in qmodel.modules())
    rel = _rel(out, ref)
    assert rel < bound, rel
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= (0.75 if scheme == "int8" else 0.4), agree  # random logits are near-flat: many near-ties


@pytest.mark.parametrize("scheme,tol", [("int8", 1e-4), ("int4", 2e-2)])
def test_quantised_model_decodes_with_cache_like_full_forward(scheme, tol):
    """The cache path and the full forward agree to float32 (int8) or bf16 (int4) rounding: the
    kernels see other input shapes there and round differently."""
    model = quantize_model(random_model(tiny_config("gemma3"), seed=2).eval(), scheme, group=32)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 12)
        steps = [model(ids[:, :6], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(6, 12)]
    stepped = torch.cat(steps, dim=1)
    assert _rel(stepped, full) < tol
    assert cache.layers[0].keys.dtype == (torch.float32 if scheme == "int8" else torch.bfloat16)


def test_unknown_scheme_is_a_typed_error():
    from gemmakit.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        quantize_model(random_model(tiny_config("gemma3")), "int3")


@pytest.mark.parametrize("quant", ["Q5_0", "Q8_0"])
def test_int8_from_gguf_blocks_equals_int8_of_the_float_model(tmp_path, quant):
    """``load(gguf, quant="int8")`` requantises the file's blocks directly (no float copy of the
    model): the same codes and scales as quantising the dequantised float model, so the same logits."""
    import gemmakit
    from tiny import random_model, tiny_config, write_gguf

    config = tiny_config("gemma3", hidden_size=256, intermediate_size=512, num_layers=2)
    path = write_gguf(tmp_path / f"tiny-{quant}.gguf", random_model(config, seed=9), quant=quant)
    direct, _ = gemmakit.load(path, quant="int8")
    via_float, _ = gemmakit.load(path, quant="none")
    via_float = quantize_model(via_float, "int8")
    a, b = direct.state_dict(), via_float.state_dict()
    assert a.keys() == b.keys() and any(v.dtype == torch.int8 for v in a.values())
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids = torch.tensor([[2, 40, 41, 200, 7, 9]])
    with torch.inference_mode():
        assert torch.equal(direct(ids), via_float(ids))
