"""Autoregressive generation over a KV cache: prefill the prompt, then one token per step.

Batches of prompts of different lengths are left-padded; padding carries position -1, which the
attention masks hide, so each row computes exactly what it would alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from gemmakit.engine.grammar import CompiledGrammar, GrammarMatcher, apply_mask, start_masks
from gemmakit.engine.sampling import SamplingParams, make_generator, sample
from gemmakit.errors import InvalidRequestError

PREFILL_CHUNK = 1024  # bounds the [T, S] attention mask and activations for very long prompts


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first token comes from prefill; decode speed counts the steps after it.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0


@dataclass
class StepOutput:
    tokens: list[int | None]  # next token per row; None for rows already finished
    finished: list[bool]
    stats: GenerationStats = field(repr=False, default_factory=GenerationStats)


def check_prompts(prompts: Sequence[Sequence[int]], max_context: int) -> None:
    if not prompts:
        raise InvalidRequestError("no prompt given")
    for p in prompts:
        if len(p) == 0:
            raise InvalidRequestError("the prompt is empty; give at least one token of text")
        if len(p) > max_context:
            raise InvalidRequestError(
                f"the prompt has {len(p)} tokens but the model's context is {max_context} tokens"
            )


@torch.inference_mode()
def generate_steps(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    stop_ids: frozenset[int] = frozenset(),
    prefill_chunk: int = PREFILL_CHUNK,
    overlap: bool | None = None,
    grammar: CompiledGrammar | None = None,
) -> Iterator[StepOutput]:
    """Yield one :class:`StepOutput` per generated position until every row stops.

    ``prefill_chunk`` bounds the tokens per prefill call; a prompt with images prefills in one call
    (its bidirectional image groups must be whole). ``overlap`` queues each decode step before the
    previous step's tokens are read (on by default off the CPU; the tokens are the same either way).
    ``grammar`` constrains every row (each its own state); a row stops when its output is complete.
    Its masks are computed while each forward pass runs, and the next step waits for the tokens.
    """
    context = model.config.max_position_embeddings
    check_prompts(prompts, context)
    if max_new_tokens < 0:
        raise InvalidRequestError(f"max tokens must be >= 0, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, context - longest)
    if max_new_tokens == 0:
        return
    device = model.device
    B = len(prompts)
    ids = torch.zeros(B, longest, dtype=torch.long, device=device)
    positions = torch.full((B, longest), -1, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(list(p), dtype=torch.long)
        positions[row, longest - len(p):] = torch.arange(len(p))
    cache = model.new_cache(B, longest + max_new_tokens)
    generator = make_generator(sampling.seed, device)
    stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts))
    constraint = _Constraint(grammar, B) if grammar is not None else None
    if constraint is not None:
        stop_ids = stop_ids | grammar.eos_ids

    t0 = time.perf_counter()
    job = constraint.start() if constraint is not None else None
    for start in range(0, longest, prefill_chunk):
        chunk = slice(start, start + prefill_chunk)
        logits = model(ids[:, chunk], cache=cache, positions=positions[:, chunk], last_only=True)
    next_tokens = _pick(logits[:, -1], sampling, generator, constraint, job)
    stats.prefill_s = time.perf_counter() - t0

    finished = [False] * B
    next_pos = positions[:, -1:] + 1
    # Off the CPU, reading a step's tokens back waits for the device; queue the next step first,
    # so that the device computes it while the host handles (and yields) this one's tokens. A
    # grammar's next mask needs this step's tokens first, so constrained steps never run ahead.
    ahead = (device.type != "cpu" if overlap is None else overlap) and constraint is None
    reader = _TokenReader(device, B)

    def decode_step(tokens: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step after ``tokens`` at ``pos``: the sampled next tokens and their positions."""
        job = constraint.start() if constraint is not None else None  # runs beside the forward pass
        logits = model(tokens[:, None], cache=cache, positions=pos, last_only=True)
        return _pick(logits[:, -1], sampling, generator, constraint, job), pos + 1

    pending = reader.start(next_tokens)
    t1 = time.perf_counter()
    for step in range(max_new_tokens):
        queued = ahead and step < max_new_tokens - 1
        if queued:  # runs even if every row stops now: one wasted step, the cache is discarded anyway
            next_tokens, next_pos = decode_step(next_tokens, next_pos)
        tokens = reader.finish(pending)
        out: list[int | None] = []
        for row, tok in enumerate(tokens):
            if finished[row]:
                out.append(None)
                continue
            out.append(tok)
            if tok in stop_ids or constraint is not None and constraint.matchers[row].finished:
                finished[row] = True
        stats.generated_tokens += sum(t is not None for t in out)
        if step == max_new_tokens - 1:
            finished = [True] * B
        stats.decode_s = time.perf_counter() - t1
        yield StepOutput(out, list(finished), stats)
        if all(finished):
            return
        if not queued:
            next_tokens, next_pos = decode_step(next_tokens, next_pos)
        pending = reader.start(next_tokens)


class _Constraint:
    """The grammar state of each row of a constrained batch."""

    def __init__(self, grammar: CompiledGrammar, batch: int) -> None:
        self.matchers: list[GrammarMatcher] = [grammar.matcher() for _ in range(batch)]

    def live(self) -> list[int]:
        return [row for row, m in enumerate(self.matchers) if not m.finished]

    def start(self):
        """The masks of the rows still in their grammar, computed on the grammar thread: ``(rows, future)``."""
        rows = self.live()
        return rows, start_masks([self.matchers[r] for r in rows]) if rows else None


def _pick(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator,
          constraint: _Constraint | None, job) -> torch.Tensor:
    """The next token of each row of ``logits [B, V]``; under its grammar's mask where there is one
    (``job`` from :meth:`_Constraint.start`), and each matcher advanced by its row's token."""
    if constraint is None:
        return sample(logits, sampling, generator)
    rows, future = job
    if future is not None:
        logits = logits.float().clone()
        for row, mask in zip(rows, future.result()):
            logits[row] = apply_mask(logits[row], mask)
    tokens = sample(logits, sampling, generator)
    picked = tokens.tolist()
    for row in rows:
        constraint.matchers[row].advance(picked[row])
    return tokens


class _TokenReader:
    """Brings each step's sampled tokens ``[B]`` to the host.

    On CUDA the copy goes asynchronously into pinned memory, with an event to wait on: a plain
    ``tolist()`` would wait for everything queued on the device, the step queued after it included.
    Elsewhere (the CPU, where nothing runs ahead) it is that plain ``tolist()``.
    """

    def __init__(self, device: torch.device, batch: int) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.host = torch.empty(batch, dtype=torch.long, pin_memory=True)
            self.done = torch.cuda.Event()

    def start(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            self.host.copy_(tokens, non_blocking=True)
            self.done.record()
        return tokens

    def finish(self, tokens: torch.Tensor) -> list[int]:
        if self.cuda:
            self.done.synchronize()
            return self.host.tolist()
        return tokens.tolist()
