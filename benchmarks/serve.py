"""Serving throughput: N concurrent streaming clients against `gemmakit serve` on the default model.

    PYTHONPATH=src python benchmarks/serve.py --clients 1 4 16
    python benchmarks/serve.py --url http://127.0.0.1:8000 --clients 16   # a server you started

Each client sends `--requests` completions one after another (distinct prompts, `--max-tokens`
tokens each, end-of-turn ignored so every answer has the same length) and streams the answer.
Reported per client count: total output tokens/s over the wall time, and time to first token
(p50, p99) over all requests. Without --url the script starts the server itself on a free
loopback port, with --max-batch as large as the largest client count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # live_server helper


def one_request(url: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """Stream one completion; return (seconds to first token, tokens received)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, tokens


def run(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    ttfts: list[float] = []
    total = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(requests):
            prompt = f"Story {c}-{k}: a traveller from the city number {c * 31 + k} walks into the old forest and"
            ttft, n = one_request(url, prompt, max_tokens)
            with lock:
                ttfts.append(ttft)
                total[0] += n

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts.sort()
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    return {"clients": clients, "requests": len(ttfts), "output_tokens": total[0], "wall_s": round(wall, 2),
            "tokens_per_s": round(total[0] / wall, 2), "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_p99_s": round(p99, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running server (default: start one on the default model)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    if args.url:
        for n in args.clients:
            print(json.dumps(run(args.url, n, args.requests, args.max_tokens)), flush=True)
        return
    import torch

    import gemmakit
    from gemmakit.engine.scheduler import Engine
    from gemmakit.serve.app import create_app
    from live_server import live_server

    model, tokenizer = gemmakit.load(dtype=args.dtype)
    engine = Engine(model, tokenizer, max_batch=max(args.clients), max_seq_len=512)
    print(f"# default model, {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"max_batch {engine.rows}, KV cache {engine.cache.nbytes() / 2**20:.0f} MiB", flush=True)
    with live_server(create_app(engine, tokenizer, "gemma")) as url:
        one_request(url, "warm up", 4)
        for n in args.clients:
            print(json.dumps(run(url, n, args.requests, args.max_tokens)), flush=True)


if __name__ == "__main__":
    main()
