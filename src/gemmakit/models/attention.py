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
from gemmakit.models.layers import RMSNorm, norm_and_rope, softcap, unit_rms
from gemmakit.models.masks import StepContext, query_blocks_of


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, plan: LayerPlan) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = plan.num_kv_heads
        self.head_dim = plan.head_dim
        self.scale = config.attention_scale
        self.logit_softcap = config.attn_logit_softcap
        self.index, self.stores_kv = plan.index, plan.stores_kv
        self.shared_kv_key = plan.shared_kv_key if plan.reads_shared_kv else None
        self.v_norm_eps = config.rms_norm_eps if config.v_norm else None  # values get an RMSNorm without scale
        d, hd, eps = config.hidden_size, plan.head_dim, config.rms_norm_eps
        own_kv = not plan.reads_shared_kv  # a layer reading an earlier layer's keys/values has no k/v weights
        self.q_proj = Linear(d, config.num_heads * hd, bias=False)
        self.k_proj = Linear(d, plan.num_kv_heads * hd, bias=False) if own_kv else None
        self.v_proj = Linear(d, plan.num_kv_heads * hd, bias=False) if own_kv and not plan.k_eq_v else None
        self.o_proj = Linear(config.num_heads * hd, d, bias=config.attn_out_bias)
        self.q_norm = RMSNorm(hd, eps, config.norm_offset) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, eps, config.norm_offset) if config.qk_norm and own_kv else None
        self.qkv_proj: nn.Module | None = None  # set by fuse(): q, k and v in one matmul

    def projections_to_fuse(self) -> list[nn.Module] | None:
        """q, k and v while they are separate layers (``quant.grouped.unmerged_projections``):
        q, k and v, or q and k where the values are the keys' projection."""
        parts = [p for p in (self.q_proj, self.k_proj, self.v_proj) if p is not None]
        return None if self.qkv_proj is not None or len(parts) < 2 else parts

    def fuse(self, sizes: list[int], qkv: nn.Module) -> None:
        """Use one projection returning q|k|v (of ``sizes``) in place of the three
        (``fuse_projections``, ``fuse_dense_projections``)."""
        self.qkv_proj, self.qkv_sizes = qkv, sizes
        self.q_proj = self.k_proj = self.v_proj = None

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: LayerCache | None,
                last_row_only: bool = False, shared_kv: dict | None = None) -> torch.Tensor:
        """``x [B, T, hidden] -> [B, T, hidden]``; with ``last_row_only`` every row's keys and values
        still go to the cache but only the last row attends, returning ``[B, 1, hidden]`` (the final
        layer of a prefill whose logits are wanted for the last position only).

        ``shared_kv`` carries, within one forward step, the keys and values that layers storing
        them for later layers (``LayerPlan.stores_kv``) attended to, by layer index: a layer that
        reads shared keys/values attends to those, with the same mask, as its kind's step context
        is the same. A model whose layers read keys and values from outside (a Gemma 4 assistant)
        is handed them by kind, with a context whose mask covers them."""
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q, *kv = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, kv = self.q_proj(x), [p(x) for p in (self.k_proj, self.v_proj) if p is not None]
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        q = norm_and_rope(q, self.q_norm, ctx.cos, ctx.sin)
        if self.shared_kv_key is not None:
            k, v = shared_kv[self.shared_kv_key]
        else:
            k, v = self._keys_and_values(kv, B, T, ctx)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v, ctx)
            if self.stores_kv:
                shared_kv[self.index] = (k, v)
        out, mask = None, ctx.mask
        if last_row_only and T > 1:
            q, mask, T = q[:, :, -1:], mask[..., -1:, :], 1
            out = self._attend(q, k, v, mask)
        elif T == 1 and ctx.bias is not None:  # decoding on the CPU: the one-query kernel (kernels/ops.py)
            out = ops.decode_attention(q, k, v, ctx.bias, self.scale, self.logit_softcap)
        if out is None:
            out = self._attend(q, k, v, mask, ctx.write.attends_own_keys_causally, ctx)  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def _keys_and_values(self, kv: list[torch.Tensor], B: int, T: int,
                         ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's new keys (normed, rotated) and values (normed where the config says), both
        ``[B, Hkv, T, D]``, from the k (and v) projections' outputs."""
        k = kv[0].view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = k if len(kv) == 1 else kv[1].view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.v_norm_eps is not None:
            v = unit_rms(v.float(), self.v_norm_eps).to(v.dtype)
        return norm_and_rope(k, self.k_norm, ctx.cos, ctx.sin), v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                causal: bool = False, ctx: StepContext | None = None) -> torch.Tensor:
        if _gemm_attention_applies(q, k) and not (ctx is not None and ctx.write.sees_both_sides):
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
