"""A fast, read-only parser of GGUF v2/v3 files (llama.cpp's checkpoint format).

Why not ``gguf.GGUFReader``: it builds a numpy view for every field part, so opening a model
with a 262k-token vocabulary takes ~15 s. Here the header is parsed with ``struct`` straight
from a memory map (a string array is one tight loop, a numeric array one ``np.frombuffer``), and
tensor data stays in the map: opening costs well under a second and no weight is read until a
loader touches it.

Layout (little-endian; see gguf-py's ``constants.py`` / llama.cpp's ``gguf.md``)::

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count   x (string key | u32 value_type | value)
    tensor_count x (string name | u32 n_dims | n_dims x u64 ne | u32 ggml_type | u64 offset)
    padding to `general.alignment` (default 32) | tensor data (offsets relative to here)

A string is ``u64 length | utf-8 bytes``; an array is ``u32 item_type | u64 count | items``.
``ne`` lists the fastest-varying dimension first, so PyTorch's shape is ``ne`` reversed.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from gemmakit.errors import CheckpointError, ModelNotFoundError
from gemmakit.heap import forget_file_pages, map_file_pages

SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and lengths; nothing current writes it
_MAX_DIMS = 4  # GGML_MAX_DIMS in ggml.h
_MAX_ARRAY_NESTING = 8  # no writer nests arrays; a cap keeps a crafted file from exhausting the stack

# Fixed-size scalar value types -> little-endian numpy dtype (also gives struct size).
_NUMPY_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
    GGUFValueType.BOOL: np.dtype("?"),
}
_STRUCT_FORMATS: dict[GGUFValueType, struct.Struct] = {
    t: struct.Struct("<" + {"u1": "B", "i1": "b", "u2": "H", "i2": "h", "u4": "I", "i4": "i", "u8": "Q",
                            "i8": "q", "f4": "f", "f8": "d", "b1": "?"}[dt.str[1:]])
    for t, dt in _NUMPY_DTYPES.items()
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_FIRST_READ = 1 << 20  # most headers fit; a big vocabulary grows the buffer a few times


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's description plus a zero-copy view of its (possibly quantised) bytes."""

    name: str
    shape: tuple[int, ...]  # PyTorch order (GGUF dims reversed): token_embd.weight -> (vocab, hidden)
    ggml_type: int  # a gguf.GGMLQuantizationType value
    raw: np.ndarray  # uint8 view into the file's memory map; nothing is read until it is touched
    file_offset: int = 0  # where raw starts in the file (the map covers the whole file)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    def release(self) -> None:
        """Drop this tensor's file pages from the process's memory once they have been decoded.

        The map is read-only and file-backed, so the kernel may simply forget the pages (they would
        be read again if touched); without this a load's peak RSS holds the whole file on top of
        the model built from it.
        """
        if getattr(self.raw, "_mmap", None) is not None:  # a view of the file's map, not a copy
            forget_file_pages(self.raw.ctypes.data, self.raw.nbytes)

    def populate(self) -> None:
        """Map this tensor's file pages into the process now, for tensors used in place: one call at
        load instead of a page fault per 64 KB the first time each is read (~9 ms of the first
        prefill's LM head for a 178 MB embedding). llama.cpp maps its weights the same way
        (MAP_POPULATE). See ``heap.map_file_pages``."""
        if getattr(self.raw, "_mmap", None) is not None:
            map_file_pages(self.raw.ctypes.data, self.raw.nbytes)


@dataclass(frozen=True)
class GGUFFile:
    """Everything in a GGUF file: metadata key/values and tensors (backed by an np.memmap)."""

    path: Path
    metadata: dict[str, Any]  # scalars as str/int/float/bool; arrays as list[str] or np.ndarray
    tensors: dict[str, GGUFTensor]
    version: int = 3

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{self.path}: GGUF metadata has no general.architecture string")
        return arch


class _Malformed(Exception):
    """Internal: the header is inconsistent; turned into a CheckpointError naming the file."""


class _Cursor:
    """Bounds-checked sequential reads of the header, so a bad file never escapes as struct.error.

    The header is read into a growing ``bytes`` (not read through the memory map): slicing and
    decoding ``bytes`` is ~40% faster than a memoryview, which matters for 262k vocabulary strings.
    """

    def __init__(self, file: BinaryIO, size: int) -> None:
        self.file = file
        self.size = size
        self.buf = file.read(min(size, _FIRST_READ))
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        end = self.pos + n
        if n < 0 or end > self.size:
            raise _Malformed(f"truncated: {what} at byte {self.pos} runs past the end of the file ({self.size} bytes)")
        if end > len(self.buf):
            self.grow(end)

    def grow(self, end: int) -> None:
        """Read more of the file so that ``buf`` covers ``end`` (at least doubling, to amortise)."""
        want = min(self.size, max(end, 2 * len(self.buf)))
        self.file.seek(len(self.buf))
        self.buf += self.file.read(want - len(self.buf))
        if len(self.buf) < end:
            raise _Malformed(f"truncated: the file ended while reading byte {end}")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(what)
        self.need(n, what)
        start = self.pos
        self.pos += n
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"{what} at byte {start} is not valid UTF-8") from None

    def value_type(self, what: str) -> GGUFValueType:
        code = self.u32(what)
        try:
            return GGUFValueType(code)
        except ValueError:
            raise _Malformed(f"{what} has unknown value type {code} at byte {self.pos - 4}") from None

    def value(self, vtype: GGUFValueType, what: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what)
        fmt = _STRUCT_FORMATS[vtype]
        self.need(fmt.size, what)
        (v,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return v

    def array(self, what: str, depth: int = 0) -> list[Any] | np.ndarray:
        if depth > _MAX_ARRAY_NESTING:
            raise _Malformed(f"{what} nests arrays more than {_MAX_ARRAY_NESTING} deep")
        item_type = self.value_type(f"{what} (array item type)")
        count = self.u64(f"{what} (array length)")
        if item_type in _NUMPY_DTYPES:
            dtype = _NUMPY_DTYPES[item_type]
            self.need(count * dtype.itemsize, what)
            out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += count * dtype.itemsize
            return out
        if item_type == GGUFValueType.STRING:
            return self.string_array(count, what)
        self.need(count * 12, what)  # each nested array is at least a u32 type and a u64 count
        return [self.array(what, depth + 1) for _ in range(count)]

    def string_array(self, count: int, what: str) -> list[str]:
        # The hot loop of opening a model (one iteration per vocabulary token): locals only.
        self.need(count * 8, what)
        buf, pos = self.buf, self.pos
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(count):
            if pos + 8 > len(buf):
                self.pos = pos
                self.need(8, f"{what} item {i}")
                buf = self.buf
            (n,) = unpack(buf, pos)
            pos += 8
            end = pos + n
            if end > len(buf):
                self.pos = pos
                self.need(n, f"{what} item {i}")
                buf = self.buf
            try:
                append(buf[pos:end].decode("utf-8"))
            except UnicodeDecodeError:
                raise _Malformed(f"{what}: item {i} at byte {pos} is not valid UTF-8") from None
            pos = end
        self.pos = pos
        return out


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header and map its tensor data (read lazily through np.memmap)."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    if size < 24:  # magic + version + two u64 counts
        raise CheckpointError(f"{path}: not a GGUF file (only {size} bytes; truncated or empty)")
    try:
        with path.open("rb") as file:
            return _parse(path, _Cursor(file, size))
    except _Malformed as e:
        raise CheckpointError(f"{path}: bad GGUF file: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read GGUF file: {e.strerror or e}") from None


def _parse(path: Path, cur: _Cursor) -> GGUFFile:
    magic = cur.u32("magic")
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (magic bytes {cur.buf[:4]!r}, expected b'GGUF')")
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF and not version & 0xFFFF0000:
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (gemmakit reads v2 and v3)")
        raise CheckpointError(f"{path}: big-endian or corrupt GGUF (version field {version:#x}); "
                              "re-convert it as a little-endian GGUF")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    cur.need(n_kv * 13, "metadata")  # smallest KV: empty key (8) + type (4) + u8 value (1)

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.value_type(f"metadata {key!r}")
        if key in metadata:
            raise _Malformed(f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")

    cur.need(n_tensors * 24, "tensor infos")  # smallest info: empty name + n_dims + type + offset
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}")
        n_dims = cur.u32(f"tensor {name!r} dimension count")
        if n_dims > _MAX_DIMS:
            raise _Malformed(f"tensor {name!r} has {n_dims} dimensions (GGUF allows at most {_MAX_DIMS})")
        cur.need(8 * n_dims, f"tensor {name!r} shape")
        ne = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
        cur.pos += 8 * n_dims
        ggml_type = cur.u32(f"tensor {name!r} type")
        offset = cur.u64(f"tensor {name!r} offset")
        infos.append((name, tuple(reversed(ne)), ggml_type, offset))

    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise _Malformed(f"general.alignment {alignment!r} is not a positive power of two")
    data_start = -(-cur.pos // alignment) * alignment
    mm = np.memmap(path, dtype=np.uint8, mode="r")  # tensor bytes stay on disk until touched

    tensors: dict[str, GGUFTensor] = {}
    for name, shape, ggml_type, offset in infos:
        if name in tensors:
            raise _Malformed(f"tensor {name!r} appears twice")
        nbytes = _tensor_nbytes(name, shape, ggml_type)
        if offset % alignment:
            raise _Malformed(f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}")
        start = data_start + offset
        if start + nbytes > mm.shape[0]:
            raise _Malformed(f"truncated: tensor {name!r} needs bytes {start}..{start + nbytes} "
                             f"but the file has {mm.shape[0]}")
        tensors[name] = GGUFTensor(name=name, shape=shape, ggml_type=ggml_type, raw=mm[start:start + nbytes],
                                   file_offset=start)
    return GGUFFile(path=path, metadata=metadata, tensors=tensors, version=version)


def _tensor_nbytes(name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _Malformed(f"tensor {name!r} has unknown ggml type {ggml_type} (a newer gguf package may know it)") from None
    n = math.prod(shape)  # Python ints: garbage dims cannot overflow into a small number
    inner = shape[-1] if shape else 1  # GGUF's ne[0]: blocks run along the fastest dimension
    if inner % block_size:
        raise _Malformed(f"tensor {name!r}: row length {inner} is not a multiple of {qtype.name}'s block size {block_size}")
    return n // block_size * type_size
