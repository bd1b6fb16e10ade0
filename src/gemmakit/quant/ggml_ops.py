"""Products, dequantisation and quantisation of raw GGML blocks: the block kernel (kernels/csrc/
ggml_matmul.cpp) where it is built, the same maths in torch (quant/ggml.py's dequantise, then a
float matmul) where it is not: identical results up to float32 rounding, only slower.
"""

from __future__ import annotations

import gguf
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gemmakit.kernels import build
from gemmakit.kernels.gemm import KERNEL_MAX_ROWS, linear
from gemmakit.quant.ggml import PACKABLE_TYPES, dequantize


_ggml_op = None

# ggml_matmul's activations, as the kernel numbers them: float32 keeps the products equal to
# dequantise-then-matmul; int8 rounds each block of 32 activations to 8 bits (llama.cpp's Q8_0) and
# multiplies integers; auto does that on the AVX2 and AVX-512 builds, where the integer dot is the
# faster one, and keeps float32 in the portable build (kernels/csrc/ggml_matmul.cpp).
ACTIVATIONS = {"float32": 0, "auto": 1, "int8": 2}


def register_custom_op() -> None:
    """The block matmul as the torch operator ``gemmakit::ggml_matmul``, which torch.compile can
    trace through (a plain extension call would break the compiled graph at every matmul)."""
    global _ggml_op
    if _ggml_op is not None:
        return
    build.kernel()

    @torch.library.custom_op("gemmakit::ggml_matmul", mutates_args=())
    def ggml_op(x: torch.Tensor, blocks: list[torch.Tensor], types: list[int], K: int,
                activations: int) -> torch.Tensor:
        return _ggml_dispatch(x, blocks, types, K, activations)

    @ggml_op.register_fake
    def _(x, blocks, types, K, activations):
        return x.new_empty(x.shape[0], sum(b.shape[0] for b in blocks))

    _ggml_op = ggml_op


def ggml_matmul(x: torch.Tensor, blocks: list[torch.Tensor], types: list[int], K: int,
                activations: int = 0) -> torch.Tensor:
    """``x [M, K]`` times several raw GGML matrices at once: ``[M, sum N_i]`` float32.

    ``blocks[i]`` is matrix i's rows exactly as the GGUF file stores them, ``[N_i, row_bytes]`` uint8,
    of GGML type ``types[i]``; the outputs are concatenated along the last dim in that order (so
    q/k/v in different types run as one call). With ``activations`` 0 (float32) the result equals
    dequantise-then-matmul up to float32 rounding; 1 and 2 round the activations to 8 bits where the
    kernel runs (ACTIVATIONS). The weights are never expanded.
    """
    x = x.to(torch.float32).contiguous()
    types = [int(t) for t in types]
    if torch.compiler.is_compiling():
        return torch.ops.gemmakit.ggml_matmul(x, list(blocks), types, int(K), int(activations))
    return _ggml_dispatch(x, blocks, types, int(K), int(activations))


def ggml_dequantize(blocks: torch.Tensor, ggml_type: int, K: int) -> torch.Tensor:
    """Raw GGML rows ``[N, row_bytes]`` uint8 -> ``[N, K]`` float32, bit-identical to
    ``gemmakit.quant.ggml.dequantize`` (parallel and vectorised with the kernel)."""
    ext = build.kernel() if blocks.device.type == "cpu" else None
    if ext is not None:
        return ext.ggml_dequantize(blocks.contiguous(), int(ggml_type), int(K))
    return _ggml_dequantize_torch(blocks, int(ggml_type), int(K))


def ggml_quantize(w: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Float rows ``[N, K]`` -> GGML Q8_0 (8) or Q4_1 (3) block rows ``[N, K / 32 * bytes]`` uint8,
    byte for byte what llama.cpp's reference quantiser (and gguf-py's copy of it) writes: the
    kernel's one pass per block where it is built, gguf-py's numpy version elsewhere."""
    w = w.detach().to("cpu", torch.float32)
    ext = build.kernel()
    if ext is not None:
        return ext.ggml_quantize(w.contiguous(), int(ggml_type))
    return torch.from_numpy(gguf.quants.quantize(w.numpy(), GGMLQuantizationType(ggml_type)))


def _dequantize_parts(blocks: list[torch.Tensor], types: list[int], K: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Several GGML matrices dequantised into the rows of one ``[sum N_i, K]`` weight of ``dtype``
    (float32, or bfloat16 for the bfloat16 prefill: rounded from the float32 values)."""
    ext = build.kernel() if blocks[0].device.type == "cpu" else None
    if ext is None:
        parts = [ggml_dequantize(b, t, K).to(dtype) for b, t in zip(blocks, types)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    w = torch.empty(sum(b.shape[0] for b in blocks), K, dtype=dtype)
    start = 0
    for b, t in zip(blocks, types):
        ext.ggml_dequantize_into(b.contiguous(), int(t), int(K), w[start:start + b.shape[0]])
        start += b.shape[0]
    return w


def _ggml_dispatch(x: torch.Tensor, blocks: list[torch.Tensor], types: list[int], K: int,
                   activations: int = 0) -> torch.Tensor:
    ext = build.kernel() if x.device.type == "cpu" else None
    if ext is not None:
        return ext.ggml_matmul(x, [b.contiguous() for b in blocks], types, K, activations)
    return ggml_matmul_fallback(x, blocks, types, K)


def _ggml_dequantize_torch(blocks: torch.Tensor, ggml_type: int, K: int) -> torch.Tensor:
    if ggml_type not in PACKABLE_TYPES:
        raise ValueError(f"ggml kernel: unsupported GGML type {ggml_type} "
                         f"(supported: {sorted(int(t) for t in PACKABLE_TYPES)})")
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if blocks.dim() != 2 or blocks.dtype != torch.uint8 or K <= 0 or K % block or blocks.shape[1] != K // block * size:
        raise ValueError(f"GGML {GGMLQuantizationType(ggml_type).name} blocks for K={K} must be [N, {K // block * size}] "
                         f"uint8, got {blocks.dtype} of shape {tuple(blocks.shape)}")
    return dequantize(blocks, ggml_type, (blocks.shape[0], K))


def ggml_matmul_fallback(x: torch.Tensor, blocks: list[torch.Tensor], types: list[int], K: int) -> torch.Tensor:
    """The torch-only ggml_matmul: dequantise each matrix, a float GEMM, concatenate."""
    if len(blocks) != len(types) or not blocks:
        raise ValueError(f"ggml_matmul needs one type per matrix (got {len(blocks)} matrices, {len(types)} types)")
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"ggml_matmul: x must be [M, K={K}], got shape {tuple(x.shape)}")
    x = x.to(torch.float32)
    return torch.cat([F.linear(x, _ggml_dequantize_torch(b, t, K)) for b, t in zip(blocks, types)], dim=1)


def ggml_rows(blocks: torch.Tensor, index: torch.Tensor, ggml_type: int, K: int) -> torch.Tensor:
    """Rows ``index`` of a GGML matrix as float32 ``[len(index), K]`` (an embedding lookup)."""
    return ggml_dequantize(blocks.index_select(0, index), ggml_type, K)


def ggml_linear(x: torch.Tensor, blocks: list[torch.Tensor], types: list[int], K: int,
                compute_dtype: torch.dtype = torch.float32, activations: int = 0) -> torch.Tensor:
    """``x [M, K] @ W^T`` for GGML-block parts: the block kernel for a few rows (decode reads each
    weight once, so bytes decide), a dequantised layer and a float GEMM for many (prefill is
    compute bound, and a float GEMM beats any dequantise-as-you-go loop there), in ``compute_dtype``
    (float32, or bfloat16 by request: see ``gemm.linear``); the kernel's ``activations`` as
    ``ggml_matmul`` takes them."""
    if x.shape[0] <= KERNEL_MAX_ROWS or torch.compiler.is_compiling():
        return ggml_matmul(x, blocks, types, K, activations)
    weight = _dequantize_parts(blocks, types, K, compute_dtype)
    return linear(x.to(torch.float32).contiguous(), weight, compute_dtype=compute_dtype)
