"""RecurrentGemma prefill/decode speed and state memory, gemmakit side by side with transformers.

Both run the same random-weight model (built by transformers, saved, loaded by gemmakit), float32 on
CPU. transformers' prefill runs the RG-LRU as a Python loop over tokens; gemmakit's runs a chunked
scan (about 2*sqrt(T) vectorised steps).
Usage: PYTHONPATH=src python benchmarks/recurrent_gemma.py [--prompt 1024] [--decode 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import DynamicCache, RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    import gemmakit

    torch.manual_seed(0)
    cfg = RecurrentGemmaConfig(vocab_size=4096, hidden_size=args.hidden, intermediate_size=6 * args.hidden,
                               num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=1,
                               attention_window_size=2048)
    hf = RecurrentGemmaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, _ = gemmakit.load(d)
    ids = torch.randint(3, 4096, (1, args.prompt))
    nxt = torch.randint(3, 4096, (1, args.decode))

    with torch.inference_mode():
        t = time.perf_counter()
        hf.model._setup_cache(hf.config, 1, "cpu", torch.float32)
        kv = DynamicCache(config=hf.config)
        hf(ids, past_key_values=kv, use_cache=True, logits_to_keep=1)
        hf_prefill = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(args.decode):
            hf(nxt[:, i:i + 1], past_key_values=kv, use_cache=True, position_ids=torch.tensor([[args.prompt + i]]))
        hf_decode = time.perf_counter() - t

        cache = model.new_cache(1, args.prompt + args.decode)
        t = time.perf_counter()
        model(ids, cache=cache, last_only=True)
        gk_prefill = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(args.decode):
            model(nxt[:, i:i + 1], cache=cache)
        gk_decode = time.perf_counter() - t

    print(f"model: hidden {args.hidden}, {args.layers} layers {model.config.layer_kinds}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, float32, {torch.get_num_threads()} threads")
    print(f"prefill {args.prompt} tokens: gemmakit {args.prompt / gk_prefill:8.1f} tok/s | "
          f"transformers {args.prompt / hf_prefill:8.1f} tok/s")
    print(f"decode  {args.decode} tokens: gemmakit {args.decode / gk_decode:8.1f} tok/s | "
          f"transformers {args.decode / hf_decode:8.1f} tok/s")
    scan_vs_loop(args.prompt, 2560)
    c = model.config
    for ctx in (3000, 10_000, 100_000):
        print(f"state at {ctx:>7} tokens (bfloat16): "
              f"{(c.kv_cache_bytes(ctx) + c.recurrent_state_bytes()) / 2**20:.2f} MiB")


def scan_vs_loop(T: int, W: int) -> None:
    """The RG-LRU recurrence alone at RecurrentGemma-2B width: chunked scan vs a loop over tokens."""
    from gemmakit.models.griffin import linear_scan

    a, b, h0 = torch.rand(1, T, W), torch.randn(1, T, W), torch.randn(1, W)
    t = time.perf_counter()
    scanned = linear_scan(a, b, h0)
    scan_s = time.perf_counter() - t
    t = time.perf_counter()
    h, out = h0, torch.empty_like(b)
    for i in range(T):
        h = a[:, i] * h + b[:, i]
        out[:, i] = h
    loop_s = time.perf_counter() - t
    print(f"recurrence over {T} tokens x {W} channels: chunked scan {scan_s * 1e3:.1f} ms | "
          f"token loop {loop_s * 1e3:.1f} ms (max diff {(scanned - out).abs().max().item():.1e})")


if __name__ == "__main__":
    main()
