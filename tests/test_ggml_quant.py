"""GGML block dequantisation: bit-for-bit against gguf-py's reference, on random and real blocks.

gguf-py (gguf.quants) is the reference because it mirrors ggml's C code in numpy; it can
quantise only some types, so for the rest we build random *valid* blocks as bytes: random
quant bits plus fp16 scales drawn from a sane range (random bytes there could be NaN/Inf).
"""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from gemmakit.errors import CheckpointError, UnsupportedModelError
from gemmakit.quant import ggml
from gemmakit.quant.ggml import SUPPORTED_TYPES, dequantize

# The types the block kernel decodes itself (tests/test_ggml_kernel.py takes this list), then those
# of its block families that quant/ggml.py also unpacks with torch (the fallback's dequantisation).
QUANT_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
TORCH_FAMILY_TYPES = [T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS]
ALL_TYPES = [*QUANT_TYPES, *TORCH_FAMILY_TYPES]
# Decoded by gguf-py itself where the kernel is not built (quant/ggml.py): the block kernel's own
# decoders for them are tested in test_ggml_kernel.py.
REFERENCE_TYPES = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M, T.TQ1_0, T.TQ2_0, T.MXFP4]
# Byte offsets of each block's fp16 fields (scale d, and min/dmin where the type has one).
FP16_FIELDS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2),
               T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.Q2_K: (80, 82), T.Q3_K: (108,),
               T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,), T.IQ3_XXS: (0,),
               T.IQ3_S: (0,), T.IQ1_S: (0,), T.IQ1_M: (), T.TQ1_0: (52,), T.TQ2_0: (64,), T.MXFP4: ()}


def random_blocks(qtype: T, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """[rows, bytes_per_row] uint8 of valid random blocks of ``qtype``."""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        mag = np.exp(rng.uniform(np.log(1e-4), np.log(4.0), raw.shape[0]))
        val = (mag * rng.choice([-1.0, 1.0], raw.shape[0])).astype(np.float16)
        raw[:, off : off + 2] = val.view(np.uint8).reshape(-1, 2)
    if qtype == T.MXFP4:  # the block's power-of-two scale (E8M0 byte 0), 2^-12 .. 2^3 (halved in the format)
        raw[:, 0] = rng.integers(116, 132, raw.shape[0])
    if qtype == T.IQ1_M:  # the fp16 scale is the top nibbles of the four 16-bit block scales (bytes 48..55)
        mag = np.exp(rng.uniform(np.log(1e-4), np.log(4.0), raw.shape[0]))
        d = (mag * rng.choice([-1.0, 1.0], raw.shape[0])).astype(np.float16).view(np.uint16)
        sc = raw[:, 48:56].copy().view(np.uint16) & np.uint16(0x0FFF)
        for i in range(4):
            sc[:, i] |= ((d >> np.uint16(4 * i)) & np.uint16(0xF)) << np.uint16(12)
        raw[:, 48:56] = sc.view(np.uint8)
    return raw.reshape(rows, -1)


def reference(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    return gguf.quants.dequantize(raw, qtype).reshape(shape)


def assert_bit_equal(ours: torch.Tensor, ref: np.ndarray) -> None:
    assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape
    np.testing.assert_array_equal(ours.numpy().view(np.uint32), ref.astype(np.float32).view(np.uint32))


def test_supported_types() -> None:
    assert SUPPORTED_TYPES == {int(t) for t in (T.F32, T.F16, T.BF16, *ALL_TYPES, *REFERENCE_TYPES)}
    # every quantised type with a torch unpacker, and the ternary types and MXFP4, stay as blocks
    # on the kernel (the loader dequantises none of them); F32 never does
    assert {int(t) for t in (*ALL_TYPES, T.TQ1_0, T.TQ2_0, T.MXFP4)} <= ggml.PACKABLE_TYPES <= SUPPORTED_TYPES
    assert int(T.F32) not in ggml.PACKABLE_TYPES
    assert all(ggml.packable(t, (64, 512)) and not ggml.packable(t, (512,)) for t in TORCH_FAMILY_TYPES)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols", [(1, 256), (5, 768), (64, 512)])
def test_random_blocks_match_gguf(qtype: T, rows: int, cols: int) -> None:
    raw = random_blocks(qtype, rows, cols, seed=rows * 1000 + int(qtype))
    assert_bit_equal(dequantize(raw, qtype, (rows, cols)), reference(raw, qtype, (rows, cols)))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_slab_boundaries(qtype: T, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several slabs and a short last one decode the same as one pass."""
    monkeypatch.setattr(ggml, "_SLAB_WEIGHTS", 3 * 256)
    rows, cols = 7, 1280  # 35 K-blocks or 280 small blocks: not a multiple of the slab
    raw = random_blocks(qtype, rows, cols, seed=7)
    assert_bit_equal(dequantize(raw, qtype, (rows, cols)), reference(raw, qtype, (rows, cols)))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_roundtrip_of_gguf_quantize(qtype: T) -> None:
    """Realistic blocks (quantised from normal weights by gguf) decode exactly like gguf does."""
    x = np.random.default_rng(1).standard_normal((48, 640)).astype(np.float32) * 0.05
    raw = gguf.quants.quantize(x, qtype)
    ours = dequantize(raw, qtype, x.shape)
    assert_bit_equal(ours, reference(raw, qtype, x.shape))
    assert (ours.numpy() - x).std() < 0.02  # and it is a sane approximation of x


def test_three_dims_and_torch_input() -> None:
    raw = random_blocks(T.Q4_K, 6, 512)
    ref = reference(raw, T.Q4_K, (2, 3, 512))
    assert_bit_equal(dequantize(raw, T.Q4_K, (2, 3, 512)), ref)
    assert_bit_equal(dequantize(torch.from_numpy(raw), T.Q4_K, (2, 3, 512)), ref)
    misaligned = torch.from_numpy(np.concatenate([[0], raw.ravel()]).astype(np.uint8))[1:]
    assert_bit_equal(dequantize(misaligned, T.Q4_K, (2, 3, 512)), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_dtype(dtype: torch.dtype) -> None:
    raw = random_blocks(T.Q6_K, 4, 512)
    full = dequantize(raw, T.Q6_K, (4, 512))
    low = dequantize(raw, T.Q6_K, (4, 512), dtype=dtype)
    assert low.dtype == dtype
    assert torch.equal(low, full.to(dtype))


@pytest.mark.parametrize(
    "qtype,np_dtype,torch_dtype",
    [(T.F32, np.float32, torch.float32), (T.F16, np.float16, torch.float16), (T.BF16, None, torch.bfloat16)],
    ids=["F32", "F16", "BF16"],
)
def test_plain_types_pass_through(qtype: T, np_dtype, torch_dtype: torch.dtype) -> None:
    values = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)).to(torch_dtype)
    raw = values.view(torch.uint8).numpy().copy()  # the file's bytes
    if np_dtype is not None:  # GGUFReader hands these out typed; accept that too
        assert torch.equal(dequantize(raw.view(np_dtype), qtype, (3, 40), dtype=torch_dtype), values)
    assert torch.equal(dequantize(raw, qtype, (3, 40), dtype=torch_dtype), values)
    ours = dequantize(raw, qtype, (3, 40))
    assert ours.dtype == torch.float32 and torch.equal(ours, values.float())
    assert_bit_equal(ours, reference(raw, qtype, (3, 40)))


def test_read_only_memmap_is_not_copied_or_warned_about(tmp_path) -> None:
    raw = random_blocks(T.Q8_0, 16, 256)
    path = tmp_path / "t.bin"
    path.write_bytes(b"\x00" * 3 + raw.tobytes())
    mm = np.memmap(path, mode="r", dtype=np.uint8)[3:]  # odd file offset, read-only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = dequantize(mm, T.Q8_0, (16, 256))
    assert_bit_equal(ours, reference(raw, T.Q8_0, (16, 256)))
    ours += 1  # a new, writable tensor, independent of the file
    assert np.array_equal(np.asarray(mm), raw.ravel())


def test_wrong_byte_count_is_a_checkpoint_error() -> None:
    raw = random_blocks(T.Q4_K, 2, 512)
    with pytest.raises(CheckpointError, match="needs 576 bytes but got 575"):
        dequantize(raw.ravel()[:-1], T.Q4_K, (2, 512))
    with pytest.raises(CheckpointError, match="multiple of 256"):
        dequantize(raw, T.Q4_K, (4, 288))
    with pytest.raises(CheckpointError, match="bytes"):
        dequantize(np.zeros(10, np.uint8), T.F32, (3,))


@pytest.mark.parametrize("qtype,expected", [(T.NVFP4, "NVFP4"), (T.Q8_1, "Q8_1"), (12345, "12345")])
def test_unknown_type_is_unsupported(qtype: int, expected: str) -> None:
    with pytest.raises(UnsupportedModelError, match=expected) as info:
        dequantize(np.zeros(1024, np.uint8), qtype, (4, 256))
    assert "\n" not in str(info.value)


# ---- the real Gemma 3 270M Q4_K_M file --------------------------------------------------------


@pytest.fixture(scope="module")
def real_tensors(real_model_path):
    """(name, ggml type, torch shape, raw bytes) of every tensor; GGUFReader is slow to open."""
    reader = gguf.GGUFReader(real_model_path)
    return [(t.name, int(t.tensor_type), tuple(int(d) for d in reversed(t.shape.tolist())), t.data)
            for t in reader.tensors]


def test_real_file_matches_gguf(real_tensors) -> None:
    by_type: dict[int, list] = {}
    for tensor in real_tensors:
        by_type.setdefault(tensor[1], []).append(tensor)
    assert set(by_type) <= SUPPORTED_TYPES
    assert {T.F32, T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K} <= set(by_type)
    for qtype, tensors in by_type.items():
        for name, _, shape, data in tensors[:3]:
            if name == "token_embd.weight":
                continue  # 168M weights: compared row-wise below, gguf-py takes seconds on it
            ours = dequantize(data, qtype, shape)
            assert_bit_equal(ours, gguf.quants.dequantize(data, qtype).reshape(shape))


def test_real_embedding_matches_gguf(real_tensors) -> None:
    name, qtype, shape, data = next(t for t in real_tensors if t[0] == "token_embd.weight")
    assert qtype == T.Q8_0 and shape == (262144, 640)
    ours = dequantize(data, qtype, shape)
    assert ours.shape == shape
    for rows in (slice(0, 2048), slice(131000, 131100), slice(-2048, None)):
        assert_bit_equal(ours[rows], gguf.quants.dequantize(data[rows], qtype))
