"""The CPU fast paths against plain float64 maths: one-query attention, RMSNorm, oneDNN's GEMM."""

from __future__ import annotations

import pytest
import torch

from gemmakit.kernels import gemm
from gemmakit.kernels.build import kernel
from gemmakit.kernels.ops import decode_attention, rms_norm
from gemmakit.models.layers import RMSNorm, softcap



def _reference(q, k, v, mask, scale, cap):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1).double(), v.repeat_interleave(groups, dim=1).double()
    scores = softcap(q.double() @ k.transpose(-1, -2) * scale, cap).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("heads,kv_heads,head_dim,B,S", [(4, 1, 256, 3, 37), (8, 2, 24, 3, 37), (3, 3, 64, 3, 37),
                                                      (4, 1, 256, 1, 700), (2, 1, 20, 1, 333), (8, 1, 128, 2, 301),
                                                      (4, 2, 256, 1, 90), (3, 1, 64, 1, 50)])
@pytest.mark.parametrize("cap", [None, 50.0])
def test_decode_attention_matches_softmax_attention(heads, kv_heads, head_dim, B, S, cap) -> None:
    """One row and a long cache split the keys into chunks merged afterwards (flash-decoding).
    With AVX-512 a head_dim that is a multiple of 64 and 1, 2, 4 or 8 query heads per kv head take
    the all-heads-at-once loops; the rest (24, 20; 3 heads per kv head) the generic ones."""
    assert kernel() is not None
    g = torch.Generator().manual_seed(heads * head_dim + S)
    q = torch.randn(B, heads, 1, head_dim, generator=g)
    # a cache buffer longer than what is attended to: k/v are strided views, as cache.load returns
    k = torch.randn(B, kv_heads, S + 9, head_dim, generator=g)[:, :, :S]
    v = torch.randn(B, kv_heads, S + 9, head_dim, generator=g)[:, :, :S]
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.4
    mask[:, :, :, 0] = True  # every row sees at least one key
    if S > 300:
        mask[:, :, :, 1:S // 2 + 10] = False  # a whole chunk of keys hidden (a ring cache's unused slots)
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    scale = head_dim**-0.5
    out = decode_attention(q, k, v, bias, scale, cap)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert (out.double() - _reference(q, k, v, mask, scale, cap)).abs().max().item() < 1e-5


def test_decode_attention_declines_what_it_does_not_run() -> None:
    q = torch.randn(1, 2, 1, 16, dtype=torch.bfloat16)
    k = v = torch.randn(1, 1, 5, 16, dtype=torch.bfloat16)
    assert decode_attention(q, k, v, torch.zeros(1, 1, 1, 5), 0.25, None) is None


@pytest.mark.parametrize("offset", [1.0, 0.0])  # Gemma 1-3's weights stored as offsets from one; Gemma 4's
@pytest.mark.parametrize("shape", [(1, 1, 640), (2, 4, 1, 256), (3, 37, 24), (700, 640)])
def test_rms_norm_kernel_matches_the_formula(shape, offset) -> None:
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(shape, generator=g) * 3
    weight = torch.randn(shape[-1], generator=g)
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + weight.double())
    with torch.inference_mode():
        out = rms_norm(x, weight, 1e-6, offset)
    assert out is not None and out.shape == x.shape
    assert (out.double() - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    assert rms_norm(x, weight, 1e-6, offset) is None  # autograd on: torch's ops, never mixed with the kernel


@pytest.mark.parametrize("offset", [1.0, 0.0])
def test_rms_norm_module_uses_the_kernel_only_without_autograd(offset) -> None:
    norm = RMSNorm(64, offset=offset)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(5, 64)
    with torch.inference_mode():
        fast = norm(x)
    slow = norm(x)  # grad mode: the torch ops
    assert (fast - slow).abs().max().item() < 1e-5


@pytest.mark.parametrize("rows", [1, 31, 32, 512])
def test_gemm_linear_is_float32_exact_up_to_summation_order(rows) -> None:
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 640, generator=g), torch.randn(1536, 640, generator=g), torch.randn(1536, generator=g)
    ref = x.double() @ w.double().T + b.double()
    with torch.inference_mode():
        y = gemm.linear(x, w, b)
    # |error| of a 640-term float32 dot product: a few ulps of sqrt(640)-sized sums
    assert y.shape == (rows, 1536) and (y.double() - ref).abs().max().item() < 1e-3
    assert gemm.enabled() == (torch.backends.mkldnn.is_available())  # this CI's CPU wheel has oneDNN


def test_gemm_linear_keeps_autograd() -> None:
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    gemm.linear(x, w).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(64, 32), atol=1e-4)
    assert torch.allclose(w.grad, x.sum(0).expand(16, 32), atol=1e-4)


@pytest.mark.parametrize("with_norm,offset", [(True, 1.0), (True, 0.0), (False, 1.0)])
@pytest.mark.parametrize("B,H,T,D,rot", [(1, 4, 1, 256, 256), (2, 3, 5, 64, 64), (2, 2, 3, 32, 16)])
def test_norm_rope_matches_torch_ops(with_norm, offset, B, H, T, D, rot) -> None:
    """QK-norm + RoPE in one call against RMSNorm's and apply_rope's float64 maths, on a strided
    view of a projection's output (as attention hands it over) and with partial rotary tables."""
    from gemmakit.models.layers import apply_rope, norm_and_rope

    g = torch.Generator().manual_seed(B * H * T + D + rot)
    x = torch.randn(B, T, H, D, generator=g).transpose(1, 2)  # [B, H, T, D], not contiguous
    angles = torch.randn(B, 1, T, rot // 2, generator=g) * 10
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    norm = RMSNorm(D, eps=1e-6, offset=offset) if with_norm else None
    if norm is not None:
        norm.weight.data = torch.randn(D, generator=g) * 0.5
    with torch.no_grad():
        out = norm_and_rope(x, norm, cos, sin)
    xd = x.double()
    if norm is not None:
        xd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + norm.weight.double())
    expected = apply_rope(xd, cos.double(), sin.double())
    assert out.shape == x.shape and out.is_contiguous()
    assert (out.double() - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("rows,width", [(1, 2048), (3, 37), (512, 2048)])
def test_gelu_mul_matches_float64_gelu(rows, width) -> None:
    """GELU(tanh)(gate) * up as x / (1 + exp(-2u)) * up, on the two strided halves of one gate|up
    product as the MLP hands them over, against the tanh formula in float64."""
    from gemmakit.kernels.ops import gelu_mul

    g = torch.Generator().manual_seed(rows * width)
    gate, up = (torch.randn(rows, 2 * width, generator=g) * 4).split(width, dim=-1)
    x = gate.double()
    ref = 0.5 * x * (1 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x**3))) * up.double()
    with torch.inference_mode():
        out = gelu_mul(gate, up)
    assert out is not None and out.shape == gate.shape
    # a few float32 ulps of the product, measured against the largest entries
    assert (out.double() - ref).abs().max().item() < 4e-7 * ref.abs().max().item()
    # far tails: -> 0 for very negative inputs (no NaN from inf/inf), x for very positive ones
    tails = torch.tensor([[-1e4, -80.0, -12.0, 12.0, 80.0, 1e4]])
    with torch.inference_mode():
        t = gelu_mul(tails, torch.ones_like(tails))
    assert torch.isfinite(t).all() and t[0, :3].abs().max() < 1e-30 and torch.equal(t[0, 3:], tails[0, 3:])
    assert gelu_mul(gate, up) is None  # autograd on: torch's ops, never mixed with the kernel


def test_geglu_kernel_and_torch_ops_agree() -> None:
    from gemmakit.models.layers import GeGLU

    mlp = GeGLU(64, 96)
    x = torch.randn(7, 64)
    with torch.inference_mode():
        fast = mlp(x)
    slow = mlp(x)  # grad mode: F.gelu * up
    assert (fast - slow).abs().max().item() < 1e-5 * slow.abs().max().item()


@pytest.mark.parametrize("T,S,window,pad,ring", [(512, 512, None, 0, False), (300, 700, None, 0, False),
                                                 (700, 700, 256, 0, False), (400, 400, None, 37, False),
                                                 (100, 100, None, 0, False), (460, 972, 512, 0, True)])
def test_prefill_attention_in_query_blocks_matches_softmax_attention(T, S, window, pad, ring) -> None:
    """Prefill's blocked GEMM attention (each block of queries against only the keys it may see)
    against dense float64 softmax attention: causal, after cached keys, a sliding window, left
    padding (padding queries see every key), and a ring cache's keys (out of position order, with
    unused slots that no query sees, between keys that some do) ahead of the chunk's own."""
    from gemmakit.models.attention import Attention
    from gemmakit.models.masks import attention_mask
    from gemmakit.models.config import preset

    config = preset("gemma3-270m")
    att = Attention(config, config.layer_plan[0])
    g = torch.Generator().manual_seed(T + S + pad)
    q = torch.randn(1, 4, T, 256, generator=g)
    k, v = torch.randn(1, 1, S, 256, generator=g), torch.randn(1, 1, S, 256, generator=g)
    k_pos = torch.arange(S)[None] - pad
    k_pos[k_pos < 0] = -1
    q_pos = k_pos[:, S - T:].clone()
    if ring:  # the cached part as a ring: rotated, some slots never written
        cached = k_pos[:, :S - T].roll(137, dims=1)
        cached[:, 200:260] = -1
        k_pos = torch.cat([cached, q_pos], dim=1)
    mask = attention_mask(q_pos, k_pos, window)
    with torch.inference_mode():
        out = att._attend_gemm(q, k, v, mask)
    ref = _reference(q, k, v, mask, att.scale, None)
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_a_lock_left_by_an_interrupted_build_is_cleared_and_a_live_one_kept(tmp_path, monkeypatch):
    import os
    import time

    from gemmakit.kernels import build

    monkeypatch.setattr(build, "_build_directory", lambda: tmp_path)
    lock, obj = tmp_path / "lock", tmp_path / "rope.o"
    lock.touch()
    obj.touch()
    build._clear_stale_lock()  # a build writing files now: its lock stays
    assert lock.exists()
    old = time.time() - build.STALE_LOCK_SECONDS - 60
    for f in (lock, obj):
        os.utime(f, (old, old))
    build._clear_stale_lock()
    assert not lock.exists()
