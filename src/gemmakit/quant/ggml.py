"""GGML block formats (as stored in GGUF files) dequantised with vectorised torch ops.

A GGML tensor is a flat run of fixed-size *blocks*; each block packs ``block_size`` weights of
one row as small integers plus one or two fp16 scales. We decode a slab of blocks at a time into
a preallocated output, so the only extra memory is a few slab-sized temporaries, never a
full-tensor copy in int64 or float64 (the embedding of a 262k vocabulary is 168M weights).

Numerics follow ggml exactly: scales are fp16 widened to float32 and every product/sum is one
float32 operation, in the same order as ``dequantize_row_*`` in ggml-quants.c. The result is
therefore bit-identical to ``gguf.quants.dequantize``. We never use a fused op (``addcmul``,
``addcmul_``, ``torch.lerp``) where ggml does a separate multiply and add, because a fused
multiply-add rounds once instead of twice and would differ by an ulp.

Block layouts (byte offsets within one block), learned from gguf-py's quants.py and ggml:

========  =====  ========================================================================
type      bytes  layout
========  =====  ========================================================================
Q8_0      34     d:f16 | qs:int8[32]                                 w = d*q
Q4_0      18     d:f16 | qs:u8[16] (lo nibbles = w0..15, hi = w16..31) w = d*(q-8)
Q4_1      20     d:f16 | m:f16 | qs:u8[16]                           w = d*q + m
Q5_0      22     d:f16 | qh:u8[4] (bit i = 5th bit of w_i) | qs:u8[16] w = d*(q-16)
Q5_1      24     d:f16 | m:f16 | qh:u8[4] | qs:u8[16]                w = d*q + m
Q4_K      144    d:f16 | dmin:f16 | scales:u8[12] (8x 6-bit sc, 8x 6-bit m) | qs:u8[128]
Q5_K      176    d:f16 | dmin:f16 | scales:u8[12] | qh:u8[32] | qs:u8[128]
Q6_K      210    ql:u8[128] | qh:u8[64] | scales:int8[16] | d:f16
Q2_K      84     scales:u8[16] (lo nibble sc, hi m) | qs:u8[64] | d:f16 | dmin:f16  w = d*sc*q - dmin*m
Q3_K      110    hmask:u8[32] | qs:u8[64] | scales:u8[12] (16x 6-bit) | d:f16  w = d*(sc-32)*q
IQ4_NL    18     d:f16 | qs:u8[16] (nibble order of Q4_0)            w = d*kvalues[q]
IQ4_XS    136    d:f16 | scales_h:u16 | scales_l:u8[4] | qs:u8[128]  w = d*(sc-32)*kvalues[q]
========  =====  ========================================================================
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gemmakit.errors import CheckpointError, UnsupportedModelError
from gemmakit.kernels.gemm import HALF_TYPES


__all__ = ["SUPPORTED_TYPES", "dequantize", "PACKABLE_TYPES", "HALF_TYPES", "GGMLBlocks", "ggml_blocks", "packable"]

_T = GGMLQuantizationType

# Roughly 1M output weights per slab: temporaries stay around a few MB (cache friendly, a small
# memory peak) while torch's per-op overhead stays negligible.
_SLAB_WEIGHTS = 1 << 20

_Kernel = Callable[[torch.Tensor, torch.Tensor], None]

# Performance note. torch's CPU kernels are fast on long contiguous runs and on float ops that
# broadcast a per-block scale, but slow (~10 ns per row) on small-integer ops over short strided
# rows, e.g. a shift of a [n, 16] slice of [n, 22] blocks by a broadcast [2, 1] tensor. So each
# kernel copies a block field out once, unpacks it eight weights at a time as int64 words, and
# leaves all per-element work to one contiguous int->float copy plus in-place float ops.

# byte value -> its 8 bits as 8 bytes of 0 or 16 (bit j -> byte j), for Q5_0/Q5_1's high bits.
_SPREAD_BITS = (((torch.arange(256).view(256, 1) >> torch.arange(8)) & 1) * 16).to(torch.uint8)
_SPREAD_BITS = _SPREAD_BITS.view(torch.int64).view(256)
_BYTE_ONES = 0x0101010101010101  # 1 in every byte of an int64


def _field(blocks: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bytes ``start:stop`` of every block as a fresh, contiguous, 8-byte aligned [n, stop-start]."""
    return blocks[:, start:stop].clone(memory_format=torch.contiguous_format)


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 scale at byte ``offset`` of every block, widened to float32: [n, 1]."""
    return blocks[:, offset : offset + 2].view(torch.float16).float()


def _bit_fields(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Split every byte into its ``8 // width`` fields of ``width`` bits, low field first.

    [n, g, k] contiguous uint8 (k a multiple of 8) -> [n, g, 8 // width, k] uint8, where
    [.., f, i] = (byte i >> (f * width)) & mask. This is the order ggml uses for nibbles (Q4_*),
    Q6_K's 2-bit high parts and Q5_K's high bits. The work is done on int64 words, eight
    bytes per element, with scalar shifts and masks (fast in torch, see the note above).
    """
    words = packed.view(torch.int64)  # [n, g, k // 8]
    mask = ((1 << width) - 1) * _BYTE_ONES
    fields = [words & mask] + [(words >> (f * width)) & mask for f in range(1, 8 // width)]
    return torch.stack(fields, dim=2).view(torch.uint8)


def _nibbles(blocks: torch.Tensor, start: int, groups: int) -> torch.Tensor:
    """Unpack the nibble bytes from ``start`` to the end of each block: [n, 2 * bytes] uint8.

    The bytes form ``groups`` runs; within a run the low nibbles come first, then the high ones.
    """
    packed = _field(blocks, start, blocks.shape[1])
    n = blocks.shape[0]
    return _bit_fields(packed.view(n, groups, -1), 4).view(n, -1)


def _q5_high_bits(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Q5_0/Q5_1's 4 bytes of fifth bits (bit j of byte i is weight 8i+j's) as [n, 32] of 0/16."""
    qh = _field(blocks, start, start + 4).view(-1).long()
    return _SPREAD_BITS.index_select(0, qh).view(torch.uint8).view(blocks.shape[0], 32)


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-32-weight scale and min of Q4_K/Q5_K, already multiplied by d and dmin: [n, 8, 1] each.

    Eight 6-bit scales and eight 6-bit mins live in bytes 4..15: bytes 0-3 hold sc0-3 (low 6
    bits) and the top 2 bits of sc4-7, bytes 4-7 the same for mins, bytes 8-11 the low nibbles
    of sc4-7 (low half) and m4-7 (high half).
    """
    s = blocks[:, 4:16].reshape(-1, 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], dim=1)
    mn = torch.cat([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], dim=1)
    d = _f16(blocks, 0) * sc  # float32 * uint8 -> float32, one rounding like ggml's d * sc
    m = _f16(blocks, 2) * mn
    return d.unsqueeze(-1), m.unsqueeze(-1)


# Every block format unpacks into int8 *codes* plus a float32 scale (and offset) per group, with
# ``w = scale * code + offset``: scales and offsets come out of the same float32 roundings as ggml's
# (d * sc, dmin * m). dequantize() evaluates exactly that.

def _c_q8_0(blocks):
    return blocks[:, 2:].view(torch.int8), _f16(blocks, 0), None


def _c_q4_0(blocks):
    return _nibbles(blocks, 2, 1).view(torch.int8).sub_(8), _f16(blocks, 0), None


def _c_q4_1(blocks):
    return _nibbles(blocks, 4, 1).view(torch.int8), _f16(blocks, 0), _f16(blocks, 2)


def _c_q5_0(blocks):
    q = _nibbles(blocks, 6, 1).bitwise_or_(_q5_high_bits(blocks, 2))
    return q.view(torch.int8).sub_(16), _f16(blocks, 0), None


def _c_q5_1(blocks):
    q = _nibbles(blocks, 8, 1).bitwise_or_(_q5_high_bits(blocks, 4))
    return q.view(torch.int8), _f16(blocks, 0), _f16(blocks, 2)


def _c_q4_k(blocks):
    d, m = _k_scales(blocks)
    return _nibbles(blocks, 16, 4).view(torch.int8), d.squeeze(-1), -m.squeeze(-1)


def _c_q5_k(blocks):
    n = blocks.shape[0]
    high = _bit_fields(_field(blocks, 16, 48).view(n, 1, 32), 1).view(n, 256)
    d, m = _k_scales(blocks)
    return _nibbles(blocks, 48, 4).bitwise_or_(high.bitwise_left_shift_(4)).view(torch.int8), d.squeeze(-1), -m.squeeze(-1)


def _c_q6_k(blocks):
    n = blocks.shape[0]
    low = _bit_fields(_field(blocks, 0, 128).view(n, 2, 64), 4).view(n, 256)
    high = _bit_fields(_field(blocks, 128, 192).view(n, 2, 32), 2).view(n, 256)
    q = low.bitwise_or_(high.bitwise_left_shift_(4)).view(torch.int8).sub_(32)
    return q, blocks[:, 192:208].view(torch.int8) * _f16(blocks, 208), None


def _c_q2_k(blocks):
    # Weight 128h + 32j + l is bits 2j..2j+1 of qs byte 32h + l: the order _bit_fields yields.
    n = blocks.shape[0]
    q = _bit_fields(_field(blocks, 16, 80).view(n, 2, 32), 2).view(n, 256)
    sc = blocks[:, 0:16]
    d = _f16(blocks, 80) * (sc & 0x0F)
    m = _f16(blocks, 82) * (sc >> 4)
    return q.view(torch.int8), d, -m


def _q3_k_scales(blocks: torch.Tensor) -> torch.Tensor:
    """Q3_K's sixteen 6-bit scales minus 32, as int16 [n, 16]: bytes 0-7 hold the low nibbles
    (scales 0-7 low halves, 8-15 high halves), bytes 8-11 the top two bits, 2 bits per scale in
    the order of byte i's bit pairs for scales i, i+4, i+8, i+12."""
    s = blocks[:, 96:108]
    low = torch.cat([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], dim=1)
    c = s[:, 8:12]
    high = torch.cat([c & 3, (c >> 2) & 3, (c >> 4) & 3, (c >> 6) & 3], dim=1)
    return (low | (high << 4)).to(torch.int16) - 32


def _c_q3_k(blocks):
    n = blocks.shape[0]
    low = _bit_fields(_field(blocks, 32, 96).view(n, 2, 32), 2).view(n, 256)
    # Bit 4h + j of hmask byte l is weight 128h + 32j + l's high bit; a clear bit means code - 4.
    high = _bit_fields(_field(blocks, 0, 32).view(n, 1, 32), 1).view(n, 256)
    q = low.view(torch.int8) - (high ^ 1).view(torch.int8) * 4
    return q, _f16(blocks, 108) * _q3_k_scales(blocks), None


# The sixteen non-uniform levels of IQ4_NL and IQ4_XS (ggml-common.h's kvalues_iq4nl).
_IQ4_LEVELS = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                           dtype=torch.int8)


def _c_iq4_nl(blocks):
    return _IQ4_LEVELS[_nibbles(blocks, 2, 1).long()], _f16(blocks, 0), None


def _c_iq4_xs(blocks):
    n = blocks.shape[0]
    codes = _IQ4_LEVELS[_nibbles(blocks, 8, 8).long()]
    lo = blocks[:, 4:8]
    low = torch.stack([lo & 0x0F, lo >> 4], dim=2).view(n, 8).to(torch.int16)
    hi = blocks[:, 2:4].clone().view(torch.int16).to(torch.int32) & 0xFFFF
    high = (hi >> torch.arange(0, 16, 2)) & 3
    return codes, _f16(blocks, 0) * ((low | (high << 4)) - 32), None


# type -> (unpacker, weights per scale group)
_CODES: dict[int, tuple[Callable, int]] = {
    _T.Q8_0: (_c_q8_0, 32), _T.Q4_0: (_c_q4_0, 32), _T.Q4_1: (_c_q4_1, 32), _T.Q5_0: (_c_q5_0, 32),
    _T.Q5_1: (_c_q5_1, 32), _T.Q4_K: (_c_q4_k, 32), _T.Q5_K: (_c_q5_k, 32), _T.Q6_K: (_c_q6_k, 16),
}


def _decoder(unpack: Callable, group: int) -> _Kernel:
    """Dequantise from the codes: ``out = code * scale (+ offset)``, one float32 operation each, in
    ggml's order (Q4_K's ``d * q - m`` is ``d * q + (-m)``, the same IEEE result)."""

    def decode(blocks: torch.Tensor, out: torch.Tensor) -> None:
        q, scale, offset = unpack(blocks)
        n = blocks.shape[0]
        g = out.view(n, -1, group)
        g.copy_(q.reshape(n, -1, group))
        g.mul_(scale.reshape(n, -1, 1))
        if offset is not None:
            g.add_(offset.reshape(n, -1, 1))

    return decode


# Types the block kernel decodes in a family of its own (kernels/csrc/ggml_kquants.cpp): these
# unpackers are the torch fallback's dequantisation of them.
_FAMILY_CODES: dict[int, tuple[Callable, int]] = {
    _T.Q2_K: (_c_q2_k, 16), _T.Q3_K: (_c_q3_k, 16), _T.IQ4_NL: (_c_iq4_nl, 32), _T.IQ4_XS: (_c_iq4_xs, 32),
}

_KERNELS: dict[int, _Kernel] = {t: _decoder(unpack, group) for t, (unpack, group) in {**_CODES, **_FAMILY_CODES}.items()}


def _reference_decoder(ggml_type: int) -> _Kernel:
    """gguf-py's numpy dequantisation, which follows ggml's C: the torch path of the types whose
    decoding needs ggml's lookup grids (the block kernel has its own decoders for them)."""
    qtype = GGMLQuantizationType(ggml_type)

    def decode(blocks: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype)).view(out.shape))

    return decode


# The grid types (IQ1-IQ3), the ternary types and MXFP4.
_REFERENCE_TYPES = (_T.IQ2_XXS, _T.IQ2_XS, _T.IQ2_S, _T.IQ3_XXS, _T.IQ3_S, _T.IQ1_S, _T.IQ1_M, _T.TQ1_0, _T.TQ2_0,
                    _T.MXFP4)
_KERNELS.update({int(t): _reference_decoder(t) for t in _REFERENCE_TYPES})

# Unquantised element types: just reinterpret the bytes and widen/narrow.
_PLAIN: dict[int, torch.dtype] = {_T.F32: torch.float32, _T.F16: torch.float16, _T.BF16: torch.bfloat16}

SUPPORTED_TYPES: frozenset[int] = frozenset(int(t) for t in (*_PLAIN, *_KERNELS))


def _type_name(ggml_type: int) -> str:
    try:
        return f"{GGMLQuantizationType(ggml_type).name} ({int(ggml_type)})"
    except ValueError:
        return f"unknown ({ggml_type})"


def _as_bytes(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A flat uint8 tensor sharing memory with ``raw`` (copying only if it is not contiguous)."""
    if isinstance(raw, torch.Tensor):
        data = raw.detach().contiguous().reshape(-1).view(torch.uint8)
        # Reinterpreting as fp16/fp32/int64 needs an aligned storage offset; a stray slice may lack it.
        return data.clone() if data.storage_offset() % 8 else data
    arr = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if arr.size == 0:
        return torch.empty(0, dtype=torch.uint8)
    # A read-only np.memmap is fine: we only ever read it. torch warns about writability anyway.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(arr, dtype=torch.uint8)


def _checked_blocks(raw: np.ndarray | torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor's bytes as ``[n_blocks, type_size]`` after checking type, shape and length."""
    if ggml_type not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(GGMLQuantizationType(t).name for t in SUPPORTED_TYPES))
        raise UnsupportedModelError(
            f"GGML tensor type {_type_name(ggml_type)} is not supported (supported: {supported}); "
            "use a GGUF quantised with one of those types"
        )
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    name = _type_name(ggml_type)
    if block_size > 1 and (not shape or shape[-1] % block_size):
        raise CheckpointError(
            f"GGML {name} tensor of shape {shape}: last dim must be a multiple of {block_size}; "
            "the file is corrupt"
        )
    data = _as_bytes(raw)
    expected = numel // block_size * type_size
    if data.numel() != expected:
        raise CheckpointError(
            f"GGML {name} tensor of shape {shape} needs {expected} bytes but got {data.numel()}; "
            "the file is truncated or corrupt"
        )
    return data.view(-1, type_size)


def dequantize(
    raw: np.ndarray | torch.Tensor,
    ggml_type: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode one GGML tensor's bytes into a new tensor of ``shape`` (PyTorch order) and ``dtype``.

    ``raw`` holds exactly the tensor's bytes, e.g. a slice of a read-only memmap of the file; it
    is read in slabs and never copied whole. The last dimension of ``shape`` is GGUF's ne[0],
    the contiguous one, so blocks never straddle rows.
    """
    ggml_type = int(ggml_type)
    shape = tuple(int(s) for s in shape)
    blocks = _checked_blocks(raw, ggml_type, shape)
    block_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)][0]
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if ggml_type in _PLAIN:
        return blocks.reshape(-1).view(_PLAIN[ggml_type]).to(dtype, copy=True).reshape(shape)

    out = torch.empty(numel, dtype=dtype)
    kernel = _KERNELS[ggml_type]
    slab = max(1, _SLAB_WEIGHTS // block_size)
    scratch = None if dtype == torch.float32 else torch.empty(slab * block_size, dtype=torch.float32)
    for start in range(0, blocks.shape[0], slab):
        chunk = blocks[start : start + slab]
        n = chunk.shape[0]
        dst = out[start * block_size : (start + n) * block_size]
        if scratch is None:
            kernel(chunk, dst.view(n, block_size))
        else:
            buf = scratch[: n * block_size]
            kernel(chunk, buf.view(n, block_size))
            dst.copy_(buf)
    return out.reshape(shape)


# --------------------------------------------------------------------------- blocks, not floats

# The block kernel also runs 16-bit float matrices in place (32 weights at a time): a bfloat16 or
# float16 checkpoint then keeps half of float32's memory and computes what its float32 expansion
# would, since each weight widens exactly (HALF_TYPES, kernels/gemm.py: GGML's F16 and BF16 codes).
_PLAIN16 = tuple(HALF_TYPES.values())
# Types the block kernel decodes with its block families (kernels/csrc/ggml_blocks.h) and keeps packed.
_FAMILY_TYPES: tuple[int, ...] = (*_FAMILY_CODES, _T.TQ1_0, _T.TQ2_0, _T.MXFP4)
_FAMILY_TYPES += (_T.IQ2_XXS, _T.IQ2_XS, _T.IQ2_S)  # ggml_iq2.cpp
_FAMILY_TYPES += (_T.IQ3_XXS, _T.IQ3_S, _T.IQ1_S, _T.IQ1_M)  # ggml_iq13.cpp
PACKABLE_TYPES: frozenset[int] = frozenset((*(int(t) for t in (*_CODES, *_FAMILY_TYPES)), *_PLAIN16))


def packable(ggml_type: int, shape: tuple[int, ...]) -> bool:
    """Whether a tensor can stay as it is stored on the block kernel: a matrix, or a stack of
    matrices (a mixture's experts, ``[E, N, K]``), of a quantised type, or of float16/bfloat16 with
    rows a multiple of the kernel's 32 weights."""
    ggml_type = int(ggml_type)
    if ggml_type not in PACKABLE_TYPES or len(shape) not in (2, 3):
        return False
    return ggml_type not in _PLAIN16 or int(shape[-1]) % 32 == 0


class GGMLBlocks(NamedTuple):
    """A quantised matrix ``[N, K]`` (or a stack of them, ``[E, N, K]``) exactly as a GGUF stores
    it: row n is ``K / block_size`` blocks (for F16/BF16, the row's K 16-bit floats)."""

    blocks: torch.Tensor  # [N, K / block_size * type_size] uint8 ([E, N, ...] for a stack)
    ggml_type: int
    in_features: int  # K


def ggml_blocks(raw: np.ndarray | torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> GGMLBlocks:
    """A quantised GGML matrix's bytes, checked, as ``[N, row_bytes]`` (a stack's as ``[E, N,
    row_bytes]``) *sharing* ``raw``'s memory.

    For a GGUF that memory is the file's read-only memory map: the model then holds no copy of its
    weights at all (the pages are the page cache's, read on first use, as llama.cpp does), and a
    load has no moment where the file's pages and a copy are both resident. Nothing writes to them.
    (Decoding later moves them, once, into huge pages: gemmakit/huge_pages.py.)
    """
    ggml_type = int(ggml_type)
    shape = tuple(int(s) for s in shape)
    if not packable(ggml_type, shape):
        raise UnsupportedModelError(f"GGML {_type_name(ggml_type)} {shape} cannot stay quantised")
    blocks = _checked_blocks(raw, ggml_type, shape)
    return GGMLBlocks(blocks.reshape(*shape[:-1], -1), ggml_type, shape[-1])
