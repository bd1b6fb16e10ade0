"""The raw-GGML-block CPU kernel (kernels/csrc/ggml_matmul.cpp): dequantisation bit for bit against
gemmakit.quant.ggml.dequantize, and matmuls against a float64 reference, for every block type."""

from __future__ import annotations

import gguf
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from test_ggml_quant import QUANT_TYPES, random_blocks

from gemmakit.kernels import build
from gemmakit.quant import ggml_ops as kernels
from gemmakit.quant.ggml import PACKABLE_TYPES, dequantize


@pytest.fixture(scope="module")
def ext():
    e = build.kernel()
    if e is None:
        pytest.skip("CPU kernel unavailable")
    return e


# 16-bit float matrices run on the same kernel, in place (a bfloat16 or float16 checkpoint's)
PLAIN16 = {T.F16: torch.float16, T.BF16: torch.bfloat16}
KERNEL_TYPES = [*QUANT_TYPES, *PLAIN16]
KERNEL_TYPES += [T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS, T.TQ1_0, T.TQ2_0, T.MXFP4]  # ggml_kquants.cpp
KERNEL_TYPES += [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S]  # ggml_iq2.cpp
KERNEL_TYPES += [T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M]  # ggml_iq13.cpp
# multiplied straight from their blocks under AVX2/AVX-512 (ggml_matmul.cpp's fused_row); the rest are decoded
FUSED = {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, *PLAIN16}


def blocks_of(qtype: T, rows: int, cols: int, seed: int) -> torch.Tensor:
    if qtype in PLAIN16:  # normal values over a wide range of magnitudes, float16 subnormals included
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(rows, cols, generator=g) * torch.exp(torch.empty(rows, 1).uniform_(-12, 3, generator=g))
        return w.to(PLAIN16[qtype]).view(torch.uint8)
    return torch.from_numpy(random_blocks(qtype, rows, cols, seed=seed))


def reference(x: torch.Tensor, mats: list[tuple[torch.Tensor, int]], K: int) -> torch.Tensor:
    w = torch.cat([dequantize(b, t, (b.shape[0], K)) for b, t in mats]).double()
    return x.double() @ w.T


def assert_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = (y.double() - ref).abs().max().item()
    assert err <= 2e-5 * ref.abs().max().item(), err


def test_every_kernel_type_is_tested() -> None:
    assert {int(t) for t in KERNEL_TYPES} == set(PACKABLE_TYPES)


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda t: t.name)
def test_dequantize_bit_identical(ext, qtype: T) -> None:
    raw = blocks_of(qtype, 37, 512, seed=int(qtype))
    ours = kernels.ggml_dequantize(raw, int(qtype), 512)
    ref = dequantize(raw, qtype, (37, 512))
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))
    # and in more rows than one parallel task, with an odd number of 256-blocks per row
    raw = blocks_of(qtype, 301, 768, seed=1 + int(qtype))
    assert torch.equal(ext.ggml_dequantize(raw, int(qtype), 768).view(torch.int32),
                       dequantize(raw, qtype, (301, 768)).view(torch.int32))


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0, T.MXFP4], ids=lambda t: t.name)
def test_gguf_quantised_blocks(ext, qtype: T) -> None:
    """Blocks as gguf-py's quantiser writes them (random bytes reach digit patterns and codes a real
    file never holds; these are the ones it does): decoded as gguf-py decodes them, and multiplied."""
    w = torch.randn(64, 768, generator=torch.Generator().manual_seed(2)).numpy() * 0.05
    raw = torch.from_numpy(gguf.quants.quantize(w, qtype))
    ref = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype))
    assert torch.equal(ext.ggml_dequantize(raw, int(qtype), 768).view(torch.int32), ref.view(torch.int32))
    x = torch.randn(3, 768, generator=torch.Generator().manual_seed(3))
    assert_close(kernels.ggml_matmul(x, [raw], [int(qtype)], 768), x.double() @ ref.double().T)


@pytest.mark.parametrize("M", [1, 5])
def test_kquants_family_in_one_call(ext, M: int) -> None:
    """ggml_kquants.cpp's types in one call with fused ones: Q2_K's offsets on sums of x per 16 next
    to Q4_1's per 32, and every row as in a call of its own matrix."""
    K = 512
    kinds = [T.Q2_K, T.Q4_1, T.IQ4_NL, T.Q3_K, T.TQ1_0, T.MXFP4, T.IQ4_XS, T.TQ2_0]
    mats = [(blocks_of(t, 17 + 3 * i, K, 30 + i), int(t)) for i, t in enumerate(kinds)]
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    y = kernels.ggml_matmul(x, [b for b, _ in mats], [t for _, t in mats], K)
    assert_close(y, reference(x, mats, K))
    assert torch.equal(y, torch.cat([kernels.ggml_matmul(x, [b], [t], K) for b, t in mats], dim=1))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # gguf-py's inf for exponent 255
def test_mxfp4_every_exponent(ext) -> None:
    """MXFP4's E8M0 block scale over all 256 exponents (0 and 1 are float32 subnormals, 255 takes the
    largest codes to inf) decodes exactly as gguf-py does."""
    raw = blocks_of(T.MXFP4, 8, 1024, seed=5)  # 256 blocks
    raw.view(-1, 17)[:, 0] = torch.arange(256, dtype=torch.uint8)
    ref = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), T.MXFP4))
    assert torch.equal(ext.ggml_dequantize(raw, int(T.MXFP4), 1024).view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("qtype", list(PLAIN16), ids=lambda t: t.name)
def test_plain16_dequantised_into_bfloat16(ext, qtype: T) -> None:
    """Into bfloat16 (the opt-in bfloat16 prefill's weights): a BF16 matrix unchanged, an F16 one
    rounded as torch rounds it."""
    raw = blocks_of(qtype, 37, 512, seed=3)
    w = torch.empty(37, 512, dtype=torch.bfloat16)
    ext.ggml_dequantize_into(raw, int(qtype), 512, w)
    assert torch.equal(w.view(torch.int16), raw.view(PLAIN16[qtype]).to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9, 16, 17])
def test_matmul_matches_float64(ext, qtype: T, M: int) -> None:
    K = 768  # 3 superblocks: not a multiple of the kernel's 4-way unroll for 256-blocks
    raw = blocks_of(qtype, 100, K, seed=M * 100 + int(qtype))
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    y = kernels.ggml_matmul(x, [raw], [int(qtype)], K)
    assert_close(y, reference(x, [(raw, int(qtype))], K))


def int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel's int8 activations see it: each 32 rounded to the nearest multiple of d =
    max|x| / 127 (llama.cpp's Q8_0 for activations), computed here in torch."""
    blocks = x.view(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return (torch.round(blocks * inv) * d).view_as(x)


QUANTISED = [t for t in KERNEL_TYPES if t not in PLAIN16]


@pytest.mark.parametrize("qtype", QUANTISED, ids=lambda t: t.name)
@pytest.mark.parametrize("M", [1, 2, 5])
@pytest.mark.parametrize("K", [768, 800])
def test_int8_activations(ext, qtype: T, M: int, K: int) -> None:
    """activations=2: the dequantised weights times the int8-rounded activations, up to float32
    rounding (the integer dot products themselves are exact); 1 (auto) is that on the SIMD builds
    and the float32 product in the portable one."""
    if K % GGML_QUANT_SIZES[qtype][0]:
        pytest.skip("K=800 is not a whole number of 256-blocks")
    raw = blocks_of(qtype, 70, K, seed=M + int(qtype))
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M + K))
    ref8 = reference(int8_rounded(x), [(raw, int(qtype))], K)
    y8 = kernels.ggml_matmul(x, [raw], [int(qtype)], K, activations=2)
    assert_close(y8, ref8)
    y32 = kernels.ggml_matmul(x, [raw], [int(qtype)], K, activations=0)
    assert not torch.allclose(y8, y32, rtol=0, atol=1e-6 * y32.abs().max().item())  # it did round
    auto = kernels.ggml_matmul(x, [raw], [int(qtype)], K, activations=1)
    assert torch.equal(auto, y32 if ext.ggml_simd() == "scalar" else y8)


@pytest.mark.parametrize("qtype", QUANTISED, ids=lambda t: t.name)
def test_default_activations_do_not_depend_on_the_batch(ext, qtype: T) -> None:
    """The default (auto) products give each row of x the same numbers alone as among 6 rows (every
    remainder of the 4-row passes), so that a sequence decodes alike in any batch."""
    K = 512
    raw = blocks_of(qtype, 37, K, seed=int(qtype))
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(int(qtype)))
    together = kernels.ggml_matmul(x, [raw], [int(qtype)], K, activations=1)
    for m in range(6):
        assert torch.equal(together[m:m + 1], kernels.ggml_matmul(x[m:m + 1], [raw], [int(qtype)], K, activations=1))


@pytest.mark.parametrize("M", [3, 4, 6])
def test_int8_activations_mixed_call(ext, M: int) -> None:
    """activations=2 for the fused types mixed in one call (each multiplied from its blocks with int8
    activations), every remainder of M by four: the dequantised weights times the rounded x."""
    K = 1024
    kinds = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K]
    mats = [(blocks_of(t, 21 + 2 * i, K, 40 + i), int(t)) for i, t in enumerate(kinds)]
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(40 + M))
    y = kernels.ggml_matmul(x, [b for b, _ in mats], [t for _, t in mats], K, activations=2)
    assert_close(y, reference(int8_rounded(x), mats, K))


def test_matmul_large_parallel(ext) -> None:
    """Enough rows for several tasks per thread and many row tiles, and a short K (one block)."""
    for K, N in [(2048, 700), (32, 1000)]:
        raw = blocks_of(T.Q4_1, N, K, seed=K)
        x = torch.randn(3, K, generator=torch.Generator().manual_seed(K))
        assert_close(kernels.ggml_matmul(x, [raw], [int(T.Q4_1)], K), reference(x, [(raw, int(T.Q4_1))], K))


@pytest.mark.parametrize("M", [1, 3])
def test_matrices_read_as_interleaved_streams(ext, M: int) -> None:
    """A thread's rows of a matrix over 1 MB are read as four interleaved runs (row counts not a
    multiple of four, a matrix boundary inside a thread's rows): every row as in a small call."""
    K = 1024
    mats = [(blocks_of(T.Q8_0, 2051, K, 21), int(T.Q8_0)), (blocks_of(T.Q4_K, 3003, K, 22), int(T.Q4_K))]
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    y = kernels.ggml_matmul(x, [b for b, _ in mats], [t for _, t in mats], K)
    assert_close(y, reference(x, mats, K))
    pieces = [kernels.ggml_matmul(x, [b[i:i + 500]], [t], K) for b, t in mats for i in range(0, b.shape[0], 500)]
    assert torch.equal(y, torch.cat(pieces, dim=1))


@pytest.mark.parametrize("M", [1, 4, 7])
def test_multi_matrix_call(ext, M: int) -> None:
    K = 512
    mats = [(blocks_of(T.Q5_0, 96, K, 1), int(T.Q5_0)), (blocks_of(T.Q5_0, 40, K, 2), int(T.Q5_0)),
            (blocks_of(T.Q8_0, 57, K, 3), int(T.Q8_0))]
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(5))
    y = kernels.ggml_matmul(x, [b for b, _ in mats], [t for _, t in mats], K)
    assert y.shape == (M, 96 + 40 + 57)
    assert_close(y, reference(x, mats, K))
    parts = torch.cat([kernels.ggml_matmul(x, [b], [t], K) for b, t in mats], dim=1)
    assert torch.equal(y, parts)
    # the K-quant types mixed in one call, too
    kmats = [(blocks_of(t, 33 + i, K, 10 + i), int(t)) for i, t in enumerate([T.Q4_K, T.Q6_K, T.Q5_K, T.Q4_0])]
    assert_close(kernels.ggml_matmul(x, [b for b, _ in kmats], [t for _, t in kmats], K), reference(x, kmats, K))


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda t: t.name)
def test_fallback_path(qtype: T) -> None:
    K = 512
    mats = [(blocks_of(qtype, 50, K, 4), int(qtype)), (blocks_of(T.Q8_0, 21, K, 6), int(T.Q8_0))]
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(6))
    y = kernels.ggml_matmul_fallback(x, [b for b, _ in mats], [t for _, t in mats], K)
    assert_close(y, reference(x, mats, K))
    raw = mats[0][0]
    assert torch.equal(kernels._ggml_dequantize_torch(raw, int(qtype), K), dequantize(raw, qtype, (50, K)))


def test_kernel_disabled_uses_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "kernel", lambda: None)
    raw = blocks_of(T.Q4_K, 20, 256, 8)
    x = torch.randn(2, 256)
    assert_close(kernels.ggml_matmul(x, [raw], [int(T.Q4_K)], 256), reference(x, [(raw, int(T.Q4_K))], 256))
    assert torch.equal(kernels.ggml_dequantize(raw, int(T.Q4_K), 256), dequantize(raw, T.Q4_K, (20, 256)))


def test_errors(ext) -> None:
    x = torch.randn(2, 256)
    q8 = blocks_of(T.Q8_0, 10, 256, 9)
    with pytest.raises(RuntimeError, match="unsupported GGML type 9"):
        ext.ggml_matmul(x, [q8], [9], 256, 0)  # Q8_1 (an activation format) is not a type the kernel runs
    with pytest.raises(RuntimeError, match="unsupported GGML type 99"):
        ext.ggml_dequantize(q8, 99, 256)
    with pytest.raises(RuntimeError, match="row of K=256 weights has 272 bytes"):
        ext.ggml_matmul(x, [q8[:, :-34].contiguous()], [int(T.Q8_0)], 256, 0)
    with pytest.raises(RuntimeError, match="row of K=256 weights has 144 bytes"):
        ext.ggml_matmul(x, [q8], [int(T.Q4_K)], 256, 0)  # Q8_0 rows passed as Q4_K
    with pytest.raises(RuntimeError, match="K=250"):
        ext.ggml_dequantize(q8, int(T.Q8_0), 250)
    with pytest.raises(RuntimeError, match="x has 256 columns but K=512"):
        ext.ggml_matmul(x, [q8], [int(T.Q8_0)], 512, 0)
    with pytest.raises(RuntimeError, match="one type per matrix"):
        ext.ggml_matmul(x, [q8, q8], [int(T.Q8_0)], 256, 0)
    with pytest.raises(RuntimeError, match="uint8"):
        ext.ggml_matmul(x, [q8.view(torch.int8)], [int(T.Q8_0)], 256, 0)
    # the torch fallback refuses the same inputs
    with pytest.raises(ValueError, match="unsupported GGML type 9"):
        kernels.ggml_matmul_fallback(x, [q8], [9], 256)
    with pytest.raises(ValueError, match=r"must be \[N, 144\]"):
        kernels.ggml_matmul_fallback(x, [q8], [int(T.Q4_K)], 256)


def test_custom_op_traces_under_compile(ext) -> None:
    kernels.register_custom_op()
    raw = blocks_of(T.Q6_K, 48, 256, 11)
    x = torch.randn(2, 256)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return kernels.ggml_matmul(x * 2, [raw], [int(T.Q6_K)], 256) + 1

    assert_close(f(x), reference(x * 2, [(raw, int(T.Q6_K))], 256) + 1)
