"""Building gemmakit's optional compiled CPU kernels (csrc/) and handing out the extension module.

torch has no kernel that multiplies by GGML blocks (int codes with a float16 scale, and for some
formats a minimum, per block of 32 or 256 inputs), which is how every quantised GGUF stores its
weights. gemmakit ships a few small C++ files (csrc/: the block matmul, one-query attention, the
norms, RoPE, the MLP's GELU, the Q8_0/Q4_1 quantiser, the tokenizer's BPE and a fused decoding
step) and compiles them on first use with torch's own extension builder (needs a C++ compiler and
the Python headers; up to a minute, once: the build is cached under ~/.cache/torch_extensions).
Without a compiler, or with ``GEMMAKIT_KERNELS=0``, :func:`kernel` returns None and every caller
runs the same maths in torch (for GGML blocks: dequantise-then-matmul, quant/ggml_ops.py):
identical results up to float32 rounding, only slower.

The kernels are built for the CPU they run on (``-march=native``: AVX-512 where it has it, else
AVX2). ``GEMMAKIT_CPU_ISA=avx2`` builds them for AVX2 (``-march=haswell``) and hides the CPU's
AVX-512 and AMX features from gemmakit's own checks, so an AVX-512 machine can exercise the AVX2
paths; with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` torch's kernels follow suit.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path


_CSRC = Path(__file__).parent / "csrc"
# One extension: raw GGML blocks (ggml_matmul.cpp, and its block families ggml_kquants.cpp,
# ggml_iq2.cpp, ggml_iq13.cpp), one-query attention (decode_attention.cpp),
# RMSNorm (rms_norm.cpp), QK-norm + RoPE (rope.cpp), the MLP's GELU(gate) * up (gelu_mul.cpp), float
# rows -> Q8_0 / Q4_1 blocks (ggml_quantize.cpp), SentencePiece's BPE over a compact vocabulary
# (bpe.cpp), a decoding step's layers in one call (decode_step.cpp/.h), and the Python module (module.cpp).
_SOURCES = [_CSRC / "ggml_matmul.cpp", _CSRC / "ggml_kquants.cpp", _CSRC / "ggml_iq2.cpp", _CSRC / "ggml_iq13.cpp",
            _CSRC / "decode_attention.cpp", _CSRC / "rms_norm.cpp", _CSRC / "rope.cpp",
            _CSRC / "gelu_mul.cpp", _CSRC / "ggml_quantize.cpp", _CSRC / "bpe.cpp", _CSRC / "decode_step.cpp",
            _CSRC / "module.cpp"]
_HEADERS = [_CSRC / "decode_step.h", _CSRC / "bpe.h", _CSRC / "rows.h", _CSRC / "ggml_blocks.h"]  # part of the build's fingerprint, not compiled on their own
_lock = threading.Lock()
_module = None
_tried = False


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
            cpp_extension = _cpp_extension()
            _ninja_on_path()
            _clear_stale_lock()
            if not _is_built():
                print("gemmakit: building the CPU kernels (quantised weights, tokenizer; once, up to a minute)...",
                      file=sys.stderr, flush=True)
            _module = cpp_extension.load(name=_build_name(), sources=[str(p) for p in _SOURCES],
                                         extra_cflags=["-O3", f"-march={_MARCH[cpu_isa()]}", "-fopenmp"],
                                         extra_ldflags=["-fopenmp"], verbose=False)
            _set_grid_tables(_module)
        except Exception as e:  # no compiler, no Python headers, unusual platform
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"gemmakit: warning: CPU kernel unavailable ({first}); using the slower torch fallback "
                  "(set GEMMAKIT_KERNELS=0 to skip the build attempt)", file=sys.stderr)
            _module = None
    return _module


def _set_grid_tables(module) -> None:
    """Hand the kernel the IQ types' lookup tables (ggml_blocks.h). They are part of ggml's format;
    gguf-py keeps them (as packed hex), so gemmakit restates none of them."""
    import numpy as np
    import torch
    from gguf import quants

    def grid(cls) -> torch.Tensor:
        cls.init_grid()
        # grid values as bytes, a grid point's first weight lowest (ggml's little-endian words);
        # IQ1's -1/0/1 as int8's two's complement
        return torch.from_numpy(cls.grid.reshape(-1).astype(np.int8).view(np.uint8).copy())

    ksigns = torch.frombuffer(bytearray(quants.IQ2_XXS.ksigns), dtype=torch.uint8)
    module.ggml_set_tables(grid(quants.IQ2_XXS), grid(quants.IQ2_XS), grid(quants.IQ2_S), grid(quants.IQ1_S),
                           grid(quants.IQ3_XXS), grid(quants.IQ3_S), ksigns)


def _cpp_extension():
    """torch's extension builder, imported only when the kernel is first asked for: 0.05-0.2 s of
    imports (setuptools among them) that may fail, which ``kernel`` turns into the torch fallback."""
    from torch.utils import cpp_extension

    return cpp_extension


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the pip package's binary may not be there when the
    venv is not activated (e.g. ``.venv/bin/gemmakit`` called directly)."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # optional: the pip package's binary, looked for only when PATH has none

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
    cpu = platform.machine() + _proc_cpu_flags() + cpu_isa()
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in _SOURCES + _HEADERS) + cpu.encode()).hexdigest()[:12]
    return f"gemmakit_kernels_{digest}"


def cpu_flags() -> str:
    """The CPU's feature flags as gemmakit may use them: /proc/cpuinfo's flags line ('' where there
    is none), less AVX-512, AMX and AVX-VNNI under ``GEMMAKIT_CPU_ISA=avx2``. What tells whether
    bfloat16 prefill can pay (kernels/gemm.py)."""
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


def _build_directory() -> Path | None:
    try:
        return Path(_cpp_extension()._get_build_directory(_build_name(), verbose=False))
    except Exception:
        return None


def _is_built() -> bool:
    build = _build_directory()
    return build is not None and any(build.glob("*.so"))


STALE_LOCK_SECONDS = 300  # a build writes an object file at least every minute or two, even on 2 busy cores


def _clear_stale_lock() -> None:
    """Remove the build lock a killed build left behind: torch's builder waits for that file to go
    away, forever, so one Ctrl-C during the first build would hang every later run. A lock whose
    directory has seen no write for STALE_LOCK_SECONDS belongs to no live build."""
    build = _build_directory()
    lock = build / "lock" if build is not None else None
    if lock is None or not lock.exists():
        return
    try:
        newest = max(f.stat().st_mtime for f in build.iterdir())
    except (OSError, ValueError):
        return
    if time.time() - newest > STALE_LOCK_SECONDS:
        print(f"gemmakit: removing the stale kernel build lock {lock} (left by an interrupted build)",
              file=sys.stderr, flush=True)
        lock.unlink(missing_ok=True)
