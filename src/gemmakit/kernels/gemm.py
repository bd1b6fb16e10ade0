"""Matrix products on the CPU: float32 ones of many rows (prefill) on oneDNN where it beats torch's
BLAS, and bfloat16/float16 ones of a few rows (decoding) on the block kernel.

torch multiplies float32 matrices with MKL, whose kernels on AMD CPUs are its AVX2 ones; oneDNN,
which torch also ships, picks its kernels from the CPU's instruction sets. On this project's AMD EPYC
(AVX-512) oneDNN's float32 GEMM ran the prefill shapes of Gemma 3 270M at 400-430 GFLOP/s against
MKL's 150-190 (2 threads). Both are plain float32 products (no reduced-precision tricks); they differ
only in summation order, so results agree to float32 rounding.

``linear`` is ``F.linear``, taking the oneDNN path when it applies: float32 CPU tensors, no
autograd, enough rows for a GEMM to pay (decode-sized products stay with torch); a 16-bit model's
decode-sized products take the block kernel's F16/BF16 path instead; :class:`Linear` is
``nn.Linear`` running through it (what the model files build). Set ``GEMMAKIT_ONEDNN=0`` to always
use torch's own matmul.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.kernels import build


MIN_ROWS = 32  # fewer rows: memory bound, where torch's matmul is as fast and skips oneDNN's set-up
# At most this many input rows go to the block kernel (a quantised or 16-bit matrix is read once for
# all of them, so bytes decide); above it the product is compute bound and a float GEMM wins.
KERNEL_MAX_ROWS = 16
# The block kernel's type codes for 16-bit rows: GGML's F16 and BF16 (its own format numbers).
HALF_TYPES: dict[torch.dtype, int] = {torch.float16: 1, torch.bfloat16: 30}


def _enabled() -> bool:
    if os.environ.get("GEMMAKIT_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return torch.ops.mkldnn._linear_pointwise is not None
    except (AttributeError, RuntimeError):  # a torch build without the op
        return False


_ENABLED = _enabled()


def enabled() -> bool:
    """Whether float32 products of many rows take the oneDNN path."""
    return _ENABLED


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T (+ bias) -> [..., N]``.

    ``compute_dtype=torch.bfloat16`` (the bfloat16 prefill, see :func:`bf16_supported`) rounds
    ``x`` and ``weight`` to bfloat16 for the oneDNN product, which accumulates in float32 and
    returns float32: about twice float32's speed on CPUs with bfloat16 dot-product instructions.
    """
    rows = x.numel() // max(x.shape[-1], 1)
    few = _half_precision_rows(x, weight, bias, rows)
    if few is not None:
        return few
    bf16 = compute_dtype == torch.bfloat16
    weight_ok = weight.dtype == torch.float32 or (bf16 and weight.dtype == torch.bfloat16)
    if (not _ENABLED or rows < MIN_ROWS or x.dtype != torch.float32 or not weight_ok
            or x.device.type != "cpu" or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.linear(x, weight.to(x.dtype), bias)
    flat = x.reshape(rows, x.shape[-1]).contiguous()
    if not (weight.is_contiguous() or weight.t().is_contiguous()):  # oneDNN reads a transposed matrix as it is
        weight = weight.contiguous()
    if bf16:  # a bfloat16 weight (dequantised straight to it) is used as it is
        y = torch.ops.mkldnn._linear_pointwise(flat.to(torch.bfloat16), weight.to(torch.bfloat16), None,
                                               "none", [], "").float()
        y = y if bias is None else y.add_(bias)
    else:
        # oneDNN's linear on plain (dense) tensors: no copies into or out of oneDNN's own layout
        y = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


def _half_precision_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         rows: int) -> torch.Tensor | None:
    """A few rows of a bfloat16/float16 model on the CPU (decoding) through the block kernel's
    F16/BF16 path, or None where it does not apply. torch's own bfloat16 matrix-vector product ran
    at 16-33 GB/s of weights here, half the memory bandwidth the kernel reaches. Like torch's, the
    products are exact and summed in float32, then rounded once to the model's dtype."""
    if (weight.dtype not in (torch.bfloat16, torch.float16) or x.dtype != weight.dtype or x.device.type != "cpu"
            or rows > KERNEL_MAX_ROWS or weight.shape[1] % 32 or not weight.is_contiguous()
            or torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    ext = build.kernel()
    if ext is None:
        return None
    K = weight.shape[1]
    y = ext.ggml_matmul(x.reshape(rows, K).float().contiguous(), [weight.view(torch.uint8)],
                        [HALF_TYPES[weight.dtype]], K, 0)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def bf16_supported() -> bool:
    """Whether bfloat16 prefill runs here: oneDNN on, a CPU with bfloat16 dot products (AVX512_BF16
    or AMX), and oneDNN allowed to use them (``ONEDNN_MAX_CPU_ISA`` unset or at least
    AVX512_CORE_BF16). Elsewhere oneDNN emulates them, slower than float32, or (on AVX2-only
    CPUs) cannot build the product at all."""
    try:
        return (_ENABLED and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpu_has_bf16_dot()
                and _onednn_may_use_bf16())
    except (AttributeError, RuntimeError):
        return False


def _onednn_may_use_bf16() -> bool:
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    return limit in ("", "ALL") or any(tag in limit for tag in ("BF16", "AMX", "FP16", "AVX10"))


def _cpu_has_bf16_dot() -> bool:
    flags = build.cpu_flags().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Linear(nn.Linear):
    """``nn.Linear`` whose many-row float32 products on the CPU run on oneDNN (see :func:`linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
