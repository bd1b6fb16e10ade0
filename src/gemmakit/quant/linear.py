"""Requantising a float model's weights at load: ``--quant int8`` and ``--quant int4``.

Decoding one token reads every weight once, so on a CPU its speed is set by bytes of weights, not
by flops: halving the bytes roughly doubles tokens/s.

* ``int8`` on the CPU: GGML's Q8_0 blocks (one signed byte per weight and a float16 absmax/127
  scale per 32 inputs, 1.0625 bytes per weight), rounded as llama.cpp's reference quantiser rounds
  them, run by the block kernel of a quantised GGUF with float32 activations: the weights
  ``gemmakit quantize --scheme int8`` writes. It used to be int8 codes with a float32 scale on a
  kernel of their own; the block kernel read the same matrix faster (16 GB/s against 10 for the
  270M's head on a 2-core Xeon; the 270M decoded 52.7 tok/s against 29.1) and it is 6% smaller,
  so that kernel is gone.
* ``int8`` elsewhere (or with no CPU kernel): int8 codes with a float32 scale per 32 inputs,
  dequantised per matmul by torch (quant/grouped.py ``GroupedWeight``).
* ``int4`` on the CPU: GGML's Q4_1 blocks (4-bit codes with a float16 scale and minimum per 32
  inputs, 0.625 bytes per weight), rounded as llama.cpp's reference quantiser rounds them (the
  kernel's quantiser writes gguf-py's bytes), run by the same block kernel as a quantised GGUF with
  float32 activations: the weights ``gemmakit quantize --scheme int4`` writes. For the 270M it
  decoded 125 tok/s against 47.7 on torch's packed int4 CPU kernel with bfloat16 activations (this
  scheme before), with a load peak of 0.46 GB against 2.78.
* ``int4`` elsewhere: four bits in groups of ``group_size`` with a scale and minimum each
  (asymmetric), dequantised before each matmul (torch's packed int4 kernels are CPU-only here).

Gemma ties its LM head to the embedding: 168M of the 270M model's 268M parameters. The head
matmul is the largest single read of a decode step, so it is quantised too, while the embedding
lookup dequantises only the rows it needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.errors import InvalidRequestError
from gemmakit.heap import forget_file_pages
from gemmakit.kernels import build
from gemmakit.quant.ggml import GGMLBlocks, ggml_blocks
from gemmakit.quant.ggml_ops import ggml_dequantize, ggml_quantize
from gemmakit.quant.grouped import (GGMLExperts, GGMLWeight, GroupedCodes, GroupedEmbedding, GroupedLinear,
                                    fuse_projections, replace_stack)


SCHEMES = ("int8", "int4")
DEFAULT_GROUP = 64  # off-CPU int4 group along the input: 640, 1024, 2048 ... are all multiples of 64
INT8_GROUP = 32  # as GGML's Q8_0
BLOCK = 32  # weights per Q8_0 / Q4_1 block
Q4_1, Q8_0 = 3, 8  # GGMLQuantizationType
BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}
CPU_BLOCK_TYPE = {"int8": Q8_0, "int4": Q4_1}  # what each scheme is on the CPU's block kernel


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
    return GroupedCodes(codes, scale, group)


def quantize_blocks(w: torch.Tensor, ggml_type: int, rows: int = 4096) -> GGMLBlocks:
    """``w [N, K]`` (K a multiple of 32) -> GGML Q8_0 or Q4_1 blocks of 32 inputs each.

    The rounding is llama.cpp's reference quantiser's (quant/ggml_ops.py ``ggml_quantize``), so the
    blocks are byte for byte those of a GGUF of that type written from the same weights; ``rows`` at
    a time keep the float32 temporaries a few MB even for a 262K-row bfloat16 embedding.
    """
    N, K = w.shape
    chunks = (w[start:start + rows] for start in range(0, N, rows))
    return ggml_blocks(_block_rows(chunks, N, K, ggml_type), ggml_type, (N, K))


def _block_rows(chunks, N: int, K: int, ggml_type: int) -> torch.Tensor:
    """The ``[N, K]`` matrix given as consecutive float row ``chunks``, quantised one chunk at a time
    into one ``[N, K / 32 * bytes]`` block tensor (no whole float copy is ever held)."""
    out = torch.empty(N, K // BLOCK * BLOCK_BYTES[ggml_type], dtype=torch.uint8)
    start = 0
    for dense in chunks:
        out[start:start + dense.shape[0]] = ggml_quantize(dense, ggml_type)
        start += dense.shape[0]
    return out


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
    """An int4 group-wise weight off the CPU: nibble-packed codes, dequantised for each matmul."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("packed", _nibbles(q))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("low", low.to(dtype))

    def dense(self, rows: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantised weight (or its ``rows``) in ``dtype`` (the scales' by default)."""
        packed, scale, low = (self.packed, self.scale, self.low) if rows is None else (
            self.packed[rows], self.scale[rows], self.low[rows])
        return dequantize_int4(_unnibble(packed), scale, low, dtype or self.scale.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense(dtype=x.dtype))


# --------------------------------------------------------------------------- modules

class Int4Linear(nn.Module):
    """Bias-free linear layer with int4 group-wise weights."""

    def __init__(self, weight: torch.Tensor, group: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.w = _Int4Weight(*quantize_int4(weight, group), dtype=dtype)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.matmul(x)


class QuantTiedEmbedding(nn.Module):
    """The tied embedding / LM head in int4 off the CPU (on the CPU: Q4_1 blocks in a
    ``GroupedEmbedding``). ``forward(ids)`` dequantises only the looked-up rows; ``project(h)`` is
    the LM head matmul. ``weight`` is an empty tensor that carries only the compute dtype and
    device, so code that asks a model for its dtype or device keeps working.
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, group: int = DEFAULT_GROUP) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("_probe", torch.empty(0, dtype=dtype, device=weight.device), persistent=False)
        self.w = _Int4Weight(*quantize_int4(weight, group), dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self._probe

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        return self.w.dense(ids.reshape(-1), self._probe.dtype).reshape(*ids.shape, self.embedding_dim)

    def project(self, h: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., V]
        return self.w.matmul(h)


# --------------------------------------------------------------------------- swapping

def default_compute_dtype(scheme: str, device: str | torch.device = "cpu") -> torch.dtype:
    """float32 for int8 and for int4 on the CPU (both run on the block kernels); bfloat16 for int4
    elsewhere, whose dequantise-then-matmul would otherwise expand every weight to float32."""
    return torch.bfloat16 if scheme == "int4" and torch.device(device).type != "cpu" else torch.float32


def _fitting_group(in_features: int, group: int) -> int | None:
    """``group``, or the largest smaller power of two >= 32 dividing ``in_features``, else None (the
    layer then keeps its float weight)."""
    g = group
    while g >= 32:
        if in_features % g == 0:
            return g
        g //= 2
    return None


def _dense_rows(blocks: torch.Tensor, ggml_type: int, K: int, rows: int):
    """A GGML matrix as float32 chunks of ``rows`` rows, each chunk's file pages handed back as soon
    as it is decoded (a whole 178 MB embedding's, held until its end, set the load's peak)."""
    for first in range(0, blocks.shape[0], rows):
        chunk = blocks[first:first + rows]
        dense = ggml_dequantize(chunk, ggml_type, K)
        forget_file_pages(chunk.data_ptr(), chunk.numel() * chunk.element_size())
        yield dense
    forget_file_pages(blocks.data_ptr(), blocks.numel() * blocks.element_size())  # the pages chunks shared


def _requantized(w: GGMLWeight, ggml_type: int, rows: int) -> GGMLWeight:
    """Each of ``w``'s parts as ``ggml_type`` blocks, kept apart as ``fuse_projections`` keeps them
    (an expert stack as one matrix of all its experts' rows: blocks never cross rows)."""
    K = w.in_features

    def convert(blocks: torch.Tensor, source_type: int) -> GGMLBlocks:
        flat = blocks.reshape(-1, blocks.shape[-1])
        out = _block_rows(_dense_rows(flat, source_type, K, rows), flat.shape[0], K, ggml_type)
        return GGMLBlocks(out.view(*blocks.shape[:-1], -1), ggml_type, K)

    return type(w)([convert(blocks, source_type) for blocks, source_type in zip(w.parts(), w.types)])


@torch.no_grad()
def requantize_blocks(model: nn.Module, scheme: str, rows: int = 4096) -> int:
    """Turn every GGML-block weight of ``model`` (a GGUF loaded with its blocks kept) into
    ``scheme``'s weights (Q8_0 blocks for int8, Q4_1 for int4), a few thousand rows at a
    time; returns how many weights it converted.

    The result is exactly what ``quantize_model(..., scheme)`` gives the dequantised float model
    (the same float values, groups never cross rows), without ever holding that model: loading the
    270M's GGUF with ``--quant int8`` peaked at 1.6 GB through the float copy (its embedding alone
    is 671 MB in float32). Each source's file pages are handed back once converted.
    """
    ggml_type, converted = CPU_BLOCK_TYPE[scheme], 0
    for module in list(model.modules()):
        for name in ("w", *getattr(module, "expert_stacks", ())):  # linear layers' weights, experts' stacks
            w = module._modules.get(name)
            if isinstance(w, GGMLWeight) and w.in_features % BLOCK == 0:
                setattr(module, name, _requantized(w, ggml_type, rows))
                converted += 1
    return converted


def quantize_model(model: nn.Module, scheme: str, group: int = DEFAULT_GROUP,
                   dtype: torch.dtype | None = None, embedding: bool = True,
                   embedding_owner: nn.Module | None = None) -> nn.Module:
    """Replace every bias-free ``nn.Linear`` (and the tied embedding/head) of ``model`` in place.

    Non-matrix parameters (norms) are cast to the compute ``dtype``; each float weight is freed as
    soon as its quantised replacement exists, so the peak is the float model plus one layer. A
    layer whose input size does not split into groups keeps its float weight. The embedding is
    ``model.embed``, or ``embedding_owner.embed`` for a model that holds its decoder inside (an
    embedding model's table, most of its weights, is only looked up: no head reads it).
    """
    if scheme not in SCHEMES:
        raise InvalidRequestError(f"unknown quantisation {scheme!r}; choose one of {', '.join(SCHEMES)} or none")
    dtype = dtype or default_compute_dtype(scheme, next(model.parameters()).device)

    def blocks(w: torch.Tensor) -> GroupedCodes | GGMLBlocks | None:
        """The kernel form of ``w`` for ``scheme`` (GGML blocks where the CPU's block kernel runs,
        int8 groups elsewhere), or None: int4 off the CPU, or a row length that does not split."""
        if w.shape[1] % BLOCK:
            return None
        if w.device.type == "cpu" and build.kernel() is not None:
            return quantize_blocks(w, CPU_BLOCK_TYPE[scheme])
        return quantize_int8_groups(w) if scheme == "int8" else None

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                w = child.weight.detach()
                if (packed := blocks(w)) is not None:
                    setattr(parent, name, GroupedLinear(packed))
                elif scheme == "int4" and (g := _fitting_group(w.shape[1], group)):
                    setattr(parent, name, Int4Linear(w, g, dtype))
                del child, w
    for module in list(model.modules()):  # a mixture's expert stacks [E, N, K]: blocks on the CPU's kernel, else float
        for name in getattr(module, "expert_stacks", ()):
            w = getattr(module, name)
            if isinstance(w, nn.Parameter) and w.device.type == "cpu" and build.kernel() is not None:
                if (packed := blocks(w.detach().flatten(0, 1))) is not None:  # all experts' rows as one matrix
                    stack = GGMLBlocks(packed.blocks.view(*w.shape[:2], -1), packed.ggml_type, packed.in_features)
                    replace_stack(module, name, GGMLExperts([stack]))
            del w
    owner = model if embedding_owner is None else embedding_owner
    if embedding and isinstance(getattr(owner, "embed", None), nn.Embedding):
        w = owner.embed.weight.detach()
        if (packed := blocks(w)) is not None:
            owner.embed = GroupedEmbedding(packed, dtype)
        elif scheme == "int4" and (g := _fitting_group(w.shape[1], group)):
            owner.embed = QuantTiedEmbedding(w, dtype, g)
        del w
    fuse_projections(model)  # q/k/v and gate/up as one block-kernel call (skips other holders)
    for p in model.parameters():  # norm weights, and any matrix that could not be grouped
        p.data = p.data.to(dtype)
    model.quant_scheme = scheme
    return model
