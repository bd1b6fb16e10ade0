"""Greedy decoding with and without a Gemma 4 assistant drafter, on a random-weight pair, float32 on CPU.

The target is a narrowed Gemma 4 E2B (its 262144-token vocabulary, head sizes 256 / 512, one KV
head, 4 sliding : 1 global, the last layers reading shared keys/values); the assistant has the shape
of E2B's published one (width 256, 4 layers, 4 heads, MLP 2048, 2048 clusters of which 32 are
scored). Measured: decode tokens/s of plain greedy decoding and of assistant drafting with k
drafts a round (the first token, from the prefill, left out of both), the share of drafts the
target accepted, and the cost of each part of a round.

Random weights make the assistant's drafts unrelated to the target's choices, so almost none are
accepted and drafting is pure overhead here; the last lines work out, from the measured costs,
what a round would yield at a given per-draft acceptance (a trained pair's, which this cannot measure).

    PYTHONPATH=src python benchmarks/assistant.py [--threads 1] [--new-tokens 32] [--draft-tokens 1 2 4]

Not a test: the numbers depend on the machine and on what else it runs.
"""

from __future__ import annotations

import argparse
import time

import torch


def _configs(target_layers: int, target_width: int):
    from gemmakit.models.assistant import AssistantConfig
    from gemmakit.models.config import PRESETS, alternating

    e2b = PRESETS["gemma4-e2b"]
    target = e2b.replace(name="e2b-narrow", hidden_size=target_width, intermediate_size=4 * target_width,
                         num_layers=target_layers, layer_kinds=alternating(target_layers, 5), num_heads=4,
                         num_kv_shared_layers=target_layers // 2, per_layer_input_dim=0, per_layer_vocab_size=0,
                         max_position_embeddings=4096)
    assistant = AssistantConfig(
        decoder=e2b.replace(name="e2b-assistant-shaped", hidden_size=256, intermediate_size=2048, num_layers=4,
                            layer_kinds=("local",) * 3 + ("global",), num_heads=4, num_kv_shared_layers=0,
                            per_layer_input_dim=0, per_layer_vocab_size=0, double_wide_mlp=False, external_kv=True,
                            final_logit_softcap=None, max_position_embeddings=4096),
        backbone_hidden_size=target_width, num_centroids=2048, centroid_top_k=32)
    return target, assistant


def _randomise(model: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if p.dim() == 1 else torch.randn_like(p) * 0.02)
        for name, b in model.named_buffers():
            if name.endswith("token_ordering"):
                b.copy_(torch.randperm(b.numel()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared CPU)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--target-layers", type=int, default=10)
    ap.add_argument("--target-width", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5, help="runs of each; the fastest is reported (a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from gemmakit.engine.generate import generate_steps
    from gemmakit.engine.speculative import speculative_tokens
    from gemmakit.models.assistant import AssistantModel
    from gemmakit.models.decoder import GemmaModel

    target_config, assistant_config = _configs(args.target_layers, args.target_width)
    target, assistant = GemmaModel(target_config).eval(), AssistantModel(assistant_config).eval()
    _randomise(target, 0)
    _randomise(assistant, 1)
    prompt = torch.randint(3, target_config.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(2))
    prompt, N = prompt.tolist(), args.new_tokens

    def decode_rate(run) -> tuple[float, list[int]]:
        """Tokens/s of ``run()`` (an iterator of tokens) after the first token, which the prefill
        gives, and the tokens."""
        out, start = [], None
        for tok in run():
            out.append(tok)
            if start is None:
                start = time.perf_counter()
        return (len(out) - 1) / (time.perf_counter() - start), out

    print(f"target: {sum(p.numel() for p in target.parameters()) / 1e6:.0f}M parameters, width {args.target_width}, "
          f"{args.target_layers} layers ({target_config.num_kv_shared_layers} reading shared K/V), vocabulary "
          f"{target_config.vocab_size}; assistant: {sum(p.numel() for p in assistant.parameters()) / 1e6:.0f}M "
          f"parameters, clustered head; float32, {torch.get_num_threads()} threads; prompt {len(prompt)}, "
          f"{N} new tokens; the fastest of {args.repeats} interleaved runs each")
    runs = {0: lambda: (s.tokens[0] for s in generate_steps(target, [prompt], N))}
    stats = {k: {} for k in args.draft_tokens}
    for k in args.draft_tokens:
        runs[k] = lambda k=k: speculative_tokens(target, assistant, prompt, N, k=k, stats=stats[k])
    best: dict[int, float] = {}
    for _ in range(args.repeats):  # interleaved, so that a busy spell of a shared CPU hits every mode alike
        for k, run in runs.items():
            rate, tokens = decode_rate(run)
            if k == 0:
                plain = tokens
            assert tokens == plain, "assistant drafting changed the target's greedy tokens"
            best[k] = max(best.get(k, 0.0), rate)
    print(f"plain greedy:           {best[0]:7.2f} tok/s")
    for k in args.draft_tokens:
        st = stats[k]
        share = st["accepted"] / (k * st["rounds"]) if st["rounds"] else 0.0
        print(f"assistant, k = {k}:       {best[k]:7.2f} tok/s ({best[k] / best[0]:.2f}x), {st['rounds']} rounds, "
              f"{st['accepted']} of {k * st['rounds']} drafts accepted ({100 * share:.1f}%)")
    _round_costs(target, assistant, prompt, max(args.draft_tokens), args.repeats)


@torch.inference_mode()
def _round_costs(target, assistant, prompt: list[int], k: int, repeats: int) -> None:
    """Milliseconds of a target decode step, a verifying pass of k + 1 tokens, one assistant step
    and reading the target's cache for a round, and the tokens/s a round of k drafts would give at
    per-draft acceptance a (each draft accepted with probability a once the ones before it were)."""
    from gemmakit.engine.speculative import _rollback, _snapshot

    cache = target.new_cache(1, len(prompt) + k + 2)
    _, hidden = target(torch.tensor([prompt]), cache=cache, last_only=True, with_hidden=True)

    def timed(step) -> float:  # the fastest of 4 * repeats calls, after one to warm up
        step()
        times = []
        for _ in range(4 * repeats):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        return min(times) * 1e3

    def target_pass(n: int):
        snap = _snapshot(cache, n)
        target(torch.full((1, n), 5), cache=cache, with_hidden=True)
        _rollback(cache, snap, 0)

    position = torch.tensor([[cache.length]])
    reading = cache.read_by_kind(assistant.config.decoder, position, assistant.dtype)
    one, verify = timed(lambda: target_pass(1)), timed(lambda: target_pass(k + 1))
    draft = timed(lambda: assistant.propose(target.embed_tokens(torch.tensor([[5]])), hidden, reading))
    read = timed(lambda: cache.read_by_kind(assistant.config.decoder, position, assistant.dtype))
    print(f"costs: target step {one:.1f} ms, verifying pass of {k + 1} tokens {verify:.1f} ms, assistant step "
          f"{draft:.2f} ms, reading the target's cache {read:.2f} ms a round")
    rnd = verify + k * draft + read
    for a in (0.5, 0.7, 0.9):
        tokens = sum(a**i for i in range(k + 1))  # the accepted drafts' expected count, plus the target's token
        print(f"  at per-draft acceptance {a:.1f}, k = {k}: {tokens:.2f} tokens a round, "
              f"~{tokens / rnd * 1e3:.1f} tok/s (plain: {1e3 / one:.1f})")


if __name__ == "__main__":
    main()
