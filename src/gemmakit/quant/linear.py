"""Requantising a float model's weights at load: ``--quant int8`` and ``--quant int4``.

Decoding one token reads every weight once, so on a CPU its speed is set by bytes of weights, not
by flops: halving the bytes roughly doubles tokens/s.

* ``int8``: one signed byte per weight and one float32 scale per group of 32 inputs (symmetric
  absmax/127, GGML's Q8_0 scheme), run by gemmakit's grouped kernel (quant/grouped.py) with float32
  activations: the same layers a Q8_0 GGUF loads into.
* ``int4``: four bits per weight in groups of ``group_size`` along the input, each group with its
  own scale and minimum (asymmetric), run by ``aten._weight_int4pack_mm_for_cpu`` with bfloat16
  activations (its float32 variant is several times slower).

Gemma ties its LM head to the embedding: 168M of the 270M model's 268M parameters. The head
matmul is the largest single read of a decode step, so it is quantised too, while the embedding
lookup dequantises only the rows it needs. Off the CPU the int4 modules fall back to
dequantise-then-matmul, which is correct everywhere (the packed CPU kernels do not exist there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.quant.ggml import GroupedCodes
from gemmakit.quant.grouped import GroupedEmbedding, GroupedLinear, fuse_projections

SCHEMES = ("int8", "int4")
DEFAULT_GROUP = 64  # int4 group along the input: 640, 1024, 2048 ... are all multiples of 64
INT8_GROUP = 32  # as GGML's Q8_0


# --------------------------------------------------------------------------- quantisers (pure)

def quantize_int8_groups(w: torch.Tensor, group: int = INT8_GROUP, rows: int = 4096) -> GroupedCodes:
    """``w [N, K]`` -> int8 codes with one absmax/127 scale per ``group`` inputs (``w ~ codes * scale``).

    Works through ``rows`` rows at a time, so the float temporaries stay a few MB even for a
    262K-row embedding.
    """
    N, K = w.shape
    codes = torch.empty(N, K, dtype=torch.int8, device=w.device)
    scale = torch.empty(N, K // group, dtype=torch.float32, device=w.device)
    for start in range(0, N, rows):
        g = w[start:start + rows].float().reshape(-1, K // group, group)
        s = (g.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)
        codes[start:start + rows] = torch.round(g / s[..., None]).clamp(-127, 127).reshape(-1, K).to(torch.int8)
        scale[start:start + rows] = s
    return GroupedCodes(codes, scale, None, group)


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

class Int4Linear(nn.Module):
    """Bias-free linear layer with int4 group-wise weights."""

    def __init__(self, weight: torch.Tensor, group: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.w = _Int4Weight(*quantize_int4(weight, group), group=group, dtype=dtype)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.matmul(x)


class QuantTiedEmbedding(nn.Module):
    """The tied embedding / LM head in int4.

    ``forward(ids)`` dequantises only the looked-up rows; ``project(h)`` is the LM head matmul. The
    rows are kept nibble-packed for the lookup and a kernel-packed copy for the head (the CPU
    kernel's tiled layout cannot be indexed by row): two half-byte copies, the bytes of one int8
    copy, but the head reads half as much per token. ``weight`` is an empty tensor that carries
    only the compute dtype and device, so code that asks a model for its dtype or device keeps working.
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, group: int = DEFAULT_GROUP) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("_probe", torch.empty(0, dtype=dtype, device=weight.device), persistent=False)
        q, scale, low = quantize_int4(weight, group)
        self.register_buffer("rows", _nibbles(q))  # [V, D/2]
        self.register_buffer("row_scale", scale.to(dtype))
        self.register_buffer("row_low", low.to(dtype))
        self.head = _Int4Weight(q, scale, low, group, dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self._probe

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        flat = ids.reshape(-1)
        rows = dequantize_int4(_unnibble(self.rows[flat]), self.row_scale[flat], self.row_low[flat], self._probe.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def project(self, h: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., V]
        return self.head.matmul(h)


# --------------------------------------------------------------------------- swapping

def default_compute_dtype(scheme: str) -> torch.dtype:
    """int8 runs on the grouped kernel in float32; the packed int4 CPU kernel is 3-10x faster with
    bfloat16 activations than with float32 ones."""
    return torch.float32 if scheme == "int8" else torch.bfloat16


def _fitting_group(in_features: int, group: int) -> int | None:
    """``group``, or a smaller power of two >= 32 dividing ``in_features`` (the int4 kernel's minimum)."""
    g = group
    while g >= 32:
        if in_features % g == 0:
            return g
        g //= 2
    return None


@torch.no_grad()
def requantize_blocks_int8(model: nn.Module, rows: int = 4096) -> int:
    """Turn every GGML-block weight of ``model`` (a GGUF loaded with its blocks kept) into int8
    groups of 32, a few thousand rows at a time; returns how many weights it converted.

    The codes and scales are exactly those ``quantize_model(..., "int8")`` gives the dequantised
    float model (the same float values, groups never cross rows), without ever holding that model:
    loading the 270M's GGUF with ``--quant int8`` peaked at 1.6 GB through the float copy (its
    embedding alone is 671 MB in float32). Each source's file pages are handed back once converted.
    """
    from gemmakit.heap import forget_file_pages
    from gemmakit.quant.grouped import GGMLWeight, GroupedWeight
    from gemmakit.quant.kernels import ggml_dequantize

    converted = 0
    for module in list(model.modules()):
        w = module._modules.get("w")
        if not isinstance(w, GGMLWeight) or w.in_features % INT8_GROUP:
            continue
        K = w.in_features
        codes = torch.empty(w.out_features, K, dtype=torch.int8)
        scale = torch.empty(w.out_features, K // INT8_GROUP, dtype=torch.float32)
        start = 0
        for blocks, ggml_type in zip(w.parts(), w.types):
            for first in range(0, blocks.shape[0], rows):
                part = quantize_int8_groups(ggml_dequantize(blocks[first:first + rows], ggml_type, K))
                n = part.codes.shape[0]
                codes[start:start + n], scale[start:start + n] = part.codes, part.scale
                start += n
            forget_file_pages(blocks.data_ptr(), blocks.numel() * blocks.element_size())
        module.w = GroupedWeight(GroupedCodes(codes, scale, None, INT8_GROUP))
        converted += 1
    return converted


def quantize_model(model: nn.Module, scheme: str, group: int = DEFAULT_GROUP,
                   dtype: torch.dtype | None = None, embedding: bool = True) -> nn.Module:
    """Replace every bias-free ``nn.Linear`` (and the tied embedding/head) of ``model`` in place.

    Non-matrix parameters (norms) are cast to the compute ``dtype``; each float weight is freed as
    soon as its quantised replacement exists, so the peak is the float model plus one layer. A
    layer whose input size does not split into groups keeps its float weight.
    """
    if scheme not in SCHEMES:
        from gemmakit.errors import InvalidRequestError

        raise InvalidRequestError(f"unknown quantisation {scheme!r}; choose one of {', '.join(SCHEMES)} or none")
    dtype = dtype or default_compute_dtype(scheme)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                w = child.weight.detach()
                if scheme == "int8" and w.shape[1] % INT8_GROUP == 0:
                    setattr(parent, name, GroupedLinear(quantize_int8_groups(w)))
                elif scheme == "int4" and (g := _fitting_group(w.shape[1], group)):
                    setattr(parent, name, Int4Linear(w, g, dtype))
                del child, w
    if embedding and isinstance(getattr(model, "embed", None), nn.Embedding):
        w = model.embed.weight.detach()
        g = _fitting_group(w.shape[1], group)
        if scheme == "int8" and w.shape[1] % INT8_GROUP == 0:
            model.embed = GroupedEmbedding(quantize_int8_groups(w), dtype)
        elif scheme == "int4" and g:
            model.embed = QuantTiedEmbedding(w, dtype, g)
        del w
    if scheme == "int8":
        fuse_projections(model)
    for p in model.parameters():  # norm weights, and any matrix that could not be grouped
        p.data = p.data.to(dtype)
    model.quant_scheme = scheme
    return model
