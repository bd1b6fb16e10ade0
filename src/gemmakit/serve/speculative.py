"""Greedy requests served with speculative decoding (``gemmakit serve --draft-model SRC``).

Speculative decoding pays where one sequence decodes alone: the target verifies the draft's k
guesses in one pass. The batching engine already shares each weight read among its rows, so the
two do not combine here: with a draft model, *greedy* single-choice requests (temperature 0, no
logprobs, no penalties) take this path, one at a time under a lock, and everything else (sampling,
n > 1, logprobs) goes to the engine as before. The tokens are the target's greedy tokens either
way (engine/speculative.py); only the speed differs.

Events have the engine's shape, so the app streams and collects them with the same code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from gemmakit.engine.sampling import SamplingParams
from gemmakit.engine.scheduler import Event, Request, RequestHandle
from gemmakit.engine.speculative import check_draft, speculative_tokens
from gemmakit.engine.stopping import TokenOutput
from gemmakit.serve.schemas import Common


class SpeculativeRunner:
    """Runs greedy requests one at a time with a draft model, in worker threads."""

    def __init__(self, model, draft, tokenizer, draft_tokens: int = 4) -> None:
        check_draft(model, draft)
        self.model, self.draft, self.tokenizer, self.k = model, draft, tokenizer, draft_tokens
        self._lock = threading.Lock()
        self.rounds = self.accepted = 0  # totals, for /metrics

    @staticmethod
    def accepts(common: Common, logprobs: int | None) -> bool:
        """Greedy, one choice, no logprobs, no penalties or biases: what speculative decoding reproduces exactly."""
        p, default = common.params, SamplingParams()
        greedy = p.temperature == 0 or p.top_k == 1
        plain = all(getattr(p, name) == getattr(default, name)
                    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias"))
        return greedy and plain and common.n == 1 and logprobs is None

    def submit(self, prompt_ids: list[int], common: Common, on_event: Callable[[Event], None]) -> RequestHandle:
        request = Request(prompt_ids=tuple(prompt_ids), max_tokens=common.max_tokens, params=common.params,
                          stop=common.stop, stop_ids=frozenset() if common.ignore_eos else None)
        handle = RequestHandle(0, request, on_event)
        threading.Thread(target=self._run, args=(handle,), daemon=True, name="gemmakit-speculative").start()
        return handle

    def _run(self, handle: RequestHandle) -> None:
        """Emit events as the engine does for a greedy request (the same TokenOutput decides them)."""
        request, emit = handle.request, handle.on_event
        stop_ids = request.stop_ids if request.stop_ids is not None else self.tokenizer.stop_ids()
        output = TokenOutput(stop_ids, request.stop, self.tokenizer.stream_decoder())
        stats: dict = {}
        try:
            with self._lock:
                for token in speculative_tokens(self.model, self.draft, list(request.prompt_ids),
                                                request.max_tokens, self.k, stop_ids, stats):
                    if handle.cancelled:
                        emit(Event(0, finish_reason="cancelled"))
                        return
                    handle.completion_tokens += 1
                    if handle.first_token_at is None:
                        handle.first_token_at = time.perf_counter()
                    text, finish = output.push(token, handle.completion_tokens, request.max_tokens)
                    emit(Event(0, token_id=token, text=text, finish_reason=finish))
                    if finish is not None:
                        return
                emit(Event(0, text=output.flush(), finish_reason="length"))  # ran into the context length
        except Exception as exc:  # reported to the client as a server error, the server keeps serving
            emit(Event(0, finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
        finally:
            self.rounds += stats.get("rounds", 0)
            self.accepted += stats.get("accepted", 0)
