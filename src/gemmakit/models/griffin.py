"""Griffin's recurrent mixer (RecurrentGemma): a gated linear recurrence in place of attention.

A recurrent block has two branches over the normalised input ``x``:

    y = gelu_tanh(linear_y(x))                                   gate branch
    u = rg_lru(conv1d(linear_x(x)))                              recurrent branch
    out = linear_out(u * y)

The RG-LRU (real-gated linear recurrent unit) keeps one float32 number per channel:

    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * u_t)
    a_t = sigmoid(Λ) ** (c * r_t),  i.e.  log a_t = -c * r_t * softplus(-Λ),  c = 8

(computed in log space; checkpoints store ``a_param = -Λ``, so ``log a_t = -c * r_t * softplus(a_param)``),

where ``i_t`` (input gate) and ``r_t`` (recurrence gate) are sigmoids of block-diagonal linear maps
of ``u_t``. At a sequence start (position 0) the state is dropped and the input is not rescaled, so
every sequence begins from the same place whatever came before it in the batch row (left padding).

Because ``h_t`` is linear in ``h_{t-1}``, a whole prompt is computed with a chunked scan (about
2·sqrt(T) vectorised steps, see :func:`linear_scan`) instead of a Python loop over tokens; decoding
is one step of the same recurrence from the cached state. The short causal Conv1D needs the last
``width - 1`` inputs, which is the rest of the state: nothing here grows with the sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.kernels.gemm import Linear
from gemmakit.models.cache import RecurrentState
from gemmakit.models.config import ModelConfig
from gemmakit.models.masks import RecurrentContext


# c in a = sigmoid(Λ)^(c·r): sharpens the recurrence gate's range (Griffin paper, section 2.4).
RG_LRU_C = 8.0


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` for ``a, b [B, T, W]`` from ``h0 [B, W]`` (or zeros).

    A chunked scan: the T tokens are cut into C chunks of L ~ sqrt(T). Step 1 runs the recurrence
    inside every chunk at once (L vectorised steps over ``[B, C, W]``, from a zero state) and keeps
    the running product of ``a``; step 2 carries the state across chunk boundaries (C steps over
    ``[B, W]``); step 3 adds each chunk's incoming state times the running product. About 2·sqrt(T)
    small steps instead of T, the same O(T·W) work as a plain loop, and only products and sums
    (no divisions or logs), so a reset (a = 0) is exact.
    """
    B, T, W = b.shape
    if T == 1:  # decoding: one step from the state
        return b if h0 is None else b + a * h0[:, None]
    L = math.isqrt(T - 1) + 1  # ceil(sqrt(T))
    C = -(-T // L)
    pad = C * L - T  # trailing (a = 1, b = 0) steps: they do not touch the first T outputs
    if pad:
        a, b = F.pad(a, (0, 0, 0, pad), value=1.0), F.pad(b, (0, 0, 0, pad))
    a, b = a.view(B, C, L, W), b.view(B, C, L, W)
    local = torch.empty_like(b)  # state within each chunk, starting from zero
    decay = torch.empty_like(a)  # product of a from the chunk start up to here
    local[:, :, 0], decay[:, :, 0] = b[:, :, 0], a[:, :, 0]
    for i in range(1, L):
        torch.addcmul(b[:, :, i], a[:, :, i], local[:, :, i - 1], out=local[:, :, i])
        torch.mul(a[:, :, i], decay[:, :, i - 1], out=decay[:, :, i])
    incoming = torch.empty(B, C, W, dtype=b.dtype, device=b.device)  # state entering each chunk
    state = h0 if h0 is not None else b.new_zeros(B, W)
    for c in range(C):
        incoming[:, c] = state
        state = torch.addcmul(local[:, c, -1], decay[:, c, -1], state)
    return local.addcmul_(decay, incoming[:, :, None]).view(B, C * L, W)[:, :T]


class BlockDiagonalLinear(nn.Module):
    """``num_blocks`` independent square linear maps over equal slices of the channels."""

    def __init__(self, width: int, num_blocks: int) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        block = width // num_blocks
        self.weight = nn.Parameter(torch.zeros(num_blocks, block, block))  # [H, in, out]
        self.bias = nn.Parameter(torch.zeros(num_blocks, block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, W = x.shape
        xb = x.view(B, T, self.num_blocks, W // self.num_blocks)
        return (torch.einsum("bthi,hij->bthj", xb, self.weight) + self.bias).reshape(B, T, W)


class CausalConv1D(nn.Module):
    """Depthwise causal convolution of temporal width ``K``: ``out_t = bias + sum_s w[K-1-s] * x_{t-s}``.

    A tap never reaches back past the start of the token's sequence (``s <= position_t``), which is
    the reference's document masking and what makes left padding before a sequence start harmless.
    Padding (position -1) is skipped altogether: taps see the previous *real* inputs and the
    history comes out unchanged by padding, so a serving engine can pad a row that continues a
    sequence (or a row that has nothing to do this step) without disturbing its state.
    """

    def __init__(self, width: int, temporal_width: int) -> None:
        super().__init__()
        self.temporal_width = temporal_width
        self.weight = nn.Parameter(torch.zeros(temporal_width, width))  # [K, W]; row K-1 multiplies x_t
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                history: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, W]``, ``history [B, K-1, W]`` (previous inputs) -> output and the new history."""
        B, T, W = x.shape
        K = self.temporal_width
        if history is None:
            history = x.new_zeros(B, K - 1, W)
        ext = torch.cat([history.to(x.dtype), x], dim=1)  # [B, K-1+T, W]
        order = None
        if bool((positions < 0).any()):
            ext, order = _padding_first(ext, positions, K - 1)
            positions = positions.gather(1, order)
        out = ext[:, K - 1:] * self.weight[K - 1] + self.bias
        for shift in range(1, K):  # K is small (4): a loop over taps, each vectorised over all tokens
            same_sequence = (positions >= shift)[..., None].to(x.dtype)  # [B, T, 1]
            out = out + ext[:, K - 1 - shift:K - 1 - shift + T] * self.weight[K - 1 - shift] * same_sequence
        if order is not None:  # back to the callers' token order (padding outputs are junk, never read)
            out = torch.empty_like(out).scatter_(1, order[..., None].expand_as(out), out)
        return out, ext[:, ext.shape[1] - (K - 1):]


def _padding_first(ext: torch.Tensor, positions: torch.Tensor, hist: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder ``ext = [history, x]`` ``[B, hist+T, W]`` to ``[x's padding, history, x's real tokens]``.

    Then the history sits right before the row's first real token, every real token's taps read
    real inputs only, and the last ``hist`` entries (the new history) are the old history when the
    row has fewer real tokens than that, padding included. Returns the reordered ``ext`` and
    ``order [B, T]``: the column of ``x`` now at each place (a stable sort, padding first).
    """
    real = positions >= 0  # [B, T]
    order = torch.sort(real.to(torch.int8), dim=1, stable=True).indices  # padding columns first
    n_pad = (~real).sum(1, keepdim=True)  # [B, 1]
    i = torch.arange(ext.shape[1], device=ext.device)[None]  # [1, hist+T]
    from_x = hist + order.gather(1, torch.where(i < n_pad, i, (i - hist).clamp(min=0)).clamp(max=order.shape[1] - 1))
    index = torch.where((i >= n_pad) & (i < n_pad + hist), i - n_pad, from_x)  # [B, hist+T]
    return ext.gather(1, index[..., None].expand(-1, -1, ext.shape[2])), order


class RGLRU(nn.Module):
    """The real-gated linear recurrent unit; the recurrence runs in float32 whatever the compute dtype."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.a_param = nn.Parameter(torch.zeros(width))  # Λ: softplus(Λ) is the per-channel base decay rate
        self.input_gate = BlockDiagonalLinear(width, num_heads)
        self.a_gate = BlockDiagonalLinear(width, num_heads)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, W]`` -> outputs ``[B, T, W]`` and the last state ``[B, W]`` (float32)."""
        gate_x = torch.sigmoid(self.input_gate(x))
        gate_a = torch.sigmoid(self.a_gate(x))
        log_a = -RG_LRU_C * gate_a * F.softplus(self.a_param)  # log-space: a = exp(log_a) in (0, 1]
        a = torch.exp(log_a)
        start = (positions == 0)[..., None]  # [B, T, 1]
        # sqrt(1 - a^2) keeps the state's scale independent of the decay; not applied at a sequence start.
        multiplier = torch.where(start, torch.ones_like(a), torch.sqrt(1 - torch.exp(2 * log_a)))
        pad = (positions < 0)[..., None]
        b = (x * gate_x * multiplier.to(x.dtype)).masked_fill(pad, 0.0)
        a = a.masked_fill(start, 0.0)  # reset: forget whatever came before the sequence start
        a = a.masked_fill(pad, 1.0)  # padding (a = 1, b = 0) passes the state through unchanged
        h = linear_scan(a.float(), b.float(), h0)
        return h.to(x.dtype), h[:, -1]


class RecurrentBlock(nn.Module):
    """Griffin's temporal-mixing block: gate branch times Conv1D + RG-LRU branch, projected back."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, w = config.hidden_size, config.recurrent_width
        self.linear_y = Linear(d, w)
        self.linear_x = Linear(d, w)
        self.linear_out = Linear(w, d)
        self.conv1d = CausalConv1D(w, config.conv1d_width)
        self.rg_lru = RGLRU(w, config.num_heads)

    def forward(self, x: torch.Tensor, ctx: RecurrentContext, state: RecurrentState | None) -> torch.Tensor:
        y = F.gelu(self.linear_y(x), approximate="tanh")  # [B, T, W]
        u, history = self.conv1d(self.linear_x(x), ctx.positions, state.conv if state is not None else None)
        u, last = self.rg_lru(u, ctx.positions, state.rg_lru if state is not None else None)
        if state is not None:
            state.conv.copy_(history)
            state.rg_lru.copy_(last)
        return self.linear_out(u * y)
