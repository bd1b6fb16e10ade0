"""The continuous-batching engine against the plain generation loop, on tiny random models.

The reference is engine/generate.py (a left-padded batch with one shared cache cursor), which the
family parity tests tie to transformers; the engine must produce the same greedy tokens while
requests join, leave, queue, prefill in chunks and reuse cached prefixes.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from tiny import random_model, tiny_config

from gemmakit.engine.generate import generate_steps
from gemmakit.engine.sampling import SamplingParams, apply_penalties, min_p_filter
from gemmakit.engine.scheduler import Engine, Request
from gemmakit.engine.stopping import StopStrings
from gemmakit.errors import InvalidRequestError

PROMPT_LENGTHS = (3, 12, 20, 5, 30, 1, 9, 17)  # some longer than the sliding window (8)


def reference(model, prompt: list[int], max_new: int) -> list[int]:
    return [step.tokens[0] for step in generate_steps(model, [prompt], max_new)]


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(10, 250, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_batched_engine_equals_one_request_alone(family):
    """8 requests on 3 rows (5 queue), prompts prefilled in chunks of 7: each equals its solo run."""
    model = random_model(tiny_config(family))
    engine = Engine(model, max_batch=3, prefill_chunk=7)
    try:
        got = engine.generate([Request(tuple(p), max_tokens=10, stop_ids=frozenset()) for p in prompts()])
    finally:
        engine.shutdown()
    for p, out in zip(prompts(), got):
        assert out[0] == reference(model, p, 10)
    assert engine.stats.requests_finished == 8 and engine.running == 0


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_prefix_cache_reuses_history_and_gives_the_same_tokens(family):
    """A chat-like follow-up (old prompt + old answer + new turn) computes only its new tokens."""
    model = random_model(tiny_config(family))
    engine = Engine(model, max_batch=2, prefill_chunk=16)
    first = prompts()[4]
    try:
        answer = engine.generate([Request(tuple(first), max_tokens=12, stop_ids=frozenset())])[0][0]
        follow_up = first + answer + [40, 41, 42]
        before = engine.stats.prefilled_tokens_total
        again = engine.generate([Request(tuple(follow_up), max_tokens=10, stop_ids=frozenset())])[0][0]
        computed = engine.stats.prefilled_tokens_total - before
        before = engine.stats.prefilled_tokens_total
        twice = engine.generate([Request(tuple(follow_up), max_tokens=10, stop_ids=frozenset())])[0][0]
        computed_twice = engine.stats.prefilled_tokens_total - before
    finally:
        engine.shutdown()
    assert again == reference(model, follow_up, 10) == twice
    # the row held prompt + 11 fed answer tokens; the 12th answer token and the new turn are computed
    assert computed == 4
    # The same prompt twice: global layers keep every position, so only the last token is recomputed;
    # local rings moved on past the prompt while answering, so a ring model recomputes it all.
    assert computed_twice == (1 if family == "gemma" else len(follow_up))


def _branch_off_a_shared_prefix(family: str) -> tuple[list[int], int]:
    """Answer a 31-token prompt, then one sharing its first 25 tokens: (second answer, tokens prefilled for it).

    The second answer is checked here against a solo run; callers check how much was recomputed.
    """
    model = random_model(tiny_config(family))
    engine = Engine(model, max_batch=1, prefill_chunk=64)
    base = prompts()[4]  # 31 tokens > window 8
    other = base[:25] + [77, 78, 79]
    try:
        engine.generate([Request(tuple(base), max_tokens=5, stop_ids=frozenset())])
        before = engine.stats.prefilled_tokens_total
        out = engine.generate([Request(tuple(other), max_tokens=8, stop_ids=frozenset())])[0][0]
    finally:
        engine.shutdown()
    assert out == reference(model, other, 8)
    return other, engine.stats.prefilled_tokens_total - before


def test_prefix_cache_not_reused_when_the_ring_lost_it():
    """A different continuation of a shared prefix longer than the window must be recomputed (local rings)."""
    other, prefilled = _branch_off_a_shared_prefix("gemma3")
    assert prefilled == len(other)


def test_global_only_model_reuses_any_shared_prefix():
    _, prefilled = _branch_off_a_shared_prefix("gemma")
    assert prefilled == 3


def test_cancel_frees_the_row_and_the_queue_moves_on():
    model = random_model(tiny_config("gemma3", max_position_embeddings=4096))
    engine = Engine(model, max_batch=1, max_seq_len=4096).start()
    events, done = [], threading.Event()
    try:
        long = engine.submit(Request((2, 50, 60), max_tokens=4000, stop_ids=frozenset()), events.append)
        queued = engine.submit(Request((2, 70), max_tokens=3, stop_ids=frozenset()),
                               lambda ev: done.set() if ev.finish_reason else None)
        deadline = time.monotonic() + 30
        while not events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.queue_depth == 1  # the second request waits for the only row
        long.cancel()
        assert done.wait(30)
    finally:
        engine.shutdown()
    assert events[-1].finish_reason == "cancelled" and len(events) < 4000
    assert engine.stats.requests_cancelled == 1 and engine.running == 0


def test_seed_reproduces_and_n_gives_distinct_choices():
    model = random_model(tiny_config("gemma3"))
    engine = Engine(model, max_batch=4)
    params = SamplingParams(temperature=1.0, top_p=0.95, min_p=0.01, seed=1234)
    try:
        a, b = engine.generate([Request((2, 40, 41), 20, params, n=2, stop_ids=frozenset()),
                                Request((2, 40, 41), 20, params, n=2, stop_ids=frozenset())])
    finally:
        engine.shutdown()
    assert a == b
    assert a[0] != a[1]  # choice i samples with seed + i


def test_bad_requests_are_refused_with_a_typed_error():
    model = random_model(tiny_config("gemma3"))
    engine = Engine(model, max_batch=1)
    with pytest.raises(InvalidRequestError, match="context"):
        engine.submit(Request(tuple([2] * 200)), print)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.submit(Request((2, 3), max_tokens=-1), print)  # 0 reads (and scores) the prompt only
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.submit(Request((2, 10_000)), print)
    with pytest.raises(InvalidRequestError, match="min_p"):
        SamplingParams(min_p=1.5)


def test_stop_strings_across_token_boundaries():
    s = StopStrings(["\n\n", "END"])
    out = []
    for piece in ["Hello", " wor", "ld\n", "\nmore"]:
        text, stopped = s.push(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello world" and stopped
    s = StopStrings(["END"])
    assert s.push("the E") == ("the ", False)  # "E" might begin END: held back
    assert s.push("ast") == ("East", False)  # it did not
    assert s.push("EN") == ("", False) and s.flush() == "EN"


def test_penalties_and_min_p():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    seen = torch.tensor([True, True, False, False])
    counts = torch.tensor([3.0, 0.0, 1.0, 0.0])
    rep = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), seen, counts)
    assert rep.tolist() == [1.0, -2.0, 0.5, 0.0]
    pf = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), seen, counts)
    assert torch.allclose(pf, torch.tensor([2.0 - 0.5 - 0.75, -1.0, 0.5 - 0.5 - 0.25, 0.0]))
    kept = min_p_filter(logits, 0.2)  # p_i >= 0.2 p_max  <=>  logit_i >= 2 + ln 0.2 = 0.39
    assert torch.isinf(kept).tolist() == [False, True, False, True]


def test_kv_memory_cap_bounds_the_rows_and_the_rest_queue():
    model = random_model(tiny_config("gemma3"))
    per_row = Engine(model, max_batch=1).cache.nbytes()
    engine = Engine(model, max_batch=8, max_kv_bytes=int(per_row * 2.5))
    assert engine.rows == 2 and engine.cache.nbytes() == 2 * per_row
    try:
        got = engine.generate([Request(tuple(p), max_tokens=4, stop_ids=frozenset()) for p in prompts()[:5]])
    finally:
        engine.shutdown()
    assert [len(g[0]) for g in got] == [4] * 5
    with pytest.raises(InvalidRequestError, match="max_kv_bytes"):
        Engine(model, max_kv_bytes=100)


def test_fast_argmax_keeps_torch_ties_and_nan_rule() -> None:
    from gemmakit.engine.sampling import argmax

    x = torch.randn(4, 262144, generator=torch.Generator().manual_seed(3))
    x[1, 10] = x[1, 20] = x[1].max() + 1  # a tie: the first index wins
    x[2, 99] = float("nan")  # torch and numpy both pick the NaN
    assert torch.equal(argmax(x), x.argmax(-1))
