"""Gemma 4's audio encoder: a USM-style Conformer that turns log-mel frames into soft tokens.

Log-mel features ``[N, frames, 128]`` (:mod:`gemmakit.audio.features`) pass through

  1. a subsampling projection: two 3x3 stride-2 convolutions over (time, frequency), each followed
     by a LayerNorm over channels and ReLU, then one linear layer on the flattened (frequency,
     channel) plane: four frames (40 ms) become one vector;
  2. Conformer blocks, each ``ffn/2 -> chunked self-attention -> light convolution -> ffn/2 -> norm``;
  3. a biased output projection, and the embedder (an RMSNorm without scale and a projection) into
     the text decoder's width.

The Conformer block (:class:`ConformerBlock`) is shared with Gemma 3n (models/gemma3n_audio.py),
whose encoder differs in the subsampler, a few attention constants and the window edges; the
knobs are the fields of :class:`ConformerConfig`.

Attention is local: the frames are cut into chunks of ``chunk_size`` queries, and each chunk reads
a context of ``chunk_size + past + future`` keys around it. Positions enter as Transformer-XL
relative terms: sinusoids of the relative distance, projected per head, added to the content logits
through the "relative shift" (appendix B of arXiv 1901.02860). Logits are soft-capped with tanh.
Padding frames (mask False) are never attended to; a padded clip's real frames come out as they
would alone, since every convolution on the way either zeroes padding first or looks only back.

"Clipped" linears clamp their input and output to ranges stored in the checkpoint (quantisation-
aware training left them there); the ranges are infinite when a checkpoint has none.

Sources:
  [g4]  transformers 5.23, models/gemma4/modeling_gemma4.py (Gemma4AudioModel, Gemma4AudioLayer,
        Gemma4AudioAttention, Gemma4AudioSubSampleConvProjection, Gemma4MultimodalEmbedder) and
        configuration_gemma4.py (Gemma4AudioConfig defaults)
  [mtmd] llama.cpp tools/mtmd/clip.cpp, the Gemma 4 audio projector's blocked attention mask
  [usm] "Google USM: Scaling Automatic Speech Recognition Beyond 100 Languages" (arXiv 2303.01037)
  [cf]  "Conformer: Convolution-augmented Transformer for Speech Recognition" (arXiv 2005.08100)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.errors import InvalidRequestError
from gemmakit.kernels.gemm import Linear
from gemmakit.models.layers import RMSNorm, unit_rms


@dataclass(frozen=True)
class ConformerConfig:
    """The Conformer stack of a USM audio encoder (Gemma 4 and Gemma 3n)."""

    hidden_size: int = 1024
    num_layers: int = 12
    num_heads: int = 8
    conv_kernel_size: int = 5  # the light convolution's depthwise kernel, causal
    residual_weight: float = 0.5  # each feed-forward adds this share of its output
    chunk_size: int = 12  # queries per attention chunk
    context_left: int = 13  # the context reaches back context_left - 1 frames
    context_right: int = 0
    logit_cap: float = 50.0
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10  # activations are clamped to +-this between sublayers
    # Where the two families differ:
    key_scale: float = math.log(1 + math.e) / math.log(2)  # Gemma 4 scales keys, Gemma 3n does not (1.0)
    # Gemma 4 attends to keys q-(left-2) .. q+(right-1) and its sinusoids run over context//2 .. 0
    # ([g4], and [mtmd] builds the same mask); Gemma 3n attends to q-(left-1) .. q+right and its
    # sinusoids run over left-1 .. -right.
    gemma4_window: bool = True
    masked_logit: float | None = -1e9  # None: the dtype's lowest value
    mask_conv_input: bool = False  # zero padding frames before the light convolution (Gemma 3n)
    clipped_linears: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def past(self) -> int:  # context frames before a chunk
        return max(0, self.context_left - 1)

    @property
    def context_size(self) -> int:  # keys each chunk reads
        return self.chunk_size + self.past + self.context_right

    def relative_positions(self) -> torch.Tensor:
        """The distances (query minus key) that get a sinusoid, largest first."""
        if self.gemma4_window:
            return torch.arange(self.context_size // 2, -1, -1)
        return torch.arange(self.past, -self.context_right - 1, -1)

    def window(self) -> tuple[int, int]:
        """How far back and ahead (inclusive) a query may look."""
        if self.gemma4_window:
            return self.past - 1, max(self.context_right - 1, 0)
        return self.past, self.context_right


@dataclass(frozen=True)
class Gemma4AudioConfig:
    """Gemma 4's audio tower and embedder; defaults are the published E2B/E4B numbers [g4]."""

    conformer: ConformerConfig = ConformerConfig()
    num_mel_bins: int = 128
    conv_channels: tuple[int, int] = (128, 32)
    output_size: int = 1536  # output_proj_dims: the width of the soft tokens before the embedder
    text_hidden_size: int = 1536  # the decoder's width, where the embedder projects to
    eps: float = 1e-6  # the subsampler's LayerNorms and the embedder's norm

    def replace(self, **changes: object) -> "Gemma4AudioConfig":
        return dataclasses.replace(self, **changes)

    @property
    def subsampled_bins(self) -> int:
        """Frequency bins after the two stride-2 convolutions (each rounds up)."""
        half = -(-self.num_mel_bins // 2)
        return -(-half // 2)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


class ClippedLinear(Linear):
    """A bias-free linear layer whose input and output are clamped to ranges from the checkpoint."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        for name, value in (("input_min", -math.inf), ("input_max", math.inf), ("output_min", -math.inf),
                            ("output_max", math.inf)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(x, self.input_min, self.input_max)
        return torch.clamp(super().forward(x), self.output_min, self.output_max)


def _linear(config: ConformerConfig, d_in: int, d_out: int) -> Linear:
    return ClippedLinear(d_in, d_out) if config.clipped_linears else Linear(d_in, d_out, bias=False)


class ConformerFeedForward(nn.Module):
    """``x + residual_weight * norm(down(silu(up(norm(x)))))``, with the activations clamped."""

    def __init__(self, config: ConformerConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.clip = config.gradient_clipping
        self.scale = config.residual_weight
        self.pre_norm = RMSNorm(d, offset=0.0)
        self.up = _linear(config, d, 4 * d)
        self.down = _linear(config, 4 * d, d)
        self.post_norm = RMSNorm(d, offset=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre_norm(torch.clamp(x, -self.clip, self.clip))
        h = self.down(F.silu(self.up(h)))
        return x + self.post_norm(torch.clamp(h, -self.clip, self.clip)) * self.scale


def timing_signal(positions: torch.Tensor, channels: int) -> torch.Tensor:
    """Sinusoids of ``positions`` ``[P]``: ``[P, channels]``, all sines then all cosines, with
    timescales from 1 to 10^4 spaced geometrically."""
    n = channels // 2
    inv = torch.exp(torch.arange(n, dtype=torch.float32) * -(math.log(1.0e4) / max(n - 1, 1)))  # [n]
    t = positions.to(torch.float32)[:, None] * inv[None, :]  # [P, n]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=-1)


class ChunkedAttention(nn.Module):
    """Local self-attention in chunks, with Transformer-XL relative position terms and soft-capping."""

    def __init__(self, config: ConformerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.q = _linear(config, d, d)
        self.k = _linear(config, d, d)
        self.v = _linear(config, d, d)
        self.out = _linear(config, d, d)
        self.rel_k = Linear(d, d, bias=False)  # projects the position sinusoids into per-head keys
        self.per_dim_scale = nn.Parameter(torch.zeros(config.head_dim))  # learned, through softplus
        self.register_buffer("positions", config.relative_positions(), persistent=False)
        self.register_buffer("allowed", self._window_mask(), persistent=False)

    def _window_mask(self) -> torch.Tensor:
        """``[chunk, context]``: which context slots each query of a chunk may read."""
        c = self.config
        w = torch.arange(c.chunk_size)[:, None]  # query offset in its chunk
        k = torch.arange(c.context_size)[None, :] - c.past  # key offset from the chunk's start
        back, ahead = c.window()
        return ((w - k) <= back) & ((k - w) <= ahead)

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...]`` -> ``[B, U, context, ...]``: each chunk's keys, zero outside ``[0, T)``."""
        c = self.config
        U = -(-x.shape[1] // c.chunk_size)
        pad = [0, 0] * (x.dim() - 2) + [c.past, U * c.chunk_size - x.shape[1] + c.context_right]
        x = F.pad(x, pad)
        return x.unfold(1, c.context_size, c.chunk_size).movedim(-1, 2)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        c = self.config
        B, T, D = x.shape
        H, hd, W, C = c.num_heads, c.head_dim, c.chunk_size, c.context_size
        U = -(-T // W)  # chunks
        # log(2) is softplus(0): a zero per_dim_scale leaves the usual 1/sqrt(head_dim).
        q_scale = hd**-0.5 / math.log(2)
        q = self.q(x).float().view(B, T, H, hd) * (q_scale * F.softplus(self.per_dim_scale))
        k = self.k(x).float().view(B, T, H, hd) * c.key_scale
        v = self.v(x).float().view(B, T, H, hd)
        q = F.pad(q, (0, 0, 0, 0, 0, U * W - T)).view(B, U, W, H, hd).permute(0, 3, 1, 2, 4)  # [B, H, U, W, hd]
        k = self._context(k).permute(0, 3, 1, 4, 2)  # [B, H, U, hd, C]
        v = self._context(v).permute(0, 3, 1, 2, 4)  # [B, H, U, C, hd]
        content = q @ k  # [B, H, U, W, C]

        # Relative terms: each query against every distance's projected sinusoid, then shifted so
        # that slot c of row w holds distance (w + past - c): padding each row to C + 1 and reading
        # the rows back C wide moves row w left by w.
        rel = self.rel_k(timing_signal(self.positions, D).to(x.dtype)).float().view(-1, H, hd)  # [P, H, hd]
        P = rel.shape[0]
        by_distance = q.reshape(B, H, U * W, hd) @ rel.permute(1, 2, 0)  # [B, H, U*W, P]
        by_distance = F.pad(by_distance.view(B, H, U, W, P), (0, C + 1 - P))
        position = by_distance.view(B, H, U, W * (C + 1))[..., : W * C].view(B, H, U, W, C)

        logits = softcap(content + position, c.logit_cap)
        keys_valid = self._context(valid.to(torch.uint8)).bool()  # [B, U, C], False outside the clip
        allowed = keys_valid[:, None, :, None, :] & self.allowed  # [B, 1, U, W, C]
        lowest = c.masked_logit if c.masked_logit is not None else torch.finfo(logits.dtype).min
        probs = torch.softmax(logits.masked_fill(~allowed, lowest), dim=-1)
        out = (probs @ v).permute(0, 2, 3, 1, 4).reshape(B, U * W, D)[:, :T]  # [B, T, D]
        return self.out(out.to(x.dtype))


class LightConv(nn.Module):
    """``x + out(silu(norm(causal_depthwise_conv(glu(in(norm(x)))))))``."""

    def __init__(self, config: ConformerConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.clip = config.gradient_clipping
        self.pre_norm = RMSNorm(d, eps=config.rms_norm_eps, offset=0.0)
        self.glu_in = _linear(config, d, 2 * d)
        self.depthwise = nn.Conv1d(d, d, config.conv_kernel_size, groups=d, bias=False)
        self.conv_norm = RMSNorm(d, eps=config.rms_norm_eps, offset=0.0)
        self.out = _linear(config, d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.glu_in(self.pre_norm(x)), dim=-1)  # [B, T, D]
        h = F.pad(h.transpose(1, 2), (self.depthwise.kernel_size[0] - 1, 0))  # causal: only past frames
        h = self.depthwise(h).transpose(1, 2)
        h = self.conv_norm(torch.clamp(h, -self.clip, self.clip))
        return x + self.out(F.silu(h))


class ConformerBlock(nn.Module):
    """``ffn/2 -> x + norm(attn(norm(x))) -> light conv -> ffn/2 -> norm`` [cf]."""

    def __init__(self, config: ConformerConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.clip = config.gradient_clipping
        self.mask_conv_input = config.mask_conv_input
        self.ffn_start = ConformerFeedForward(config)
        self.attn_pre_norm = RMSNorm(d, offset=0.0)
        self.attn = ChunkedAttention(config)
        self.attn_post_norm = RMSNorm(d, offset=0.0)
        self.conv = LightConv(config)
        self.ffn_end = ConformerFeedForward(config)
        self.out_norm = RMSNorm(d, offset=0.0)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.ffn_start(x)
        h = self.attn(self.attn_pre_norm(torch.clamp(x, -self.clip, self.clip)), valid)
        x = x + self.attn_post_norm(torch.clamp(h, -self.clip, self.clip))
        if self.mask_conv_input:
            x = x * valid[..., None].to(x.dtype)
        x = self.ffn_end(self.conv(x))
        return self.out_norm(torch.clamp(x, -self.clip, self.clip))


class Gemma4Subsampler(nn.Module):
    """Two 3x3 stride-2 convolutions (LayerNorm over channels, ReLU), then a linear layer:
    ``[B, T, mels]`` -> ``[B, ceil(T/4), hidden]``. Padding frames are zeroed before each convolution."""

    def __init__(self, config: Gemma4AudioConfig) -> None:
        super().__init__()
        c0, c1 = config.conv_channels
        self.eps = config.eps
        self.convs = nn.ModuleList([nn.Conv2d(1, c0, 3, stride=2, padding=1, bias=False),
                                    nn.Conv2d(c0, c1, 3, stride=2, padding=1, bias=False)])
        self.norms = nn.ParameterList([nn.Parameter(torch.ones(c0)), nn.Parameter(torch.ones(c1))])
        self.proj = Linear(config.subsampled_bins * c1, config.conformer.hidden_size, bias=False)

    def forward(self, features: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = features[:, None]  # [B, 1, T, mels]
        for conv, weight in zip(self.convs, self.norms):
            h = conv(h * valid[:, None, :, None].to(h.dtype))  # [B, C, T/2, F/2]
            h = F.layer_norm(h.permute(0, 2, 3, 1), (weight.shape[0],), weight, None, self.eps)
            h = torch.relu(h).permute(0, 3, 1, 2)
            valid = valid[:, ::2]
        B, _, T, _ = h.shape
        return self.proj(h.permute(0, 2, 3, 1).reshape(B, T, -1)), valid  # [B, T/4, hidden]


class Gemma4AudioEncoder(nn.Module):
    """``encoder(features [N, T, mels], mask [N, T])`` -> ``(hidden [N, T', output_size], mask [N, T'])``
    with ``T' = ceil(T / 4)``; the mask says which outputs come from real audio."""

    def __init__(self, config: Gemma4AudioConfig) -> None:
        super().__init__()
        self.config = config
        self.subsample = Gemma4Subsampler(config)
        self.layers = nn.ModuleList(ConformerBlock(config.conformer) for _ in range(config.conformer.num_layers))
        self.output_proj = Linear(config.conformer.hidden_size, config.output_size, bias=True)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        features, mask = check_features(features, mask, self.config.num_mel_bins)
        h, valid = self.subsample(features, mask)
        for layer in self.layers:
            h = layer(h, valid)
        return self.output_proj(h), valid


class Gemma4AudioEmbedder(nn.Module):
    """Soft tokens into the decoder's width: ``proj(x / rms(x))``."""

    def __init__(self, config: Gemma4AudioConfig) -> None:
        super().__init__()
        self.eps = config.eps
        self.proj = Linear(config.output_size, config.text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(unit_rms(x.float(), self.eps).to(x.dtype))


class Gemma4AudioTower(nn.Module):
    """Encoder and embedder: ``tower(features, mask)`` -> ``(tokens [N, T', text_hidden], mask [N, T'])``.

    A clip's soft tokens are ``tokens[i][mask[i]]`` (:func:`soft_tokens_per_clip`); the decoder
    gives each one an audio placeholder token of the prompt.
    """

    def __init__(self, config: Gemma4AudioConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Gemma4AudioEncoder(config)
        self.embedder = Gemma4AudioEmbedder(config)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, valid = self.encoder(features, mask)
        return self.embedder(hidden), valid


def soft_tokens_per_clip(tokens: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The real soft tokens of each clip of a padded batch: ``[n_i, width]`` each."""
    return [t[m] for t, m in zip(tokens, mask)]


def check_features(features: torch.Tensor, mask: torch.Tensor | None, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a batch of log-mel features; a missing mask means every frame is real."""
    if features.dim() != 3 or features.shape[-1] != bins:
        raise InvalidRequestError(f"audio features have shape {tuple(features.shape)}; expected [N, frames, {bins}]")
    if mask is None:
        mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    if tuple(mask.shape) != tuple(features.shape[:2]):
        raise InvalidRequestError(f"audio mask has shape {tuple(mask.shape)}; expected {tuple(features.shape[:2])}")
    return features, mask.to(torch.bool)
