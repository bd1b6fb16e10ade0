"""Embedding throughput: gemmakit against sentence-transformers on the same EmbeddingGemma-shaped
model, one run, one table.

The model has EmbeddingGemma 300M's shapes (24 Gemma 3 layers of width 768, 3 query heads on one
KV head of 256, sliding window 512, the 262144-piece vocabulary, mean pooling, dense 768 -> 3072
-> 768, Normalize) and random weights, written once as a sentence-transformers directory with
the real Gemma tokenizer (taken from the bundled 270M GGUF). Each mode runs in its own
subprocess, alternating with the reference in adjacent pairs (``--pairs``), and embeds
``--texts`` texts of 128 and of 512 tokens (``<bos>`` and ``<eos>`` included) in batches
of 32, after one warm-up batch. Each gemmakit row also reports the smallest cosine between its
embeddings and sentence-transformers' of the same texts (float32: the numbers are unchanged).

    PYTHONPATH=src python benchmarks/embeddings.py [--pairs 1] [--texts 64] [--modes gemmakit int8]

Not a test: the numbers depend on the machine and on what else it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

LENGTHS = (128, 512)
BATCH = 32
CACHE = Path(os.environ.get("GEMMAKIT_BENCH_CACHE", "/tmp/gemmakit-bench"))
MODES = ("sentence-transformers", "gemmakit", "gemmakit-int8", "gemmakit-bf16")


def model_directory() -> Path:
    """The EmbeddingGemma-shaped sentence-transformers directory (built on the first run)."""
    directory = CACHE / "embeddinggemma-300m-shaped"
    if (directory / "modules.json").is_file():
        return directory
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from embedding_models import embedding_gemma_directory, hf_tokenizer_directory

    from gemmakit.checkpoints import default_model_path

    tokenizer_dir = hf_tokenizer_directory(Path(default_model_path()), CACHE / "tokenizer")
    embedding_gemma_directory(
        directory, tokenizer_dir, dense=((768, 3072, False, "Identity"), (3072, 768, False, "Identity")),
        max_seq_length=2048, weight_std=0.02, hidden_size=768, intermediate_size=1152, num_hidden_layers=24,
        num_attention_heads=3, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512)
    return directory


def texts_of(length: int, count: int) -> list[str]:
    """``count`` different texts of ``length`` tokens with ``<bos>`` and ``<eos>`` (at most, and within
    a token or two: the last word is cut a character at a time)."""
    from gemmakit.checkpoints import open_checkpoint

    tokenizer = open_checkpoint(model_directory()).tokenizer
    words = ("retrieval models read each passage whole and every token sees its neighbours on both sides "
             "so that one vector stands for the meaning of the text ").split()
    out = []
    for i in range(count):
        text, n = f"Passage {i}:", 0
        while (n := len(tokenizer.encode(text))) < length - 2:
            text += " " + words[(i + n) % len(words)]
        while len(tokenizer.encode(text)) > length - 2:
            text = text[:-1]
        out.append(text)
    return out


def run(mode: str, count: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    directory = model_directory()
    t0 = time.perf_counter()
    if mode == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(directory), device="cpu")

        def embed(texts):
            return st.encode(texts, batch_size=BATCH, convert_to_tensor=True)
    else:
        import gemmakit

        options = {"gemmakit": {}, "gemmakit-int8": {"quant": "int8"}, "gemmakit-bf16": {"dtype": "bfloat16"}}[mode]
        model, tokenizer = gemmakit.load(directory, **options)

        def embed(texts):
            return gemmakit.embed(model, tokenizer, texts, batch_size=BATCH)
    out = {"load_s": time.perf_counter() - t0}
    for length in LENGTHS:
        texts = texts_of(length, count)
        embed(texts[:BATCH])  # warm-up: first-call allocations and kernel set-up
        t0 = time.perf_counter()
        vectors = embed(texts)
        out[f"tps_{length}"] = count / (time.perf_counter() - t0)
        out[f"vectors_{length}"] = vectors.float().tolist()
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return out


def _child(mode: str, count: int, threads: int, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--texts", str(count), "--threads", str(threads)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["gemmakit"], choices=MODES[1:])
    p.add_argument("--pairs", type=int, default=1, help="adjacent reference/gemmakit pairs per mode (median ratio)")
    p.add_argument("--texts", type=int, default=64, help="texts per length (default 64: two batches of 32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(run(a.child, a.texts, a.threads)))
        return
    model_directory()  # built once, outside the timed children
    import torch

    rows = []
    ratios: dict[str, dict[int, list[float]]] = {}
    for mode in a.modes:
        for _ in range(a.pairs):
            reference = _child("sentence-transformers", a.texts, a.threads, a.timeout)
            ours = _child(mode, a.texts, a.threads, a.timeout)
            rows.append(("sentence-transformers", reference, None))
            cosines = {n: torch.nn.functional.cosine_similarity(
                torch.tensor(ours[f"vectors_{n}"], dtype=torch.float64),
                torch.tensor(reference[f"vectors_{n}"], dtype=torch.float64), dim=-1).min().item() for n in LENGTHS}
            rows.append((mode, ours, cosines))
            for n in LENGTHS:
                ratios.setdefault(mode, {}).setdefault(n, []).append(ours[f"tps_{n}"] / reference[f"tps_{n}"])
    print(f"{a.texts} texts per length, batch {BATCH}, {a.threads} threads; texts/s (ratio to the "
          "sentence-transformers row before it)\n")
    print("| engine | load s | 128 tokens: texts/s | 512 tokens: texts/s | min cosine to s-t (128 / 512) | "
          "peak RSS GB |")
    print("|---|---|---|---|---|---|")
    last = None
    for mode, r, cosines in rows:
        cells = []
        for n in LENGTHS:
            ratio = f" ({r[f'tps_{n}'] / last[f'tps_{n}']:.2f}x)" if cosines is not None else ""
            cells.append(f"{r[f'tps_{n}']:.2f}{ratio}")
        cos = " / ".join(f"{cosines[n]:.6f}" for n in LENGTHS) if cosines else ""
        print(f"| {mode} | {r['load_s']:.1f} | {cells[0]} | {cells[1]} | {cos} | {r['peak_rss_gb']:.2f} |")
        if cosines is None:
            last = r
    if a.pairs > 1:
        print()
        for mode, by_length in ratios.items():
            print(f"{mode}: median ratio " + ", ".join(f"{n} tokens {statistics.median(v):.2f}x"
                                                       for n, v in by_length.items()))


if __name__ == "__main__":
    main()
