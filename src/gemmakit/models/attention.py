"""Multi-head attention with grouped KV heads, for global and sliding-window layers.

A layer does not know whether it is "global" or "local" beyond which :class:`StepContext` it is
handed (models/masks.py): the context carries the rotary tables, the mask and where to write into
the cache (a ``CacheWrite``, models/cache_writes.py), all computed once per forward step by the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.kernels import gemm, ops
from gemmakit.kernels.gemm import Linear
from gemmakit.models.cache import LayerCache
from gemmakit.models.config import LayerPlan, ModelConfig
from gemmakit.models.layers import RMSNorm, norm_and_rope, softcap
from gemmakit.models.masks import StepContext, query_blocks_of


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, plan: LayerPlan) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = plan.num_kv_heads
        self.head_dim = plan.head_dim
        self.scale = config.attention_scale
        self.logit_softcap = config.attn_logit_softcap
        d, hd = config.hidden_size, plan.head_dim
        self.q_proj = Linear(d, config.num_heads * hd, bias=False)
        self.k_proj = Linear(d, plan.num_kv_heads * hd, bias=False)
        self.v_proj = Linear(d, plan.num_kv_heads * hd, bias=False)
        self.o_proj = Linear(config.num_heads * hd, d, bias=config.attn_out_bias)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None
        self.qkv_proj: nn.Module | None = None  # set by fuse(): q, k and v in one matmul

    def projections_to_fuse(self) -> list[nn.Module] | None:
        """q, k and v while they are separate layers (``quant.grouped.unmerged_projections``)."""
        return None if self.qkv_proj is not None else [self.q_proj, self.k_proj, self.v_proj]

    def fuse(self, sizes: list[int], qkv: nn.Module) -> None:
        """Use one projection returning q|k|v (of ``sizes``) in place of the three
        (``fuse_projections``, ``fuse_dense_projections``)."""
        self.qkv_proj, self.qkv_sizes = qkv, sizes
        self.q_proj = self.k_proj = self.v_proj = None

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: LayerCache | None,
                last_row_only: bool = False) -> torch.Tensor:
        """``x [B, T, hidden] -> [B, T, hidden]``; with ``last_row_only`` every row's keys and values
        still go to the cache but only the last row attends, returning ``[B, 1, hidden]`` (the final
        layer of a prefill whose logits are wanted for the last position only)."""
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = norm_and_rope(q, self.q_norm, ctx.cos, ctx.sin), norm_and_rope(k, self.k_norm, ctx.cos, ctx.sin)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v, ctx)
        out, mask = None, ctx.mask
        if last_row_only and T > 1:
            q, mask, T = q[:, :, -1:], mask[..., -1:, :], 1
            out = self._attend(q, k, v, mask)
        elif T == 1 and ctx.bias is not None:  # decoding on the CPU: the one-query kernel (kernels/ops.py)
            out = ops.decode_attention(q, k, v, ctx.bias, self.scale, self.logit_softcap)
        if out is None:
            out = self._attend(q, k, v, mask, ctx.write.attends_own_keys_causally, ctx)  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                causal: bool = False, ctx: StepContext | None = None) -> torch.Tensor:
        if _gemm_attention_applies(q, k):
            return self._attend_gemm(q, k, v, mask, ctx)
        if self.logit_softcap is None:
            gqa = self.num_heads != self.num_kv_heads
            if causal:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        # Soft-capping sits between the scores and the softmax, which SDPA cannot express.
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = softcap(torch.matmul(q, k.transpose(-1, -2)) * self.scale, self.logit_softcap)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)

    def _attend_gemm(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     ctx: StepContext | None = None) -> torch.Tensor:
        """Many queries on the CPU in float32 (prefill): scores and outputs as two oneDNN GEMMs per
        KV head, the query heads sharing it stacked as rows. It ran ~2x faster than SDPA's CPU
        kernel on Gemma 3 270M's 512-token prefill (oneDNN's GEMM runs near the CPU's peak; the
        flash kernel far below it). Queries go in blocks, each against only the span of keys its
        rows may see and masked only where some of its rows may not (:func:`query_blocks_of`), so
        the causal mask's hidden half is mostly skipped rather than computed and thrown away; the
        keys left out had softmax weight exactly 0."""
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        # [B, T, H, D] storage, returned as a [B, H, T, D] view: the output projection's
        # transpose(1, 2).reshape then needs no copy
        out = q.new_empty(B, T, H, D).transpose(1, 2)
        for b in range(B):
            blocks = ctx.query_blocks(b) if ctx is not None else query_blocks_of(mask[b, 0])
            for r0, r1, c0, c1, m0, m1 in blocks:
                rows, cols = r1 - r0, c1 - c0
                hidden = ~mask[b, :, r0:r1, m0:m1] if m1 > m0 else None
                for h in range(Hkv):
                    heads = slice(h * G, (h + 1) * G)
                    scores = gemm.linear((q[b, heads, r0:r1] * self.scale).reshape(G * rows, D), k[b, h, c0:c1])
                    scores = softcap(scores, self.logit_softcap).view(G, rows, cols)
                    if hidden is not None:
                        scores[:, :, m0 - c0:m1 - c0].masked_fill_(hidden, float("-inf"))
                    probs = torch.softmax(scores, dim=-1).view(G * rows, cols)
                    out[b, heads, r0:r1] = gemm.linear(probs, v[b, h, c0:c1].t()).view(G, rows, D)
        return out


_GEMM_ATTENTION_BYTES = 64 << 20  # the scores of one KV head's queries must fit in this


def _gemm_attention_applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    H, T, S = q.shape[1], q.shape[2], k.shape[2]
    return (q.device.type == "cpu" and q.dtype == torch.float32 and T >= gemm.MIN_ROWS and gemm.enabled()
            and not (torch.is_grad_enabled() and q.requires_grad)
            and (H // k.shape[1]) * T * S * 4 <= _GEMM_ATTENTION_BYTES)
