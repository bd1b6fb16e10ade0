"""Gemma 3n's audio encoder: the USM Conformer of models/gemma4_audio.py behind its own subsampler.

What differs from Gemma 4 (the Conformer knobs are set by :class:`Gemma3nAudioConfig`):

  * the subsampler's two convolutions pad time on the future side only (``k - 1`` frames after,
    none before) and normalise with a *cumulative* group norm: mean and variance over (frequency,
    channel) of every frame up to the current one, so a frame never depends on later ones;
  * attention reads one more frame on each side of the window (``left - 1`` back, ``right`` ahead),
    scales no keys, and has no clip ranges on its linears; padding frames are zeroed before the light
    convolution;
  * after the Conformer only every ``reduction_factor``-th frame is kept (4: one token per 160 ms),
    padding outputs are set to zero, and there is no output projection;
  * the embedder has a small vocabulary of "hard" audio tokens next to the soft path, both
    RMS-normed, projected and RMS-normed again (without scale) into the decoder's width; the last
    hard token's embedding stands in for padding and pads every clip to ``soft_tokens`` (188).

transformers runs a padded batch as is, so a clip's last tokens there read the padding's features
through the future-side convolution padding; gemmakit zeroes padding frames before each of the two
convolutions, which makes every clip's tokens in a batch equal to those of the clip alone (and so
to transformers' result for the clip alone).

Sources:
  [g3n] transformers 5.23, models/gemma3n/modeling_gemma3n.py (Gemma3nAudioEncoder,
        Gemma3nAudioSubSampleConvProjection, Gemma3nAudioCumulativeGroupNorm,
        Gemma3nAudioConformerBlock, Gemma3nMultimodalEmbedder, Gemma3nModel.forward's audio merge)
        and configuration_gemma3n.py (Gemma3nAudioConfig defaults)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.kernels.gemm import Linear
from gemmakit.models.gemma4_audio import ConformerBlock, ConformerConfig, check_features
from gemmakit.models.layers import RMSNorm, unit_rms

GEMMA3N_CONFORMER = ConformerConfig(hidden_size=1536, key_scale=1.0, gemma4_window=False, masked_logit=None,
                                    mask_conv_input=True, clipped_linears=False)


@dataclass(frozen=True)
class Gemma3nAudioConfig:
    """Gemma 3n's audio tower and embedder; defaults are the published E2B/E4B numbers [g3n]."""

    conformer: ConformerConfig = GEMMA3N_CONFORMER
    num_mel_bins: int = 128
    conv_channels: tuple[int, int] = (128, 32)
    conv_kernels: tuple[tuple[int, int], ...] = ((3, 3), (3, 3))  # (time, frequency)
    conv_strides: tuple[tuple[int, int], ...] = ((2, 2), (2, 2))
    group_norm_eps: float = 1e-3
    reduction_factor: int = 4
    vocab_size: int = 128  # the embedder's hard audio tokens
    padding_index: int = 127  # the hard token whose embedding fills padding (the text vocabulary's last id)
    text_hidden_size: int = 2048
    eps: float = 1e-6
    soft_tokens: int = 188  # audio placeholders per clip in a prompt

    def replace(self, **changes: object) -> "Gemma3nAudioConfig":
        return dataclasses.replace(self, **changes)

    def conv_bins(self) -> list[int]:
        """Frequency bins after each convolution (padded by one bin each side)."""
        bins, out = self.num_mel_bins, []
        for (_, kf), (_, sf) in zip(self.conv_kernels, self.conv_strides):
            bins = (bins + 2 - kf) // sf + 1
            out.append(bins)
        return out


def cumulative_group_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` ``[B, T, F, C]`` normalised by the mean and variance over (F, C) of frames ``0..t``.

    The variance at ``t`` sums each earlier frame's squared distance from *its own* running mean,
    as the reference does; it is not the variance of frames ``0..t`` about today's mean.
    """
    x = x.float()
    per_frame = x[0, 0].numel()
    count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float32)[:, None, None] * per_frame
    mean = torch.cumsum(x.sum(dim=(2, 3), keepdim=True), dim=1) / count  # [B, T, 1, 1]
    var = torch.cumsum((x - mean).pow(2).sum(dim=(2, 3), keepdim=True), dim=1) / count
    return (x - mean) * torch.rsqrt(var + eps) * weight.float()


class Gemma3nSubsampler(nn.Module):
    """Two strided convolutions with cumulative group norm and ReLU, then a linear layer:
    ``[B, T, mels]`` -> ``[B, T / (s0 * s1), hidden]``."""

    def __init__(self, config: Gemma3nAudioConfig) -> None:
        super().__init__()
        self.config = config
        c0, c1 = config.conv_channels
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, k, stride=s, bias=False) for cin, cout, k, s in
                                   zip((1, c0), (c0, c1), config.conv_kernels, config.conv_strides))
        self.norms = nn.ParameterList([nn.Parameter(torch.ones(c0)), nn.Parameter(torch.ones(c1))])
        self.proj = Linear(config.conv_bins()[-1] * c1, config.conformer.hidden_size, bias=False)

    def forward(self, features: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = features[:, None]  # [B, 1, T, mels]
        for conv, weight in zip(self.convs, self.norms):
            kt, st = conv.kernel_size[0], conv.stride[0]
            h = h * valid[:, None, :, None].to(h.dtype)
            h = conv(F.pad(h, (1, 1, 0, kt - 1)))  # frequency: one bin each side; time: future side only
            h = cumulative_group_norm(h.permute(0, 2, 3, 1), weight, self.config.group_norm_eps).to(features.dtype)
            h = torch.relu(h).permute(0, 3, 1, 2)  # [B, C, T', F']
            valid = valid[:, ::st]
        B, _, T, _ = h.shape
        return self.proj(h.permute(0, 2, 3, 1).reshape(B, T, -1)), valid


class Gemma3nAudioEncoder(nn.Module):
    """``encoder(features [N, T, mels], mask [N, T])`` -> ``(hidden [N, T', hidden], mask [N, T'])``
    with ``T' = ceil(T / 16)`` for the published strides; padding outputs are zero."""

    def __init__(self, config: Gemma3nAudioConfig) -> None:
        super().__init__()
        self.config = config
        self.subsample = Gemma3nSubsampler(config)
        self.layers = nn.ModuleList(ConformerBlock(config.conformer) for _ in range(config.conformer.num_layers))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        features, mask = check_features(features, mask, self.config.num_mel_bins)
        h, valid = self.subsample(features, mask)
        for layer in self.layers:
            h = layer(h, valid)
        r = self.config.reduction_factor
        h, valid = h[:, ::r], valid[:, ::r]
        return h * valid[..., None].to(h.dtype), valid


class Gemma3nAudioEmbedder(nn.Module):
    """Hard audio tokens or soft tokens into the decoder's width: ``unit_rms(proj(norm(x)))``."""

    def __init__(self, config: Gemma3nAudioConfig) -> None:
        super().__init__()
        d = config.conformer.hidden_size
        self.eps = config.eps
        self.embedding = nn.Embedding(config.vocab_size, d)
        self.hard_norm = RMSNorm(d, eps=config.eps, offset=0.0)
        self.soft_norm = RMSNorm(d, eps=config.eps, offset=0.0)
        self.proj = Linear(d, config.text_hidden_size, bias=False)

    def forward(self, soft: torch.Tensor | None = None, hard_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``soft`` ``[..., hidden]`` encoder outputs, or ``hard_ids`` (indices into the audio vocabulary)."""
        x = self.soft_norm(soft) if soft is not None else self.hard_norm(self.embedding(hard_ids))
        return unit_rms(self.proj(x).float(), self.eps).to(x.dtype)


class Gemma3nAudioTower(nn.Module):
    """Encoder and embedder: ``tower(features, mask)`` -> ``(tokens [N, T', text_hidden], mask [N, T'])``,
    padding tokens replaced by the padding embedding; :meth:`prompt_tokens` pads them to 188."""

    def __init__(self, config: Gemma3nAudioConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Gemma3nAudioEncoder(config)
        self.embedder = Gemma3nAudioEmbedder(config)

    def padding_embedding(self) -> torch.Tensor:
        ids = torch.tensor([self.config.padding_index], device=self.embedder.embedding.weight.device)
        return self.embedder(hard_ids=ids)[0]  # [text_hidden]

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, valid = self.encoder(features, mask)
        tokens = self.embedder(soft=hidden)
        return torch.where(valid[..., None], tokens, self.padding_embedding().to(tokens.dtype)), valid

    def prompt_tokens(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, soft_tokens, text_hidden]``: what fills each clip's audio placeholders in a prompt."""
        tokens, _ = self(features, mask)
        extra = self.config.soft_tokens - tokens.shape[1]
        if extra < 0:
            tokens = tokens[:, : self.config.soft_tokens]
        elif extra > 0:
            pad = self.padding_embedding().to(tokens.dtype).expand(tokens.shape[0], extra, -1)
            tokens = torch.cat([tokens, pad], dim=1)
        return tokens
