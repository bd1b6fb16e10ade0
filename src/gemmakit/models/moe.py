"""Gemma 4's mixture-of-experts FFN (26B-A4B): a router picks ``experts_per_token`` of
``num_experts`` GeGLU experts per token, beside the dense MLP every layer keeps.

Only the chosen experts run: the tokens' picks are sorted by expert, so each expert that some
token chose multiplies its tokens' rows in one matmul; the others are never touched. A quantised
GGUF's experts stay in its blocks (quant/grouped.py ``GGMLExperts``), each product reading only
its expert's rows: 26B-A4B's dequantised to bfloat16 would be ~50 GB, about three times a Q4_K_M file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.kernels.gemm import Linear
from gemmakit.models.config import ModelConfig
from gemmakit.models.layers import RMSNorm, unit_rms
from gemmakit.quant.grouped import GGMLExperts


class Router(nn.Module):
    """Scores the experts from the unit-RMS-normed input scaled by a learnt vector and
    ``hidden ** -0.5``; keeps the top ``k`` softmax probabilities, renormalised to sum to one,
    each multiplied by its expert's learnt scale."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.eps, self.k = config.rms_norm_eps, config.experts_per_token
        self.root = config.hidden_size ** -0.5
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.proj = Linear(config.hidden_size, config.num_experts, bias=False)
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, hidden]`` -> weights ``[N, k]`` (float32) and expert indices ``[N, k]``."""
        h = unit_rms(x.float(), self.eps).to(x.dtype) * self.scale * self.root
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, self.k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


class Experts(nn.Module):
    """``num_experts`` GeGLU MLPs stored as stacked matrices: ``gate_up [E, 2I, hidden]`` (gate
    rows first) and ``down [E, hidden, I]``, as transformers keeps them; either may be a
    :class:`GGMLExperts` of the same shape instead (a quantised checkpoint's, or ``--quant``'s)."""

    expert_stacks = ("gate_up_proj", "down_proj")  # what quant/grouped.py's install may keep as blocks

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, d, i = config.num_experts, config.hidden_size, config.expert_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
                prompt: bool = False) -> torch.Tensor:
        """``x [N, hidden]``, each row sent to the experts ``index [N, k]`` with ``weights [N, k]``
        -> the weighted sum of their outputs ``[N, hidden]``. ``prompt``: the rows are a prompt's
        (block weights may then multiply in their ``prefill_dtype``)."""
        k = index.shape[1]
        picks = index.reshape(-1)
        order = torch.argsort(picks, stable=True)  # the picks grouped by expert
        rows = order // k  # the token of each pick
        counts = torch.bincount(picks).tolist()
        chosen = x[rows]
        out = torch.empty_like(chosen)
        start = 0
        for expert, n in enumerate(counts):
            if n:
                gate, up = _product(self.gate_up_proj, expert, chosen[start:start + n], prompt).chunk(2, dim=-1)
                out[start:start + n] = _product(self.down_proj, expert, F.gelu(gate, approximate="tanh") * up, prompt)
                start += n
        out = (out * weights.reshape(-1)[order, None]).to(x.dtype)  # weighed in float32, as the reference
        return torch.zeros_like(x).index_add_(0, rows, out)


def _product(w: torch.Tensor | GGMLExperts, expert: int, x: torch.Tensor, prompt: bool) -> torch.Tensor:
    """``x [n, K]`` times expert ``expert``'s matrix of the stack ``w``, transposed."""
    return w.matmul(x, expert, prompt) if isinstance(w, GGMLExperts) else F.linear(x, w[expert])


class MixtureOfExperts(nn.Module):
    """pre-norm -> router + experts -> post-norm, from the block's residual stream (the router sees
    the stream itself, the experts its normed copy)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        eps, offset = config.rms_norm_eps, config.norm_offset
        self.router = Router(config)
        self.experts = Experts(config)
        self.pre_norm = RMSNorm(config.hidden_size, eps, offset)
        self.post_norm = RMSNorm(config.hidden_size, eps, offset)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        weights, index = self.router(flat)
        out = self.experts(self.pre_norm(flat), weights, index, prompt=h.dim() >= 3 and h.shape[-2] > 1)
        return self.post_norm(out.view(h.shape))
