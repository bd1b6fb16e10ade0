"""Constrained decoding's cost per token: the batching engine at batch 1 and 8, with and without a JSON schema.

    PYTHONPATH=src python benchmarks/grammar.py --batch 1 8 --tokens 64 --repeats 3

Each run submits ``batch`` requests of ``--tokens`` tokens to one Engine on the default model
(Gemma 3 270M), either free (end-of-turn ignored) or all under a JSON schema whose answer is
longer than ``--tokens`` (an array of 20 objects with bounded strings, integers and enums), so
that every row decodes exactly ``--tokens`` tokens; both sample at temperature 0.7 with seeds.
Free and constrained runs alternate, ``--repeats`` times each.

Reported per batch size, as medians over the decode steps at full batch:

- ``free ms`` and ``json ms``: one decode step (forward pass and sampling of every row);
- ``json/free``: their ratio less one. On a shared machine two runs differ by more than the
  grammar costs, so this figure is noisy (it has come out negative);
- ``fill ms``: llguidance computing the step's masks, on the grammar thread while the forward runs;
- ``wait ms``: what the engine still waited for the masks once its forward pass was done;
- ``apply ms``: setting the disallowed logits to -inf, all rows of the step (engine thread);
- ``advance ms``: moving every row's grammar state past its sampled token (engine thread);
- ``cost``: (wait + apply + advance) / free: the time the grammar adds to a step, measured
  directly, as a share of a free step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import Future
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SCHEMA = {
    "type": "array", "minItems": 20, "maxItems": 20,
    "items": {"type": "object", "additionalProperties": False, "required": ["name", "age", "role", "tags"],
              "properties": {"name": {"type": "string", "minLength": 2, "maxLength": 12},
                             "age": {"type": "integer", "minimum": 0, "maximum": 99},
                             "role": {"enum": ["engineer", "artist", "teacher"]},
                             "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                      "maxItems": 3}}},
}


class Probe:
    """Times the engine's decode steps and its grammar work (wrapping the functions it calls)."""

    def __init__(self, scheduler, grammar) -> None:
        self.steps: list[tuple[int, float]] = []  # (rows, seconds) per decode step
        self.fill: list[float] = []
        self.wait: list[float] = []
        self.apply: list[tuple[int, float]] = []  # (step number, seconds) per row
        self.advance: list[tuple[int, float]] = []
        engine_cls = scheduler.Engine
        decode, fill_masks, apply_mask = engine_cls._decode, scheduler.fill_masks, scheduler.apply_mask
        probe = self

        def timed_decode(engine, seqs):
            t0 = time.perf_counter()
            out = decode(engine, seqs)
            probe.steps.append((len(seqs), time.perf_counter() - t0))
            return out

        def timed_fill_thread(matchers):
            t0 = time.perf_counter()
            out = fill_masks(matchers)
            probe.fill.append(time.perf_counter() - t0)
            return out

        def timed_start_masks(matchers):  # the engine's start_masks, with the fill timed on its thread
            pool, _ = grammar._workers()
            return _Timed(pool.submit(timed_fill_thread, matchers), probe)

        def timed_apply(logits, mask):
            t0 = time.perf_counter()
            out = apply_mask(logits, mask)
            probe.apply.append((len(probe.steps), time.perf_counter() - t0))
            return out

        advance = grammar.GrammarMatcher.advance

        def timed_advance(matcher, token):
            t0 = time.perf_counter()
            advance(matcher, token)
            probe.advance.append((len(probe.steps), time.perf_counter() - t0))

        grammar.GrammarMatcher.advance = timed_advance
        engine_cls._decode = timed_decode
        scheduler.start_masks = timed_start_masks
        scheduler.apply_mask = timed_apply

    def reset(self) -> None:
        for samples in (self.steps, self.fill, self.wait, self.apply, self.advance):
            samples.clear()


class _Timed:
    """A future whose ``result()`` records how long the caller waited for it."""

    def __init__(self, future: Future, probe: Probe) -> None:
        self.future, self.probe = future, probe

    def result(self):
        t0 = time.perf_counter()
        out = self.future.result()
        self.probe.wait.append(time.perf_counter() - t0)
        return out


def run_once(engine, scheduler, grammar, tokenizer, batch: int, tokens: int, constrained: bool, probe: Probe):
    from gemmakit.chat import render_chat
    from gemmakit.engine.sampling import SamplingParams

    prompt = tuple(tokenizer.encode(render_chat([{"role": "user", "content": "List twenty people as JSON."}]),
                                    add_bos=True))
    requests = [scheduler.Request(prompt, max_tokens=tokens, params=SamplingParams(temperature=0.7, seed=i),
                                  stop_ids=frozenset(), grammar=grammar if constrained else None)
                for i in range(batch)]
    probe.reset()
    outputs = engine.generate(requests)
    assert all(len(o[0]) == tokens for o in outputs), [len(o[0]) for o in outputs]
    full = [i for i, (rows, _) in enumerate(probe.steps) if rows == batch][1:]  # the first may include warm-up
    step = statistics.median(probe.steps[i][1] for i in full)
    fill = statistics.median(probe.fill) if probe.fill else 0.0
    wait = statistics.median(probe.wait) if probe.wait else 0.0
    return step, fill, wait, _per_step(probe.apply), _per_step(probe.advance)


def _per_step(samples: list[tuple[int, float]]) -> float:
    """The median over steps of the summed per-row times of each step."""
    per_step: dict[int, float] = {}
    for n, seconds in samples:
        per_step[n] = per_step.get(n, 0.0) + seconds
    return statistics.median(per_step.values()) if per_step else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    import gemmakit
    import gemmakit.engine.grammar as grammar_module
    import gemmakit.engine.scheduler as scheduler
    from gemmakit.engine.grammar import Grammar

    model, tokenizer = gemmakit.load()
    engine = scheduler.Engine(model, tokenizer, max_batch=max(args.batch), max_seq_len=512)
    probe = Probe(scheduler, grammar_module)
    t0 = time.perf_counter()
    grammar = engine.compile_grammar(Grammar.json_schema(SCHEMA))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"vocabulary index and schema compiled in {time.perf_counter() - t0:.2f} s")
    run_once(engine, scheduler, grammar, tokenizer, 1, 8, True, probe)  # warm-up: kernels, caches, threads
    print("| batch | free ms/step | json ms/step | json/free | fill ms | wait ms | apply ms | advance ms | cost |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in args.batch:
        free, json_ = [], []
        for _ in range(args.repeats):
            free.append(run_once(engine, scheduler, grammar, tokenizer, batch, args.tokens, False, probe))
            json_.append(run_once(engine, scheduler, grammar, tokenizer, batch, args.tokens, True, probe))
        f = statistics.median(r[0] for r in free)
        j = statistics.median(r[0] for r in json_)
        fill, wait, apply, advance = (statistics.median(r[k] for r in json_) for k in (1, 2, 3, 4))
        print(f"| {batch} | {f * 1e3:.1f} | {j * 1e3:.1f} | {(j - f) / f:+.1%} | {fill * 1e3:.2f} | "
              f"{wait * 1e3:.2f} | {apply * 1e3:.2f} | {advance * 1e3:.2f} | {(wait + apply + advance) / f:.1%} |",
              flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
