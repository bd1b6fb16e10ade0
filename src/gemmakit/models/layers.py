"""The small building blocks every Gemma decoder shares: RMSNorm, GeGLU, RoPE, soft-capping.

Numerics follow the reference implementations exactly, because float32 parity to 1e-4 is a goal:
RMSNorm is computed in float32 and scales by ``1 + weight``; RoPE angles are computed in float32
and rotate the two halves of each head (not interleaved pairs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.kernels import ops
from gemmakit.kernels.gemm import Linear


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + weight)``, computed in float32.

    The weight is stored as the offset from one (zero-initialised), as in the reference
    checkpoints; GGUF files store ``1 + weight`` and the loader subtracts the one.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step runs ~100 norms on tiny tensors, where each dispatched op (even a no-op cast)
        # costs microseconds: on the CPU in float32 one kernel call does it all (kernels/ops.py),
        # elsewhere casts are skipped when the input is already float32.
        if x.device.type == "cpu" and x.dtype == torch.float32:
            out = ops.rms_norm(x, self.weight, self.eps)
            if out is not None:
                return out
        f32 = torch.float32
        xf = x if x.dtype == f32 else x.float()
        w = self.weight if self.weight.dtype == f32 else self.weight.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(self.eps)) * (1.0 + w)
        return out if x.dtype == f32 else out.to(x.dtype)


class GeGLU(nn.Module):
    """Gated MLP: ``down(gelu_tanh(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

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
        act = ops.gelu_mul(gate, up)  # one pass in the CPU kernel when it applies
        if act is None:
            act = F.gelu(gate, approximate="tanh") * up
        return self.down_proj(act)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)``: bounds logits smoothly (Gemma 2)."""
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos/sin tables for integer positions ``[B, T]`` -> two ``[B, 1, T, head_dim]``.

    Linear scaling divides the frequencies (equivalently, the positions) by ``scaling``.
    Negative positions (left padding) produce finite junk that the attention mask hides.
    """
    angles = positions.float()[..., None] * _inverse_frequencies(head_dim, theta, scaling, positions.device)
    # [B, T, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


_INVERSE_FREQUENCIES: dict[tuple, torch.Tensor] = {}


def _inverse_frequencies(head_dim: int, theta: float, scaling: float, device: torch.device) -> torch.Tensor:
    """``1 / theta^(2i / head_dim) / scaling``, float32: the same few ops every step (a decode step
    built them twice, ~10 small dispatches each), so made once per table and device. A compiled
    graph computes them itself (the compiler folds them into constants)."""
    key, compiling = (head_dim, theta, scaling, device), torch.compiler.is_compiling()
    if not compiling and key in _INVERSE_FREQUENCIES:
        return _INVERSE_FREQUENCIES[key]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    inv_freq = inv_freq / scaling
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
        out = ops.norm_rope(x, None if norm is None else norm.weight, 0.0 if norm is None else norm.eps, cos, sin)
        if out is not None:
            return out
    return apply_rope(x if norm is None else norm(x), cos, sin)
