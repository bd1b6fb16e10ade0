"""The one Gemma decoder: embedding, N residual blocks of per-layer kinds, final norm, tied head.

Gemma 1, Gemma 2 and Gemma 3 are all this module; :class:`~gemmakit.models.config.ModelConfig`
decides which layers are global or local, whether post-norms and QK-norms exist, the soft-caps
and the RoPE settings. Nothing here branches on a model name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.models.attention import Attention, StepContext, attention_mask
from gemmakit.models.cache import KVCache
from gemmakit.models.config import ModelConfig
from gemmakit.models.layers import GeGLU, RMSNorm, rope_cos_sin, softcap


class DecoderBlock(nn.Module):
    """pre-norm -> attention -> (post-norm) -> residual; pre-norm -> GeGLU -> (post-norm) -> residual."""

    def __init__(self, config: ModelConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        eps = config.rms_norm_eps
        self.attn_norm = RMSNorm(config.hidden_size, eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.hidden_size, eps) if config.post_norms else nn.Identity()
        self.mlp_norm = RMSNorm(config.hidden_size, eps)
        self.mlp = GeGLU(config.hidden_size, config.intermediate_size)
        self.post_mlp_norm = RMSNorm(config.hidden_size, eps) if config.post_norms else nn.Identity()

    def forward(self, h: torch.Tensor, ctx: StepContext, cache) -> torch.Tensor:
        h = h + self.post_attn_norm(self.attn(self.attn_norm(h), ctx, cache))
        return h + self.post_mlp_norm(self.mlp(self.mlp_norm(h)))


class GemmaModel(nn.Module):
    """A Gemma causal language model. ``model(ids)`` returns logits ``[B, T, vocab]``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config, kind) for kind in config.layer_kinds)
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,  # [B, T]; -1 marks left padding
        last_only: bool = False,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        if cache is not None:
            cache.check_room(T)
        h = self.embed(input_ids)
        h = h * torch.tensor(self.config.hidden_size**0.5, dtype=h.dtype)  # normaliser in compute dtype
        contexts = self._contexts(positions, cache, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, contexts[layer.kind], cache.layers[i] if cache is not None else None)
        if cache is not None:
            self._advance(cache, positions)
        if last_only:
            h = h[:, -1:]
        h = self.final_norm(h)
        head = getattr(self.embed, "project", None)  # a quantised tied embedding brings its own head matmul
        logits = head(h) if head is not None else F.linear(h, self.embed.weight)
        return softcap(logits, self.config.final_logit_softcap)

    def _contexts(self, positions: torch.Tensor, cache: KVCache | None, dtype: torch.dtype) -> dict[str, StepContext]:
        """Rotary tables and masks for each layer kind, built once per step."""
        c = self.config
        kinds = set(c.layer_kinds)
        out: dict[str, StepContext] = {}
        if "global" in kinds:
            cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_scaling_factor, dtype)
            if cache is None:
                k_pos = positions
            else:
                cache.global_positions[:, cache.length:cache.length + positions.shape[1]] = positions
                k_pos = cache.global_positions[:, :cache.length + positions.shape[1]]
            out["global"] = StepContext(cos, sin, attention_mask(positions, k_pos, None), ring=False,
                                        cache_start=cache.length if cache is not None else 0)
        if "local" in kinds:
            cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_local_theta, 1.0, dtype)
            if cache is None:
                out["local"] = StepContext(cos, sin, attention_mask(positions, positions, c.sliding_window), ring=True)
            else:
                k_pos = torch.cat([cache.ring_positions, positions], dim=1)
                slots, skip = cache.ring_slots(positions.shape[1])
                out["local"] = StepContext(cos, sin, attention_mask(positions, k_pos, c.sliding_window), ring=True,
                                           ring_slots=slots, ring_skip=skip)
        return out

    @staticmethod
    def _advance(cache: KVCache, positions: torch.Tensor) -> None:
        slots, skip = cache.ring_slots(positions.shape[1])
        cache.ring_positions[:, slots] = positions[:, skip:]
        cache.length += positions.shape[1]
