"""Gemma 4's vision: its own ViT (not SigLIP) in front of the Gemma 4 decoder.

An image keeps its aspect ratio: the processor (gemmakit/vision/gemma4_preprocess.py) resizes it to
a patch grid whose sides are multiples of ``pooling_kernel_size`` and whose size fits a budget of
soft tokens (70, 140, 280, 560 or 1120, each ``kernel^2`` patches), and hands the encoder the
flattened 16x16 patches with their (x, y) grid positions, padded to the budget with position (-1, -1).
The encoder then runs, per image:

* a bias-free linear patch embedding of ``2 * (pixels - 0.5)`` (the processor leaves pixels in
  [0, 1]) plus a learnt position table per axis, ``table[0][x] + table[1][y]``;
* pre- and post-normed blocks like the decoder's: RMSNorm'd queries and keys, unscaled-RMSNorm'd
  values, attention scaled by 1 and 2-D RoPE (the first half of each head rotates with x, the
  second with y, each half as ordinary RoPE over its own ``head_dim / 2`` dims);
* a ``kernel x kernel`` average pool of the patch grid (one soft token per cell, row-major), scaled
  by sqrt(width) in float32, optionally standardised (``(h - std_bias) * std_scale``);
* the multimodal embedder: an RMSNorm without scale, then a bias-free projection to the text width.

Padding patches never take part (keys hidden, no soft token), so the encoder reads each image's real
patches alone. A video is its sampled frames, each encoded as an image into its own run of
``video_token_id`` placeholders. In the decoder each image's (or frame's) run of soft tokens
attends both ways, on sliding-window layers only (global layers stay causal):
:attr:`ModelConfig.group_layer_kinds`. The soft tokens are not scaled by sqrt(hidden); their
per-layer embeddings (PLE) read the pad token's row.

A checkpoint with an audio tower (models/gemma4_audio.py) also takes audio: each clip's soft tokens
(one per 40 ms) fill its run of ``audio_token_id`` placeholders between ``boa`` and ``eoa``. Audio
runs stay causal on every layer (transformers groups only image and video tokens) and, like the
image tokens, read the pad token's embedding row for PLE.

Sources: transformers 5.23 ``models/gemma4`` (modeling_gemma4.py: Gemma4VisionPatchEmbedder,
Gemma4VisionRotaryEmbedding, apply_multidimensional_rope, Gemma4VisionAttention / EncoderLayer,
Gemma4VisionPooler, Gemma4VisionModel, Gemma4MultimodalEmbedder, create_masks_for_vision_model,
Gemma4Model.forward and get_placeholder_mask; configuration_gemma4.py: Gemma4VisionConfig's defaults,
Gemma4Config's audio token ids; processing_gemma4.py: replace_audio_token, mm_token_type_ids).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.errors import InvalidRequestError
from gemmakit.kernels.gemm import Linear
from gemmakit.models.cache import KVCache
from gemmakit.models.config import ModelConfig
from gemmakit.models.decoder import GemmaModel
from gemmakit.models.gemma4_audio import Gemma4AudioConfig, Gemma4AudioTower, soft_tokens_per_clip
from gemmakit.models.layers import RMSNorm, unit_rms
from gemmakit.models.multimodal import ImagePrompt, MediaModel, WrapsTextConfig, run_groups

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)  # the processor's allowed max_soft_tokens


@dataclass(frozen=True)
class Gemma4VisionConfig:
    """Shape of Gemma 4's vision encoder (defaults: transformers' Gemma4VisionConfig)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 16
    num_heads: int = 12
    num_kv_heads: int = 12
    head_dim: int = 64
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024  # rows of each axis' position table
    pooling_kernel_size: int = 3
    rope_theta: float = 100.0
    rms_norm_eps: float = 1e-6
    use_clipped_linears: bool = False  # clamp each projection's input and output to stored bounds
    standardize: bool = False  # (h - std_bias) * std_scale after pooling
    num_channels: int = 3

    def __post_init__(self) -> None:
        if self.head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size**2

    def replace(self, **changes: object) -> "Gemma4VisionConfig":
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * hd
        layer = attn + 3 * d * f + 4 * d + (7 * 4 if self.use_clipped_linears else 0)  # 4 bounds per projection
        standardize = 2 * d if self.standardize else 0
        return self.patch_dim * d + 2 * self.position_embedding_size * d + self.num_layers * layer + standardize


@dataclass(frozen=True)
class UnifiedVisionConfig:
    """Gemma 4 12B's encoder-free image embedding (transformers' Gemma4UnifiedVisionConfig): every
    48-pixel patch (a 3x3 block of the 16-pixel ones) is one soft token, from a projection of its
    pixels and a factorised 2-D position table, with no attention between patches."""

    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120  # rows of the position table, per axis
    patch_size: int = 16
    pooling_kernel_size: int = 3  # patches merged per side into one soft token
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5  # torch's LayerNorm default, which transformers keeps
    num_channels: int = 3

    @property
    def hidden_size(self) -> int:  # what the multimodal embedder projects from
        return self.mm_embed_dim

    @property
    def patch_dim(self) -> int:
        return self.num_channels * (self.patch_size * self.pooling_kernel_size) ** 2

    def num_parameters(self) -> int:
        d = self.mm_embed_dim
        return 2 * self.patch_dim + self.patch_dim * d + d + 2 * d + 2 * self.mm_posemb_size * d + 2 * d


@dataclass(frozen=True)
class UnifiedAudioConfig:
    """Gemma 4 12B's audio: each frame of ``frame_samples`` raw 16 kHz samples is one soft token."""

    frame_samples: int = 640
    text_hidden_size: int = 3840
    rms_norm_eps: float = 1e-6


@dataclass(frozen=True)
class Gemma4MultimodalConfig(WrapsTextConfig):
    """A Gemma 4 decoder with its vision encoder, and how images enter the prompt."""

    text: ModelConfig
    vision: Gemma4VisionConfig | UnifiedVisionConfig
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int
    video_token_id: int | None = None
    pad_token_id: int = 0  # what the decoder's embeddings (and PLE) read at soft-token positions
    bidirectional_images: bool = True  # use_bidirectional_attention "vision" (else causal throughout)
    max_soft_tokens: int = 280  # the processor's default budget per image
    name: str = "custom"
    layout: str = "gemma4"
    audio: Gemma4AudioConfig | UnifiedAudioConfig | None = None  # None: a checkpoint without an audio tower
    audio_token_id: int | None = None
    boa_token_id: int | None = None
    eoa_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.max_soft_tokens not in SOFT_TOKEN_BUDGETS:
            raise ValueError(f"max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {self.max_soft_tokens}")

    def num_parameters(self) -> int:
        embedder = self.vision.hidden_size * self.text.hidden_size
        return self.text.num_parameters() + self.vision.num_parameters() + embedder


class ClippableLinear(nn.Module):
    """A bias-free projection whose input and output may be clamped to bounds stored with the weights."""

    def __init__(self, config: Gemma4VisionConfig, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = Linear(d_in, d_out, bias=False)
        self.clipped = config.use_clipped_linears
        if self.clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                bound = float("inf") if name.endswith("max") else -float("inf")
                setattr(self, name, nn.Parameter(torch.tensor(bound)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clipped:
            return self.linear(x)
        return self.linear(x.clamp(self.input_min, self.input_max)).clamp(self.output_min, self.output_max)


def axial_rope(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[P, head_dim]`` for patch positions ``[P, 2]`` (x, y): the first half of the head
    rotates with x, the second with y, each half with the frequencies of a ``head_dim / 2`` RoPE."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=positions.device) / half))
    angles = positions.float()[..., None] * inv_freq  # [P, 2, half / 2]
    ax, ay = angles[:, 0], angles[:, 1]
    angles = torch.cat([ax, ax, ay, ay], dim=-1)  # [P, head_dim]
    return angles.cos(), angles.sin()


def _rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """2-D RoPE on ``x [P, H, hd]``: ordinary rotate-half RoPE on each half of the head."""
    half = x.shape[-1] // 2
    out = []
    for part, c, s in ((x[..., :half], cos[:, None, :half], sin[:, None, :half]),
                       (x[..., half:], cos[:, None, half:], sin[:, None, half:])):
        a, b = part.chunk(2, dim=-1)
        out.append(part * c + torch.cat([-b, a], dim=-1) * s)
    return torch.cat(out, dim=-1)


class VisionAttention(nn.Module):
    """Full attention over one image's patches, scaled by 1 (the q/k norms take the place of 1/sqrt(d))."""

    def __init__(self, config: Gemma4VisionConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.eps = config.rms_norm_eps
        self.q_proj = ClippableLinear(config, d, config.num_heads * hd)
        self.k_proj = ClippableLinear(config, d, config.num_kv_heads * hd)
        self.v_proj = ClippableLinear(config, d, config.num_kv_heads * hd)
        self.o_proj = ClippableLinear(config, config.num_heads * hd, d)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps, offset=0.0)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps, offset=0.0)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        P = x.shape[0]
        q = _rotate_halves(self.q_norm(self.q_proj(x).view(P, self.num_heads, self.head_dim)), cos, sin)
        k = _rotate_halves(self.k_norm(self.k_proj(x).view(P, self.num_kv_heads, self.head_dim)), cos, sin)
        v = unit_rms(self.v_proj(x).view(P, self.num_kv_heads, self.head_dim).float(), self.eps).to(x.dtype)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, P, hd]
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=1.0)[0]  # [H, P, hd]
        return self.o_proj(out.transpose(0, 1).reshape(P, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: Gemma4VisionConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = ClippableLinear(config, d, f)
        self.up_proj = ClippableLinear(config, d, f)
        self.down_proj = ClippableLinear(config, f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class VisionLayer(nn.Module):
    """x + post_norm(attn(norm(x))), then x + post_norm(mlp(norm(x))), as the decoder's blocks."""

    def __init__(self, config: Gemma4VisionConfig) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = RMSNorm(d, eps, offset=0.0)
        self.post_attention_layernorm = RMSNorm(d, eps, offset=0.0)
        self.pre_feedforward_layernorm = RMSNorm(d, eps, offset=0.0)
        self.post_feedforward_layernorm = RMSNorm(d, eps, offset=0.0)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class PatchEmbedder(nn.Module):
    def __init__(self, config: Gemma4VisionConfig) -> None:
        super().__init__()
        self.input_proj = Linear(config.patch_dim, config.hidden_size, bias=False)
        # [2, rows, hidden]: one table for x, one for y
        self.position_embedding_table = nn.Parameter(torch.ones(2, config.position_embedding_size, config.hidden_size))

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows = self.position_embedding_table.shape[1]
        if int(positions.max()) >= rows:
            raise InvalidRequestError(f"a patch grid {int(positions.max()) + 1} patches long exceeds this encoder's "
                                      f"position table ({rows}); use a smaller soft-token budget")
        h = self.input_proj((2 * (patches - 0.5)).to(self.input_proj.weight.dtype))  # [P, hidden]
        return h + self.position_embedding_table[0][positions[:, 0]] + self.position_embedding_table[1][positions[:, 1]]


class Encoder(nn.Module):
    def __init__(self, config: Gemma4VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_layers))


class Gemma4VisionModel(nn.Module):
    """``model(pixel_values [N, P, patch_dim], positions [N, P, 2])`` -> one ``[tokens_i, hidden]``
    float32 tensor of pooled soft tokens per image (before the multimodal embedder)."""

    def __init__(self, config: Gemma4VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = Encoder(config)
        if config.standardize:
            self.std_bias = nn.Parameter(torch.zeros(config.hidden_size))
            self.std_scale = nn.Parameter(torch.ones(config.hidden_size))

    def encode_one(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One image's real patches ``[P, patch_dim]`` at grid positions ``[P, 2]`` -> ``[P / k^2, hidden]``."""
        c = self.config
        cos, sin = axial_rope(positions, c.head_dim, c.rope_theta)
        h = self.patch_embedder(patches, positions)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin)
        k = c.pooling_kernel_size
        width, height = int(positions[:, 0].max()) + 1, int(positions[:, 1].max()) + 1
        if width % k or height % k or width * height != positions.shape[0]:
            raise InvalidRequestError(f"a {width}x{height} patch grid with {positions.shape[0]} patches cannot be "
                                      f"pooled by {k}x{k}; preprocess images with gemmakit.vision.gemma4_preprocess")
        grid = h.new_zeros(height, width, h.shape[-1])
        grid[positions[:, 1], positions[:, 0]] = h
        pooled = F.avg_pool2d(grid.permute(2, 0, 1).float(), k, k)  # [hidden, height / k, width / k]
        pooled = pooled.flatten(1).t() * c.hidden_size**0.5  # [tokens, hidden], row-major cells, float32
        if c.standardize:
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        return pooled

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        c = self.config
        if (pixel_values.dim() != 3 or pixel_values.shape[-1] != c.patch_dim
                or positions.shape != (*pixel_values.shape[:2], 2)):
            raise InvalidRequestError(f"pixel_values {tuple(pixel_values.shape)} and positions "
                                      f"{tuple(positions.shape)} must be [N, P, {c.patch_dim}] and [N, P, 2]")
        out = []
        for patches, pos in zip(pixel_values, positions):
            real = (pos != -1).all(-1)  # padding patches are (-1, -1)
            out.append(self.encode_one(patches[real], pos[real].long()))
        return out


class MultimodalEmbedder(nn.Module):
    """Soft tokens into the decoder's width: RMSNorm without scale, then a bias-free projection."""

    def __init__(self, vision_width: int, text_width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.embedding_projection = Linear(vision_width, text_width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(unit_rms(x.float(), self.eps).to(self.embedding_projection.weight.dtype))


class PatchProjection(nn.Module):
    """The 12B's image embedding before the multimodal embedder: LayerNorm, a biased projection,
    LayerNorm, plus ``table[x, 0] + table[y, 1]``, LayerNorm; one token per real patch."""

    def __init__(self, config: UnifiedVisionConfig) -> None:
        super().__init__()
        self.config = config
        d, eps = config.mm_embed_dim, config.layer_norm_eps
        self.patch_ln1 = nn.LayerNorm(config.patch_dim, eps=eps)
        self.patch_dense = Linear(config.patch_dim, d)
        self.patch_ln2 = nn.LayerNorm(d, eps=eps)
        self.pos_embedding = nn.Parameter(torch.zeros(config.mm_posemb_size, 2, d))
        self.pos_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """``[tokens_i, mm_embed_dim]`` per image of padded patches ``[N, P, patch_dim]`` at ``positions [N, P, 2]``."""
        out = []
        for patches, pos in zip(pixel_values, positions):
            real = (pos != -1).all(-1)
            xy = pos[real].long()
            if xy.numel() and int(xy.max()) >= self.config.mm_posemb_size:
                raise InvalidRequestError(f"a patch position {int(xy.max())} is past the position table "
                                          f"({self.config.mm_posemb_size} per axis)")
            h = self.patch_ln2(self.patch_dense(self.patch_ln1(patches[real].to(self.patch_dense.weight.dtype))))
            out.append(self.pos_norm(h + self.pos_embedding[xy[:, 0], 0] + self.pos_embedding[xy[:, 1], 1]))
        return out


class FrameEmbedder(MultimodalEmbedder):
    """The 12B's audio "tower": each frame of raw samples, RMS-normed without scale and projected,
    is one soft token; ``tower(frames [A, T, samples], mask [A, T])`` -> ``(tokens, mask)``."""

    def __init__(self, config: UnifiedAudioConfig) -> None:
        super().__init__(config.frame_samples, config.text_hidden_size, config.rms_norm_eps)
        self.config = config

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = super().forward(frames)
        if mask is None:
            mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
        return tokens, mask


class Gemma4VisionLanguageModel(MediaModel):
    """``model(input_ids, pixel_values=..., image_positions=...)`` -> logits ``[B, T, vocab]``.

    ``input_ids`` hold each image's soft-token placeholders (``image_token_id``, as many as its
    pooled grid has cells) between ``boi`` and ``eoi``, in the order of ``pixel_values``; build them
    with :func:`gemmakit.vision.gemma4_preprocess.build_prompt`. Video frames go the same way as
    ``video_values`` / ``video_positions`` into the ``video_token_id`` placeholders
    (:func:`~gemmakit.vision.gemma4_preprocess.build_video_prompt`).
    """

    def __init__(self, config: Gemma4MultimodalConfig) -> None:
        super().__init__()
        self.config = config
        unified = isinstance(config.vision, UnifiedVisionConfig)  # the 12B: no encoder
        self.vision = PatchProjection(config.vision) if unified else Gemma4VisionModel(config.vision)
        self.embed_vision = MultimodalEmbedder(config.vision.hidden_size, config.text.hidden_size,
                                               config.vision.rms_norm_eps)
        self.decoder = GemmaModel(config.text)
        self.audio_tower = None
        if isinstance(config.audio, UnifiedAudioConfig):
            self.audio_tower = FrameEmbedder(config.audio)
        elif config.audio is not None:
            # built on the CPU even inside the loader's meta skeleton: the tower's attention windows and
            # relative positions are buffers made from the config, which no checkpoint holds
            with torch.device("cpu"):
                self.audio_tower = Gemma4AudioTower(config.audio)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return self.decoder.new_cache(batch, max_len)

    def image_features(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """Soft tokens ``[tokens_i, text hidden]`` per image, from the processor's padded patches."""
        return [self.embed_vision(t) for t in self.vision(pixel_values, positions)]

    def _splice(self, h: torch.Tensor, slots: torch.Tensor, pixels: torch.Tensor | None,
                positions: torch.Tensor | None, kind: str) -> torch.Tensor:
        """``h`` with the soft tokens of ``pixels`` (images, or video frames) written at ``slots``."""
        if pixels is None:
            if bool(slots.any()):
                raise InvalidRequestError(f"the prompt has {kind} tokens but no {kind} pixel values were given")
            return h
        if positions is None:
            raise InvalidRequestError(f"Gemma 4 {kind}s need their patch positions")
        features = torch.cat(self.image_features(pixels.to(self.device), positions.to(self.device)))
        if int(slots.sum()) != features.shape[0]:
            raise InvalidRequestError(f"{pixels.shape[0]} {kind}(s) make {features.shape[0]} soft tokens "
                                      f"but the prompt has {int(slots.sum())} {kind} tokens")
        return h.masked_scatter(slots[..., None], features.to(h.dtype))

    def soft_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._group_token_mask(input_ids) | self.audio_slots(input_ids)

    def prompt_groups(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        return self.attention_groups(input_ids, 0)

    def _group_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Image and video placeholders: the tokens that attend in groups."""
        mask = input_ids == self.config.image_token_id
        if self.config.video_token_id is not None:
            mask |= input_ids == self.config.video_token_id
        return mask

    def audio_tokens(self, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return torch.cat(soft_tokens_per_clip(*self.audio_tower(features, mask)))  # each clip's real tokens

    def attention_groups(self, input_ids: torch.Tensor, start: int) -> torch.Tensor | None:
        """Per-token group ids ``[B, T]`` (-1 = causal): one group per run of soft tokens, whose id
        is the timeline column where the run starts (unique across calls and images)."""
        if not self.config.bidirectional_images:
            return None
        return run_groups(self._group_token_mask(input_ids), start)

    def embed_media(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                    image_positions: torch.Tensor | None = None, video_values: torch.Tensor | None = None,
                    video_positions: torch.Tensor | None = None, audio_features: torch.Tensor | None = None,
                    audio_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(decoder ids, input embeddings [B, T, hidden])``: the media's soft tokens at their
        placeholders, whose ids become the pad token's (what the per-layer embeddings read there)."""
        audio = self.audio_slots(input_ids)
        text_ids = torch.where(self._group_token_mask(input_ids) | audio, self.config.pad_token_id, input_ids)
        h = self.decoder.embed_tokens(text_ids)  # [B, T, hidden]
        h = self._splice(h, input_ids == self.config.image_token_id, pixel_values, image_positions, "image")
        if self.config.video_token_id is not None:
            h = self._splice(h, input_ids == self.config.video_token_id, video_values, video_positions, "video")
        return text_ids, self._splice_audio(h, audio, audio_features, audio_mask)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        pixel_values: torch.Tensor | None = None,  # [N, P, patch_dim], N = images in the whole batch
        image_positions: torch.Tensor | None = None,  # [N, P, 2] (x, y); (-1, -1) = padding patch
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,  # [B, T], from 0; -1 marks left padding
        last_only: bool = False,
        video_values: torch.Tensor | None = None,  # [F, P, patch_dim]: every video's frames, in order
        video_positions: torch.Tensor | None = None,  # [F, P, 2]
        audio_features: torch.Tensor | None = None,  # [A, frames, mel bins]: every clip, in prompt order
        audio_mask: torch.Tensor | None = None,  # [A, frames], True = a real frame
    ) -> torch.Tensor:
        text_ids, h = self.embed_media(input_ids, pixel_values, image_positions, video_values, video_positions,
                                       audio_features, audio_mask)
        start = cache.length if cache is not None else 0
        groups = self.attention_groups(input_ids, start)
        # PLE reads the pad token's row at soft-token positions, its projection the spliced embeddings
        return self.decoder(text_ids, cache=cache, positions=positions, last_only=last_only, inputs_embeds=h,
                            groups=groups)


class Gemma4ImagePrompt(ImagePrompt):
    """:class:`~gemmakit.models.multimodal.ImagePrompt` for Gemma 4: binds the patches and their
    positions to the prefill (one call, so every image's group is whole); decode steps are text."""

    def __init__(self, model: Gemma4VisionLanguageModel, pixel_values: torch.Tensor | None,
                 image_positions: torch.Tensor | None, audio_features: torch.Tensor | None = None,
                 audio_mask: torch.Tensor | None = None, video_values: torch.Tensor | None = None,
                 video_positions: torch.Tensor | None = None) -> None:
        super().__init__(model, pixel_values, audio_features, audio_mask)
        self.image_positions = image_positions
        self.video_values, self.video_positions = video_values, video_positions

    def __call__(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                 positions: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        if self._prefilled:
            return self.decode_text(input_ids, cache, positions, last_only)
        self._prefilled = True
        return self.model(input_ids, self.pixel_values, self.image_positions, cache=cache, positions=positions,
                          last_only=last_only, video_values=self.video_values, video_positions=self.video_positions,
                          audio_features=self.audio_features, audio_mask=self.audio_mask)

    def embed_prompt(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.embed_media(input_ids, self.pixel_values, self.image_positions, self.video_values,
                                      self.video_positions, self.audio_features, self.audio_mask)
