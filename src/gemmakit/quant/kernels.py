"""gemmakit's optional compiled CPU kernels, and the pure-torch fallbacks that compute the same.

torch has no kernel that multiplies by GGML blocks (int codes with a float16 scale, and for some
formats a minimum, per block of 32 or 256 inputs), which is how every quantised GGUF stores its
weights. gemmakit ships a few small C++ files (csrc/: the block matmul, one-query attention, the
norms, RoPE, the MLP's GELU, the Q8_0/Q4_1 quantiser, the tokenizer's BPE and a fused decoding
step) and compiles them on first use with torch's own extension builder (needs a C++ compiler and
the Python headers; up to a minute, once: the build is cached under ~/.cache/torch_extensions).
Without a compiler, or with ``GEMMAKIT_KERNELS=0``, the same maths runs as dequantise-then-matmul
in torch: identical results up to float32 rounding, only slower.

The kernels are built for the CPU they run on (``-march=native``: AVX-512 where it has it, else
AVX2). ``GEMMAKIT_CPU_ISA=avx2`` builds them for AVX2 (``-march=haswell``) and hides the CPU's
AVX-512 and AMX features from gemmakit's own checks, so an AVX-512 machine can exercise the AVX2
paths; with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` torch's kernels follow suit.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

_CSRC = Path(__file__).parent / "csrc"
# One extension: raw GGML blocks (ggml_matmul.cpp), one-query attention (decode_attention.cpp),
# RMSNorm (rms_norm.cpp), QK-norm + RoPE (rope.cpp), the MLP's GELU(gate) * up (gelu_mul.cpp), float
# rows -> Q8_0 / Q4_1 blocks (ggml_quantize.cpp), SentencePiece's BPE over a compact vocabulary
# (bpe.cpp), a decoding step's layers in one call (decode_step.cpp/.h), and the Python module (module.cpp).
_SOURCES = [_CSRC / "ggml_matmul.cpp", _CSRC / "decode_attention.cpp", _CSRC / "rms_norm.cpp", _CSRC / "rope.cpp",
            _CSRC / "gelu_mul.cpp", _CSRC / "ggml_quantize.cpp", _CSRC / "bpe.cpp", _CSRC / "decode_step.cpp",
            _CSRC / "module.cpp"]
_HEADERS = [_CSRC / "decode_step.h", _CSRC / "bpe.h", _CSRC / "rows.h"]  # part of the build's fingerprint, not compiled on their own
_lock = threading.Lock()
_module = None
_tried = False

# Above this many input rows the matmul is compute bound and a float GEMM on the dequantised weight wins.
KERNEL_MAX_ROWS = 16


def kernel():
    """The compiled extension module, or None where it cannot be built (reason printed once)."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("GEMMAKIT_KERNELS", "1") == "0":
            return None
        try:
            from torch.utils.cpp_extension import load

            _ninja_on_path()
            if not _is_built():
                print("gemmakit: building the CPU kernels (quantised weights, tokenizer; once, up to a minute)...",
                      file=sys.stderr, flush=True)
            _module = load(name=_build_name(), sources=[str(p) for p in _SOURCES],
                           extra_cflags=["-O3", f"-march={_MARCH[cpu_isa()]}", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           verbose=False)
        except Exception as e:  # no compiler, no Python headers, unusual platform
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"gemmakit: warning: CPU kernel unavailable ({first}); using the slower torch fallback "
                  "(set GEMMAKIT_KERNELS=0 to skip the build attempt)", file=sys.stderr)
            _module = None
    return _module


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the pip package's binary may not be there when the
    venv is not activated (e.g. ``.venv/bin/gemmakit`` called directly)."""
    import shutil

    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except (ImportError, AttributeError):
            pass


# GEMMAKIT_CPU_ISA -> the compiler's -march: the machine's own instruction sets, or AVX2 + FMA + F16C.
_MARCH = {"native": "native", "avx2": "haswell"}


def cpu_isa() -> str:
    """``GEMMAKIT_CPU_ISA``: "native" (the default) or "avx2"; anything else is refused, since a
    silently ignored spelling would test the wrong kernels."""
    isa = os.environ.get("GEMMAKIT_CPU_ISA", "native").strip().lower() or "native"
    if isa not in _MARCH:
        raise ValueError(f"GEMMAKIT_CPU_ISA={isa!r} is not one of {', '.join(_MARCH)}")
    return isa


def _build_name() -> str:
    # The sources', the CPU's and the target ISA's fingerprint in the name: an edited kernel, or a
    # home directory shared with another CPU (the build uses -march=native), never loads a stale
    # cached build.
    import hashlib
    import platform

    cpu = platform.machine() + _proc_cpu_flags() + cpu_isa()
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in _SOURCES + _HEADERS) + cpu.encode()).hexdigest()[:12]
    return f"gemmakit_kernels_{digest}"


def cpu_flags() -> str:
    """The CPU's feature flags as gemmakit may use them: /proc/cpuinfo's flags line ('' where there
    is none), less AVX-512, AMX and AVX-VNNI under ``GEMMAKIT_CPU_ISA=avx2``. What tells whether
    bfloat16 prefill can pay (models/gemm.py)."""
    flags = _proc_cpu_flags()
    if cpu_isa() == "avx2":
        flags = " ".join(f for f in flags.split() if not f.startswith(("avx512", "amx", "avx_vnni")))
    return flags


def _proc_cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _is_built() -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    try:
        build = Path(_get_build_directory(_build_name(), verbose=False))
    except Exception:
        return False
    return any(build.glob("*.so"))


_custom_op = None


def register_custom_op():
    """The kernels as torch operators (``gemmakit::ggml_matmul``, ``gemmakit::decode_attention``),
    which torch.compile can trace through (a plain extension call would break the compiled graph at
    every matmul)."""
    global _custom_op
    if _custom_op is None:
        kernel()

        @torch.library.custom_op("gemmakit::ggml_matmul", mutates_args=())
        def ggml_op(x: torch.Tensor, blocks: list[torch.Tensor], types: list[int], K: int) -> torch.Tensor:
            return _ggml_dispatch(x, blocks, types, K)

        @ggml_op.register_fake
        def _(x, blocks, types, K):
            return x.new_empty(x.shape[0], sum(b.shape[0] for b in blocks))

        @torch.library.custom_op("gemmakit::decode_attention", mutates_args=())
        def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                         softcap: float) -> torch.Tensor:
            return kernel().decode_attention(q, k, v, bias, scale, softcap)

        @attention_op.register_fake
        def _(q, k, v, bias, scale, softcap):
            return torch.empty_like(q)

        _custom_op = ggml_op
    return _custom_op


# --------------------------------------------------------------------------- raw GGML blocks


def ggml_matmul(x: torch.Tensor, blocks: list[torch.Tensor], types: list[int], K: int) -> torch.Tensor:
    """``x [M, K]`` times several raw GGML matrices at once: ``[M, sum N_i]`` float32.

    ``blocks[i]`` is matrix i's rows exactly as the GGUF file stores them, ``[N_i, row_bytes]`` uint8,
    of GGML type ``types[i]``; the outputs are concatenated along the last dim in that order (so
    q/k/v in different types run as one call). The result equals dequantise-then-matmul up to float32
    rounding; the weights are never expanded.
    """
    x = x.to(torch.float32).contiguous()
    types = [int(t) for t in types]
    if torch.compiler.is_compiling():
        return torch.ops.gemmakit.ggml_matmul(x, list(blocks), types, int(K))
    return _ggml_dispatch(x, blocks, types, int(K))


def ggml_dequantize(blocks: torch.Tensor, ggml_type: int, K: int) -> torch.Tensor:
    """Raw GGML rows ``[N, row_bytes]`` uint8 -> ``[N, K]`` float32, bit-identical to
    ``gemmakit.quant.ggml.dequantize`` (parallel and vectorised with the kernel)."""
    ext = kernel() if blocks.device.type == "cpu" else None
    if ext is not None:
        return ext.ggml_dequantize(blocks.contiguous(), int(ggml_type), int(K))
    return _ggml_dequantize_torch(blocks, int(ggml_type), int(K))


def ggml_quantize(w: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Float rows ``[N, K]`` -> GGML Q8_0 (8) or Q4_1 (3) block rows ``[N, K / 32 * bytes]`` uint8,
    byte for byte what llama.cpp's reference quantiser (and gguf-py's copy of it) writes: the
    kernel's one pass per block where it is built, gguf-py's numpy version elsewhere."""
    w = w.detach().to("cpu", torch.float32)
    ext = kernel()
    if ext is not None:
        return ext.ggml_quantize(w.contiguous(), int(ggml_type))
    import gguf

    return torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType(ggml_type)))


def _dequantize_parts(blocks: list[torch.Tensor], types: list[int], K: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Several GGML matrices dequantised into the rows of one ``[sum N_i, K]`` weight of ``dtype``
    (float32, or bfloat16 for the bfloat16 prefill: rounded from the float32 values)."""
    ext = kernel() if blocks[0].device.type == "cpu" else None
    if ext is None:
        parts = [ggml_dequantize(b, t, K).to(dtype) for b, t in zip(blocks, types)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    w = torch.empty(sum(b.shape[0] for b in blocks), K, dtype=dtype)
    start = 0
    for b, t in zip(blocks, types):
        ext.ggml_dequantize_into(b.contiguous(), int(t), int(K), w[start:start + b.shape[0]])
        start += b.shape[0]
    return w


def _ggml_dispatch(x: torch.Tensor, blocks: list[torch.Tensor], types: list[int], K: int) -> torch.Tensor:
    ext = kernel() if x.device.type == "cpu" else None
    if ext is not None:
        return ext.ggml_matmul(x, [b.contiguous() for b in blocks], types, K)
    return ggml_matmul_fallback(x, blocks, types, K)


def _ggml_dequantize_torch(blocks: torch.Tensor, ggml_type: int, K: int) -> torch.Tensor:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from gemmakit.quant.ggml import PACKABLE_TYPES, dequantize

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
                compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x [M, K] @ W^T`` for GGML-block parts: the block kernel for a few rows (decode reads each
    weight once, so bytes decide), a dequantised layer and a float GEMM for many (prefill is
    compute bound, and a float GEMM beats any dequantise-as-you-go loop there), in ``compute_dtype``
    (float32, or bfloat16 by request: see ``gemm.linear``)."""
    if x.shape[0] <= KERNEL_MAX_ROWS or torch.compiler.is_compiling():
        return ggml_matmul(x, blocks, types, K)
    from gemmakit.models.gemm import linear

    weight = _dequantize_parts(blocks, types, K, compute_dtype)
    return linear(x.to(torch.float32).contiguous(), weight, compute_dtype=compute_dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                     softcap: float | None) -> torch.Tensor | None:
    """One-query attention ``q [B, H, 1, D]`` over ``k, v [B, Hkv, S, D]`` with an additive mask
    ``bias [B, 1, 1, S]`` (float32, CPU) in the kernel, or None where the kernel cannot run it."""
    if q.dtype != torch.float32 or k.dtype != torch.float32 or q.device.type != "cpu":
        return None  # e.g. a bfloat16 model, compiled or not: SDPA
    if torch.compiler.is_compiling():
        return torch.ops.gemmakit.decode_attention(q, k, v, bias, scale, softcap or 0.0)
    ext = kernel()
    return None if ext is None else ext.decode_attention(q, k, v, bias, scale, softcap or 0.0)


def _eager_float32_kernel(*tensors: torch.Tensor):
    """The kernel module for an elementwise-style call on float32 CPU ``tensors`` outside compiled
    graphs and autograd (see :func:`rms_norm` for why those keep torch's ops), else None."""
    if (any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors)
            or torch.compiler.is_compiling() or torch.is_grad_enabled()):
        return None
    return kernel()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Gemma's RMSNorm of float32 CPU ``x`` in one kernel call, or None where the kernel does not apply:
    other dtypes or devices, inside a compiled graph (the compiler fuses it anyway), and with autograd
    on (generation runs without it; training and a plain ``model(ids)`` keep torch's ops, so the two
    never mix within one forward and LoRA at B = 0 reproduces its base bit for bit)."""
    ext = _eager_float32_kernel(x, weight)
    return None if ext is None else ext.rms_norm(x, weight, eps)


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``gelu_tanh(gate) * up`` for float32 CPU ``[..., N]`` halves in one kernel pass, or None where
    the kernel does not apply (the same rule as :func:`rms_norm`: other dtypes or devices, compiled
    graphs, autograd on). Equal to torch's ops up to float32 rounding (quant/csrc/gelu_mul.cpp)."""
    ext = _eager_float32_kernel(gate, up)
    if ext is None:
        return None
    N = gate.shape[-1]
    return ext.gelu_mul(gate.reshape(-1, N), up.reshape(-1, N)).view(gate.shape)


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
              sin: torch.Tensor) -> torch.Tensor | None:
    """Optional RMSNorm of each head vector, then the rotary embedding, of ``x [B, H, T, D]`` in one
    kernel call; None where it does not apply (the same conditions as :func:`rms_norm`)."""
    ext = _eager_float32_kernel(x, cos, sin, *([] if weight is None else [weight]))
    if ext is None:
        return None
    return ext.norm_rope(x, weight if weight is not None else torch.empty(0), eps, cos, sin)
