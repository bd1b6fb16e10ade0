"""The small building blocks every Gemma decoder shares: RMSNorm, GeGLU, RoPE, soft-capping, and
Gemma 3n's LAuReL branch.

Numerics follow the reference implementations exactly, because float32 parity to 1e-4 is a goal:
RMSNorm is computed in float32 and scales by ``1 + weight``; RoPE angles are computed in float32
and rotate the two halves of each head (not interleaved pairs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.kernels import ops
from gemmakit.kernels.gemm import Linear


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (offset + weight)``, computed in float32.

    Up to Gemma 3 the weight is stored as the offset from one (zero-initialised, ``offset`` 1), as
    in the reference checkpoints (GGUF files store ``1 + weight`` and the loader subtracts the
    one); from Gemma 4 on it is the scale itself (``offset`` 0).
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 1.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step runs ~100 norms on tiny tensors, where each dispatched op (even a no-op cast)
        # costs microseconds: on the CPU in float32 one kernel call does it all (kernels/ops.py),
        # elsewhere casts are skipped when the input is already float32.
        if x.device.type == "cpu" and x.dtype == torch.float32:
            out = ops.rms_norm(x, self.weight, self.eps, self.offset)
            if out is not None:
                return out
        w = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        out = unit_rms(x.float(), self.eps) * (w + self.offset if self.offset else w)
        return out if x.dtype == torch.float32 else out.to(x.dtype)


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dim in ``x``'s dtype: an RMSNorm without scale
    (Gemma 4's value norm and router input)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))


class GeGLU(nn.Module):
    """Gated MLP: ``down(gelu_tanh(gate(x)) * up(x))``.

    With ``sparsity`` > 0 (Gemma 3n's first layers), the gate keeps only its activations above a
    cutoff placed, per token, where that share of a normal distribution with the gate's own mean
    and (population) standard deviation would lie below it, shifted down by the cutoff
    (``relu(gate - cutoff)``): a top-k without sorting, assuming roughly Gaussian gate values.
    """

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, sparsity: float = 0.0) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)
        # the standard normal's quantile at the target sparsity (1.645 for 0.95), worked out in
        # float32 as the reference does; rounded to the activations' dtype when used
        self.cutoff_stds = (float(torch.erfinv(2 * torch.tensor(sparsity, device="cpu") - 1) * math.sqrt(2))
                            if sparsity > 0.0 else None)

        self.gate_up_proj: nn.Module | None = None  # set by fuse(): gate and up in one matmul

    def projections_to_fuse(self) -> list[nn.Module] | None:
        """gate and up while they are separate layers (``quant.grouped.unmerged_projections``)."""
        return None if self.gate_up_proj is not None else [self.gate_proj, self.up_proj]

    def fuse(self, sizes: list[int], gate_up: nn.Module) -> None:
        """Use one projection returning gate|up in place of the two
        (``fuse_projections``, ``fuse_dense_projections``)."""
        self.gate_up_proj, self.gate_up_sizes = gate_up, sizes
        self.gate_proj = self.up_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).split(self.gate_up_sizes, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.cutoff_stds is not None:
            gate = gaussian_top_k(gate, self.cutoff_stds)
        act = ops.gelu_mul(gate, up)  # one pass in the CPU kernel when it applies
        if act is None:
            act = F.gelu(gate, approximate="tanh") * up
        return self.down_proj(act)


def gaussian_top_k(x: torch.Tensor, stds: float) -> torch.Tensor:
    """``relu(x - (mean + stds * std))`` over the last dim (std with divisor N, not N-1)."""
    mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True, correction=0)
    multiplier = stds if x.dtype == torch.float32 else float(torch.tensor(stds, device="cpu").to(x.dtype))
    return F.relu(x - (mean + std * multiplier))


class Laurel(nn.Module):
    """LAuReL (learned augmented residual layer, Gemma 3n): ``x + norm(right(left(x)))`` with a
    low-rank ``left``/``right`` pair, a branch beside attention that sees the same normed input."""

    def __init__(self, hidden: int, rank: int, eps: float, offset: float) -> None:
        super().__init__()
        self.left = Linear(hidden, rank, bias=False)
        self.right = Linear(rank, hidden, bias=False)
        self.norm = RMSNorm(hidden, eps, offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.right(self.left(x)))


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)``: bounds logits smoothly (Gemma 2)."""
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, scaling: float, dtype: torch.dtype,
    proportion: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos/sin tables for integer positions ``[B, T]`` -> two ``[B, 1, T, head_dim]``.

    Linear scaling divides the frequencies (equivalently, the positions) by ``scaling``. With
    ``proportion`` < 1 only that share of the frequency pairs rotates, the others having
    frequency 0 (cos 1, sin 0: those dims pass through), as Gemma 4's "proportional" RoPE does.
    Negative positions (left padding) produce finite junk that the attention mask hides.
    """
    inv_freq = _inverse_frequencies(head_dim, theta, scaling, positions.device, proportion)
    angles = positions.float()[..., None] * inv_freq
    # [B, T, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


_INVERSE_FREQUENCIES: dict[tuple, torch.Tensor] = {}


def _inverse_frequencies(head_dim: int, theta: float, scaling: float, device: torch.device,
                         proportion: float = 1.0) -> torch.Tensor:
    """``1 / theta^(2i / head_dim) / scaling``, float32, for the first ``proportion`` of the pairs
    and 0 for the rest: the same few ops every step (a decode step built them twice, ~10 small
    dispatches each), so made once per table and device. A compiled graph computes them itself
    (the compiler folds them into constants)."""
    key, compiling = (head_dim, theta, scaling, device, proportion), torch.compiler.is_compiling()
    if not compiling and key in _INVERSE_FREQUENCIES:
        return _INVERSE_FREQUENCIES[key]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    inv_freq = inv_freq / scaling
    if proportion < 1.0:
        inv_freq[int(proportion * head_dim // 2):] = 0.0
    if not compiling:
        _INVERSE_FREQUENCIES[key] = inv_freq
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, T, D]`` by the tables: half-split convention (``rotate_half``).

    Tables narrower than ``D`` (partial rotary, RecurrentGemma) rotate the leading dims only.
    """
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def norm_and_rope(x: torch.Tensor, norm: RMSNorm | None, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rope(norm(x))`` (``norm`` may be None): on the CPU in float32 with autograd off, one
    kernel call instead of ~9 dispatched ops per tensor, which a decoding step pays twice a layer."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        out = (ops.norm_rope(x, None, 0.0, cos, sin) if norm is None
               else ops.norm_rope(x, norm.weight, norm.eps, cos, sin, norm.offset))
        if out is not None:
            return out
    return apply_rope(x if norm is None else norm(x), cos, sin)
