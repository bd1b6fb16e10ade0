"""Weight-only quantised linear layers and tied embedding, swapped into a loaded model.

Decoding one token reads every weight once, so on a CPU its speed is set by bytes of weights, not
by flops: halving the bytes roughly doubles tokens/s. Activations stay in the compute dtype
(bfloat16 on CPUs, where torch's packed kernels are fast; the float32 variants of the same kernels
are several times slower), weights are stored as

* ``int8``: one signed byte per weight and one scale per output channel (symmetric absmax/127),
  run by ``aten._weight_int8pack_mm``;
* ``int4``: four bits per weight in groups of ``group_size`` along the input, each group with its
  own scale and minimum (asymmetric), run by ``aten._weight_int4pack_mm_for_cpu``.

Gemma ties its LM head to the embedding: 168M of the 270M model's 268M parameters. The head
matmul is the largest single read of a decode step, so it is quantised too, while the embedding
lookup dequantises only the rows it needs. Off the CPU the same modules fall back to
dequantise-then-matmul, which is correct everywhere (the packed CPU kernels do not exist there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("int8", "int4")
DEFAULT_GROUP = 64  # int4 group along the input: 640, 1024, 2048 ... are all multiples of 64


# --------------------------------------------------------------------------- quantisers (pure)

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` float -> (``q [N, K]`` int8, ``scale [N]`` float32); ``w ~ q * scale``."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> (``q [N, K]`` uint8 in 0..15, ``scale [N, K/group]``, ``low [N, K/group]``).

    Asymmetric per group: ``w ~ q * scale + low`` with ``low`` the group minimum, so the 16 levels
    span exactly the group's range.
    """
    N, K = w.shape
    if K % group:
        raise ValueError(f"input size {K} is not a multiple of the int4 group size {group}")
    g = w.float().reshape(N, K // group, group)
    low, high = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(N, K), scale, low


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    N, K = q.shape
    G = scale.shape[1]
    g = q.reshape(N, G, K // G).float() * scale.float()[..., None] + low.float()[..., None]
    return g.reshape(N, K).to(dtype)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K/2] bytes (even index in the low nibble)."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def _unnibble(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)


# --------------------------------------------------------------------------- matmul kernels

def _int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [..., K] @ (q * scale)^T`` -> ``[..., N]`` in x's dtype."""
    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x.device.type == "cpu":
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, scale.to(x.dtype))
    else:  # dequantise-then-matmul: the scale factors out of the dot product
        y = F.linear(x2, q.to(x.dtype)) * scale.to(x.dtype)
    return y.reshape(*shape, q.shape[0])


class _Int4Weight(nn.Module):
    """An int4 group-wise weight in the layout the device's kernel wants."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group = group
        self.dtype = dtype
        self.cpu_kernel = q.device.type == "cpu"
        if self.cpu_kernel:
            # The kernel wants N a multiple of 16: pad with zero rows, sliced off after the matmul.
            pad = -self.out_features % 16
            if pad:
                q, scale, low = (F.pad(t, (0, 0, 0, pad)) for t in (q, scale, low))
            # The kernel computes w = (q - 8) * scale + zero, so zero = low + 8 * scale.
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
            sz = torch.stack([scale, low + 8 * scale], dim=-1)  # [N, G, 2]
            self.register_buffer("scales_zeros", sz.transpose(0, 1).contiguous().to(dtype))  # [G, N, 2]
        else:
            self.register_buffer("packed", _nibbles(q))
            self.register_buffer("scale", scale.to(dtype))
            self.register_buffer("low", low.to(dtype))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.cpu_kernel and x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(self.dtype).contiguous(), self.packed, self.group, self.scales_zeros)
            y = y[:, :self.out_features].to(x.dtype)
        else:
            w = dequantize_int4(_unnibble(self.packed), self.scale, self.low, x.dtype)
            y = F.linear(x2, w)
        return y.reshape(*shape, self.out_features)


# --------------------------------------------------------------------------- modules

class Int8Linear(nn.Module):
    """Bias-free linear layer with int8 per-output-channel weights."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        q, scale = quantize_int8(weight)
        self.register_buffer("weight_q", q)  # [N, K] int8
        self.register_buffer("scale", scale.to(dtype))  # [N], in the compute dtype the kernel wants
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _int8_matmul(x, self.weight_q, self.scale)


class Int4Linear(nn.Module):
    """Bias-free linear layer with int4 group-wise weights."""

    def __init__(self, weight: torch.Tensor, group: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.w = _Int4Weight(*quantize_int4(weight, group), group=group, dtype=dtype)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.matmul(x)


class QuantTiedEmbedding(nn.Module):
    """The tied embedding / LM head, quantised.

    ``forward(ids)`` dequantises only the looked-up rows; ``project(h)`` is the LM head matmul.
    int8 keeps one copy serving both. int4 keeps the rows nibble-packed for the lookup and a
    kernel-packed copy for the head (the CPU kernel's tiled layout cannot be indexed by row): two
    half-byte copies, the same bytes as one int8 copy, but the head reads half as much per token.
    ``weight`` is an empty tensor that carries only the compute dtype and device, so code that asks
    a model for its dtype or device keeps working.
    """

    def __init__(self, weight: torch.Tensor, scheme: str, dtype: torch.dtype, group: int = DEFAULT_GROUP) -> None:
        super().__init__()
        self.scheme = scheme
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("_probe", torch.empty(0, dtype=dtype, device=weight.device), persistent=False)
        if scheme == "int8":
            q, scale = quantize_int8(weight)
            self.register_buffer("weight_q", q)
            self.register_buffer("scale", scale.to(dtype))
        elif scheme == "int4":
            q, scale, low = quantize_int4(weight, group)
            self.register_buffer("rows", _nibbles(q))  # [V, D/2]
            self.register_buffer("row_scale", scale.to(dtype))
            self.register_buffer("row_low", low.to(dtype))
            self.head = _Int4Weight(q, scale, low, group, dtype)
        else:
            raise ValueError(f"unknown quantisation scheme {scheme!r}")

    @property
    def weight(self) -> torch.Tensor:
        return self._probe

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        flat = ids.reshape(-1)
        dtype = self._probe.dtype
        if self.scheme == "int8":
            rows = dequantize_int8(self.weight_q[flat], self.scale[flat], dtype)
        else:
            rows = dequantize_int4(_unnibble(self.rows[flat]), self.row_scale[flat], self.row_low[flat], dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def project(self, h: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., V]
        if self.scheme == "int8":
            return _int8_matmul(h, self.weight_q, self.scale)
        return self.head.matmul(h)


# --------------------------------------------------------------------------- swapping

def default_compute_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16: the packed CPU kernels are 3-10x faster with it than with float32 activations."""
    return torch.bfloat16


def _fitting_group(in_features: int, group: int) -> int | None:
    """``group``, or a smaller power of two >= 32 dividing ``in_features`` (the kernel's minimum)."""
    g = group
    while g >= 32:
        if in_features % g == 0:
            return g
        g //= 2
    return None


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str, group: int = DEFAULT_GROUP,
                   dtype: torch.dtype | None = None, embedding: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` (and the tied embedding/head) of ``model`` in place.

    Non-matrix parameters (norms) are cast to the compute ``dtype``; each float weight is freed as
    soon as its quantised replacement exists, so the peak is the float model plus one layer.
    """
    if scheme not in SCHEMES:
        from gemmakit.errors import InvalidRequestError

        raise InvalidRequestError(f"unknown quantisation {scheme!r}; choose one of {', '.join(SCHEMES)} or none")
    dtype = dtype or default_compute_dtype(next(model.parameters()).device)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                w = child.weight.detach()
                g = _fitting_group(w.shape[1], group)
                # int4 needs the input size to split into groups; a layer where it does not stays int8
                new = Int4Linear(w, g, dtype) if scheme == "int4" and g else Int8Linear(w, dtype)
                setattr(parent, name, new)
                del child, w
    if embedding and isinstance(getattr(model, "embed", None), nn.Embedding):
        w = model.embed.weight.detach()
        g = _fitting_group(w.shape[1], group)
        model.embed = QuantTiedEmbedding(w, scheme if g else "int8", dtype, g or group)
        del w
    for p in model.parameters():  # what is left are norm weights
        p.data = p.data.to(dtype)
    model.quant_scheme = scheme
    return model
