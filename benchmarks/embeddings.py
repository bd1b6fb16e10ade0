"""Embedding throughput: gemmakit against sentence-transformers on the same EmbeddingGemma-shaped
model, one run, one table.

The model has EmbeddingGemma 300M's shapes (24 Gemma 3 layers of width 768, 3 query heads on one
KV head of 256, sliding window 512, the 262144-piece vocabulary, mean pooling, dense 768 -> 3072
-> 768, Normalize) and random weights, written once as a sentence-transformers directory with
the real Gemma tokenizer (taken from the bundled 270M GGUF). Each gemmakit mode runs in its own
subprocess beside sentence-transformers, the two taking turns batch by batch over ``--rounds``
batches of 32 texts of 128 and of 512 tokens (``<bos>`` and ``<eos>`` included), after a
warm-up batch each. Each row also reports the smallest cosine between gemmakit's embeddings and
sentence-transformers' of the same texts (float32: the numbers are unchanged).

    PYTHONPATH=src python benchmarks/embeddings.py [--rounds 3] [--modes gemmakit gemmakit-int8 gemmakit-bf16]

Not a test: the numbers depend on the machine and on what else it runs.
"""

from __future__ import annotations

import argparse
import json
import os
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


def _embedder(mode: str, directory: Path):
    """``embed(texts) -> tensor`` for one engine, loaded."""
    if mode == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(directory), device="cpu")
        return lambda texts: st.encode(texts, batch_size=BATCH, convert_to_tensor=True)
    import gemmakit

    options = {"gemmakit": {}, "gemmakit-int8": {"quant": "int8"}, "gemmakit-bf16": {"dtype": "bfloat16"}}[mode]
    model, tokenizer = gemmakit.load(directory, **options)
    return lambda texts: gemmakit.embed(model, tokenizer, texts, batch_size=BATCH)


def run(mode: str, rounds: int, threads: int) -> dict:
    """sentence-transformers and ``mode`` in one process, taking turns batch by batch: on a
    shared machine the load changes by the minute, and turns a batch apart see the same load."""
    import torch

    torch.set_num_threads(threads)
    directory = model_directory()
    engines = {name: _embedder(name, directory) for name in ("sentence-transformers", mode)}
    out: dict = {}
    for length in LENGTHS:
        texts = texts_of(length, BATCH * rounds)
        seconds: dict[str, list[float]] = {name: [] for name in engines}
        vectors: dict[str, list] = {name: [] for name in engines}
        for name, embed in engines.items():
            embed(texts[:BATCH])  # warm-up: first-call allocations and kernel set-up
        for r in range(rounds):
            batch = texts[r * BATCH:(r + 1) * BATCH]
            for name, embed in engines.items():
                t0 = time.perf_counter()
                vectors[name].append(embed(batch).float())
                seconds[name].append(time.perf_counter() - t0)
        ours, theirs = (torch.cat(vectors[n]).double() for n in (mode, "sentence-transformers"))
        out[length] = {
            "tps": {n: BATCH / statistics.median(s) for n, s in seconds.items()},
            "ratio": statistics.median(t / o for t, o in zip(seconds["sentence-transformers"], seconds[mode])),
            "ratios": [t / o for t, o in zip(seconds["sentence-transformers"], seconds[mode])],
            "min_cosine": torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).min().item()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["gemmakit"], choices=MODES[1:])
    p.add_argument("--rounds", type=int, default=3, help="batches of 32 per length, each engine (median ratio)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(run(a.child, a.rounds, a.threads)))
        return
    model_directory()  # built once, outside the timed children
    print(f"batches of {BATCH} texts, {a.rounds} rounds per length, {a.threads} threads; texts/s are medians, "
          "the ratio is the median of the per-round ratios (sentence-transformers' time / gemmakit's)\n")
    print("| engine | 128 tokens: texts/s (s-t) | ratio (per round) | 512 tokens: texts/s (s-t) | ratio (per round) "
          "| min cosine to s-t (128 / 512) |")
    print("|---|---|---|---|---|---|")
    for mode in a.modes:
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--rounds", str(a.rounds),
                               "--threads", str(a.threads)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        r = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
        cells = []
        for n in LENGTHS:
            tps = r[n]["tps"]
            cells += [f"{tps[mode]:.2f} ({tps['sentence-transformers']:.2f})",
                      f"**{r[n]['ratio']:.2f}x** ({', '.join(f'{x:.2f}' for x in r[n]['ratios'])})"]
        print(f"| {mode} | {' | '.join(cells)} | {r[128]['min_cosine']:.6f} / {r[512]['min_cosine']:.6f} |",
              flush=True)


if __name__ == "__main__":
    main()
