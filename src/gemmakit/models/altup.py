"""AltUp (alternating updates, Gemma 3n): a residual stream ``S`` times wider at little cost.

The model carries ``S`` streams of the hidden width; only stream 0 (the active one) runs through a
layer's attention and MLP. Around each layer, :class:`AltUp` first *predicts* every stream as a
mix of all of them (coefficients chosen per token by a small router on the active stream), then,
once the layer has transformed the active prediction, *corrects* every stream by a routed share of
the layer's change to it. :class:`AltUpStreams` makes the extra streams from the token embedding at
the start and folds them back into one before the final norm.

Stream tensors are ``[S, B, T, hidden]``, stream 0 first (as the reference lays them out, so the
coefficient products run in the same order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.kernels.gemm import Linear
from gemmakit.models.config import ModelConfig
from gemmakit.models.layers import RMSNorm


class AltUp(nn.Module):
    """One layer's predict and correct steps."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, S = config.hidden_size, config.altup_inputs
        self.streams, self.clip = S, config.altup_coef_clip
        self.router_norm = RMSNorm(d, config.rms_norm_eps, config.norm_offset)
        self.router = Linear(d, S, bias=False)
        self.router_scale = 1.0 / d  # keeps the router's input small whatever the width (exact for powers of 2)
        self.predict_coefs = Linear(S, S * S, bias=False)
        self.correct_coefs = Linear(S, S, bias=False)
        # multiplies the corrected active stream before it gates the per-layer embedding (DecoderBlock)
        self.output_scale = nn.Parameter(torch.zeros(d))

    def _route(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token mixing weights in (-1, 1): ``[B, T, hidden] -> [B, T, S]``."""
        routed = self.router(self.router_norm(x) * self.router_scale)
        return torch.tanh(routed.float()).type_as(x)

    def _mix(self, coefficients: nn.Module, routed: torch.Tensor) -> torch.Tensor:
        # Training keeps the coefficient matrices within +-clip, as the reference trained them (it
        # clamps them in place; a clamped copy gives the same forward pass). At inference the
        # stored values are used as they are, as in transformers, through the module itself
        # (which may hold a quantised weight).
        if self.training and self.clip is not None:
            return F.linear(routed, coefficients.weight.clamp(-self.clip, self.clip))
        return coefficients(routed)

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        """``[S, B, T, hidden]``: each stream plus a routed mix of all of them."""
        S = self.streams
        mix = self._mix(self.predict_coefs, self._route(streams[0]))  # [B, T, S*S]
        mix = mix.unflatten(-1, (S, S)).transpose(-1, -2)  # [B, T, from, to]
        predicted = torch.matmul(streams.permute(1, 2, 3, 0), mix).permute(3, 0, 1, 2)
        return (predicted + streams).contiguous()

    def correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        """Every stream moved by its routed share (1 + coefficient) of the layer's change to the
        active one: ``activated [B, T, hidden]`` is the layer's output for ``predictions[0]``."""
        shares = self._mix(self.correct_coefs, self._route(activated)) + 1.0  # [B, T, S]
        change = activated - predictions[0]
        return (change * shares.permute(2, 0, 1).unsqueeze(-1) + predictions).contiguous()

    def scaled_active(self, streams: torch.Tensor) -> torch.Tensor:
        return (streams[0].type_as(self.output_scale) * self.output_scale).type_as(streams)


class AltUpStreams(nn.Module):
    """The extra streams in (from the embedding) and out (into the final norm), each a learnt
    square projection rescaled to stream 0's root-mean-square magnitude."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, S = config.hidden_size, config.altup_inputs
        self.expand = nn.ModuleList(Linear(d, d, bias=False) for _ in range(S - 1))
        self.collapse = nn.ModuleList(Linear(d, d, bias=False) for _ in range(S - 1))

    def spread(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, T, hidden] -> [S, B, T, hidden]``: the embedding, then its projections."""
        target = _rms(h)
        return torch.stack([h, *(_rescaled(p(h), target) for p in self.expand)])

    def merge(self, streams: torch.Tensor) -> torch.Tensor:
        """``[S, B, T, hidden] -> [B, T, hidden]``: the mean of stream 0 and the other streams'
        projections back."""
        target = _rms(streams[0])
        out = [streams[0], *(_rescaled(p(s), target) for p, s in zip(self.collapse, streams[1:]))]
        return torch.stack(out).mean(0)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.mean(x**2, dim=-1, keepdim=True) ** 0.5


def _rescaled(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # the floor on the mean square keeps an all-zero projection from dividing by zero
    return x * target / torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))
