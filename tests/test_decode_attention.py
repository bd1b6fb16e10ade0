"""The one-query attention kernel (decoding on the CPU) against torch's attention maths."""

from __future__ import annotations

import pytest
import torch

from gemmakit.models.layers import softcap
from gemmakit.quant.kernels import decode_attention, kernel


def _reference(q, k, v, mask, scale, cap):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1).double(), v.repeat_interleave(groups, dim=1).double()
    scores = softcap(q.double() @ k.transpose(-1, -2) * scale, cap).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 1, 256), (8, 2, 24), (3, 3, 64)])
@pytest.mark.parametrize("cap", [None, 50.0])
def test_decode_attention_matches_softmax_attention(heads, kv_heads, head_dim, cap) -> None:
    assert kernel() is not None
    g = torch.Generator().manual_seed(heads * head_dim)
    B, S = 3, 37
    q = torch.randn(B, heads, 1, head_dim, generator=g)
    # a cache buffer longer than what is attended to: k/v are strided views, as cache.load returns
    k = torch.randn(B, kv_heads, S + 9, head_dim, generator=g)[:, :, :S]
    v = torch.randn(B, kv_heads, S + 9, head_dim, generator=g)[:, :, :S]
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.4
    mask[:, :, :, 0] = True  # every row sees at least one key
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    scale = head_dim**-0.5
    out = decode_attention(q, k, v, bias, scale, cap)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert (out.double() - _reference(q, k, v, mask, scale, cap)).abs().max().item() < 1e-5


def test_decode_attention_declines_what_it_does_not_run() -> None:
    q = torch.randn(1, 2, 1, 16, dtype=torch.bfloat16)
    k = v = torch.randn(1, 1, 5, 16, dtype=torch.bfloat16)
    assert decode_attention(q, k, v, torch.zeros(1, 1, 1, 5), 0.25, None) is None
