"""Decode-size matmuls on raw GGML blocks (ggml_matmul) vs torch's float32 matmul on the same
matrix dequantised (what ``--quant none`` runs): time and the bytes of weights streamed per second.

    PYTHONPATH=src python benchmarks/ggml_kernel.py [--threads 2] [--repeat 5] [--types Q8_0,Q4_K] \
        [--activations float32,int8]

Each matrix is ~30-180 MB as blocks (the IQ types 26-58 MB), 4 bytes a weight as floats (bigger than any cache), as in
decoding: every weight is read once per call. GB/s counts the bytes each side's weights occupy, Gw/s
the weights (10^9 a second); near the machine's memory bandwidth both are bound by it, and the
speedup is the bytes saved. For a decoded-then-dotted type, what bounds Gw/s below the bandwidth is
the decode. ``--activations`` times the kernel's products with each kind of activations
(ggml_ops.ACTIVATIONS: float32, auto, int8), one line each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_ggml_quant import random_blocks  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from gemmakit.kernels import build  # noqa: E402
from gemmakit.quant import ggml_ops  # noqa: E402

SHAPES = {T.Q8_0: (262144, 640)}  # the default model's tied LM head; the rest are 65536 x 2048
TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
TYPES += [T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS, T.TQ1_0, T.TQ2_0, T.MXFP4]  # decoded, then dotted (ggml_kquants.cpp)
TYPES += [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S]  # ggml_iq2.cpp
SHAPES.update({t: (131072, 2048) for t in (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S)})  # 2-2.6 bits a weight: twice the rows
TYPES += [T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M]  # ggml_iq13.cpp


def best_time(fn, repeat: int) -> float:
    fn()  # warm up (page in, thread pool)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def big_blocks(qtype: T, N: int, K: int) -> torch.Tensor:
    """Random valid blocks, made 4096 rows at a time and tiled (random_blocks is slow for 100 MB)."""
    tile = random_blocks(qtype, min(N, 4096), K, seed=int(qtype))
    return torch.from_numpy(np.tile(tile, (max(1, N // 4096), 1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--types", default=",".join(t.name for t in TYPES))
    ap.add_argument("--rows", default="1,4", help="comma-separated M values")
    ap.add_argument("--n", type=int, default=0,
                    help="output rows of every matrix (a multiple of 4096, or fewer): e.g. 512 for a matrix "
                         "that stays in cache, where the decode and the dot, not memory, set the time")
    ap.add_argument("--activations", default="float32,int8",
                    help="comma-separated: float32, auto, int8 (the kernel's activations; one line each)")
    args = ap.parse_args()
    modes = args.activations.split(",")
    torch.set_num_threads(args.threads)
    ext = build.kernel()
    if ext is None:
        sys.exit("the CPU kernel is unavailable")
    Ms = [int(m) for m in args.rows.split(",")]
    print(f"threads={args.threads} simd={ext.ggml_simd()}  best of {args.repeat}")
    print(f"{'type':7} {'N x K':>13} {'M':>3} {'acts':>7} | {'raw MB':>7} {'ggml ms':>8} {'GB/s':>6} {'Gw/s':>5} | "
          f"{'float MB':>8} {'float ms':>10} {'GB/s':>6} | speedup")
    for name in args.types.split(","):
        qtype = T[name]
        N, K = SHAPES.get(qtype, (65536, 2048))
        N = args.n or N
        raw = big_blocks(qtype, N, K)
        dense = ggml_ops.ggml_dequantize(raw, int(qtype), K)
        raw_bytes, dense_bytes = raw.numel(), dense.numel() * dense.element_size()
        assert GGML_QUANT_SIZES[qtype][1] * N * K // GGML_QUANT_SIZES[qtype][0] == raw_bytes
        for M in Ms:
            x = torch.randn(M, K)
            t_old = best_time(lambda: F.linear(x, dense), args.repeat)
            for mode in modes:
                code = ggml_ops.ACTIVATIONS[mode]
                t_new = best_time(lambda: ext.ggml_matmul(x, [raw], [int(qtype)], K, code), args.repeat)
                print(f"{name:7} {f'{N}x{K}':>13} {M:>3} {mode:>7} | {raw_bytes / 1e6:7.1f} {t_new * 1e3:8.2f} "
                      f"{raw_bytes / t_new / 1e9:6.1f} {N * K / t_new / 1e9:5.2f} | {dense_bytes / 1e6:8.1f} "
                      f"{t_old * 1e3:10.2f} {dense_bytes / t_old / 1e9:6.1f} | {t_old / t_new:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
