"""Every GGML weight type's size and rounding error: random normal rows quantised by llama.cpp's own
quantiser (ggml's ``ggml_quantize_chunk``, from llama-cpp-python's libggml-base), decoded by
gemmakit's block kernel (bit-identical to gguf-py's dequantisation), against the float rows.

    PYTHONPATH=src python benchmarks/quant_error.py [--rows 256] [--cols 4096]

Relative error is ||w_q - w|| / ||w|| over the matrix. The types that llama.cpp quantises only with
an importance matrix (IQ1_*, IQ2_XXS, IQ2_XS; IQ2_S by llama.cpp's rule) get a uniform one, which
for independent normal weights is the right one. Not a test: it needs llama-cpp-python.
"""

from __future__ import annotations

import argparse
import ctypes
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from gemmakit.quant import ggml_ops

TYPES = [T.Q8_0, T.Q6_K, T.Q5_K, T.Q5_1, T.Q5_0, T.Q4_K, T.Q4_1, T.Q4_0, T.IQ4_NL, T.IQ4_XS, T.Q3_K, T.IQ3_S,
         T.IQ3_XXS, T.Q2_K, T.IQ2_S, T.IQ2_XS, T.IQ2_XXS, T.IQ1_M, T.IQ1_S, T.TQ2_0, T.TQ1_0, T.MXFP4]


def ggml_base() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--cols", type=int, default=4096)
    args = p.parse_args()
    lib = ggml_base()
    w = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    ones = np.ones(args.cols, dtype=np.float32)
    print(f"{args.rows} x {args.cols} N(0, 1) weights, quantised by llama.cpp, decoded by gemmakit")
    print(f"{'type':8} {'bits/weight':>11} {'rel. error':>11}")
    for t in TYPES:
        block, size = GGML_QUANT_SIZES[t]
        out = np.zeros((args.rows, args.cols // block * size), dtype=np.uint8)
        imatrix = ones.ctypes.data if t in (T.IQ2_S,) or lib.ggml_quantize_requires_imatrix(int(t)) else None
        lib.ggml_quantize_chunk(int(t), w.ctypes.data, out.ctypes.data, 0, args.rows, args.cols, imatrix)
        deq = ggml_ops.ggml_dequantize(torch.from_numpy(out), int(t), args.cols).numpy()
        rel = np.linalg.norm(deq - w) / np.linalg.norm(w)
        print(f"{t.name:8} {8 * size / block:11.4f} {rel:11.4f}", flush=True)


if __name__ == "__main__":
    main()
