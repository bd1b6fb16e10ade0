"""The kernels' elementwise and attention entry points: RMSNorm, QK-norm + RoPE, GELU(gate) * up and
one-query attention on float32 CPU tensors, each returning None where the kernel does not apply
(the caller then runs torch's ops, which compute the same up to float32 rounding)."""

from __future__ import annotations

import torch

from gemmakit.kernels import build


_attention_op = None


def register_custom_ops() -> None:
    """One-query attention as the torch operator ``gemmakit::decode_attention``, which torch.compile
    can trace through (a plain extension call would break the compiled graph at every layer)."""
    global _attention_op
    if _attention_op is not None:
        return
    build.kernel()

    @torch.library.custom_op("gemmakit::decode_attention", mutates_args=())
    def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                     softcap: float) -> torch.Tensor:
        return build.kernel().decode_attention(q, k, v, bias, scale, softcap)

    @attention_op.register_fake
    def _(q, k, v, bias, scale, softcap):
        return torch.empty_like(q)

    _attention_op = attention_op


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                     softcap: float | None) -> torch.Tensor | None:
    """One-query attention ``q [B, H, 1, D]`` over ``k, v [B, Hkv, S, D]`` with an additive mask
    ``bias [B, 1, 1, S]`` (float32, CPU) in the kernel, or None where the kernel cannot run it."""
    if q.dtype != torch.float32 or k.dtype != torch.float32 or q.device.type != "cpu":
        return None  # e.g. a bfloat16 model, compiled or not: SDPA
    if torch.compiler.is_compiling():
        return torch.ops.gemmakit.decode_attention(q, k, v, bias, scale, softcap or 0.0)
    ext = build.kernel()
    return None if ext is None else ext.decode_attention(q, k, v, bias, scale, softcap or 0.0)


def _eager_float32_kernel(*tensors: torch.Tensor):
    """The kernel module for an elementwise-style call on float32 CPU ``tensors`` outside compiled
    graphs and autograd (see :func:`rms_norm` for why those keep torch's ops), else None."""
    if (any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors)
            or torch.compiler.is_compiling() or torch.is_grad_enabled()):
        return None
    return build.kernel()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 1.0) -> torch.Tensor | None:
    """Gemma's RMSNorm ``x / rms(x) * (offset + weight)`` of float32 CPU ``x`` in one kernel call, or
    None where the kernel does not apply:
    other dtypes or devices, inside a compiled graph (the compiler fuses it anyway), and with autograd
    on (generation runs without it; training and a plain ``model(ids)`` keep torch's ops, so the two
    never mix within one forward and LoRA at B = 0 reproduces its base bit for bit)."""
    ext = _eager_float32_kernel(x, weight)
    return None if ext is None else ext.rms_norm(x, weight, eps, offset)


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``gelu_tanh(gate) * up`` for float32 CPU ``[..., N]`` halves in one kernel pass, or None where
    the kernel does not apply (the same rule as :func:`rms_norm`: other dtypes or devices, compiled
    graphs, autograd on). Equal to torch's ops up to float32 rounding (csrc/gelu_mul.cpp)."""
    ext = _eager_float32_kernel(gate, up)
    if ext is None:
        return None
    N = gate.shape[-1]
    return ext.gelu_mul(gate.reshape(-1, N), up.reshape(-1, N)).view(gate.shape)


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
              sin: torch.Tensor, offset: float = 1.0) -> torch.Tensor | None:
    """Optional RMSNorm of each head vector, then the rotary embedding, of ``x [B, H, T, D]`` in one
    kernel call; None where it does not apply (the same conditions as :func:`rms_norm`)."""
    ext = _eager_float32_kernel(x, cos, sin, *([] if weight is None else [weight]))
    if ext is None:
        return None
    return ext.norm_rope(x, weight if weight is not None else torch.empty(0), eps, offset, cos, sin)
