"""A continuous-batching engine: many requests, one model, one running batch.

The engine owns a :class:`~gemmakit.models.row_cache.RowKVCache` of ``rows`` rows; each running
sequence holds one row. Every iteration of the loop

1. drops cancelled sequences (a client went away) and frees their rows;
2. admits waiting requests into free rows (requests beyond the rows wait in a queue, they never
   fail), reusing the longest cached prefix a free row still holds (prefix caching);
3. runs one prefill chunk for every sequence still reading its prompt (chunked prefill: a long
   prompt takes several iterations, so running sequences keep decoding in between);
4. runs one decode step for every sequence that has a sampled token to feed;
5. samples per sequence with its own parameters and generator, and reports tokens as events.

A request with images or audio carries its prompt's embeddings, computed once by the towers
before it is submitted (:class:`~gemmakit.models.multimodal.PromptMedia`): its prefill chunks read
them in place of the token embeddings (never splitting a run of soft tokens that attend both
ways), and the prefix cache matches its soft tokens by their media's digest. Its decode steps are
text, so media and text requests share the batch.

A sequence with a grammar (engine/grammar.py) samples under its own token mask; constrained
and free sequences share the batch. The masks of a step are computed on a worker thread while
its forward pass runs, and applied to each row by the sampler.

So requests join and leave the batch at token boundaries. The engine knows nothing of HTTP: a
caller hands :meth:`Engine.submit` a callback, which runs on the engine thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gemmakit.engine.grammar import (
    CompiledGrammar, Grammar, GrammarCompiler, GrammarMatcher, apply_mask, fill_masks, start_masks,
)
from gemmakit.engine.sampling import SamplingParams, apply_penalties, argmax, make_generator, sample_one
from gemmakit.engine.stopping import TokenOutput
from gemmakit.errors import InvalidRequestError
from gemmakit.heap import return_freed_heap
from gemmakit.models.multimodal import MediaModel, PromptMedia
from gemmakit.models.row_cache import RowKVCache


SCORE_CHUNK = 64  # prompt tokens per forward pass of a scored prompt: 64 x 262k float32 logits = 64 MiB
SCORE_SLICE = 16  # positions per log-softmax when scoring


@dataclass(frozen=True)
class Request:
    """One completion request, as the engine sees it (token ids in, token ids out)."""

    prompt_ids: tuple[int, ...]
    max_tokens: int = 16
    params: SamplingParams = SamplingParams()
    n: int = 1
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer)
    stop_ids: frozenset[int] | None = None  # None: the tokenizer's end-of-turn ids
    logprobs: int | None = None  # None: off; k: the chosen token's logprob plus the k best
    grammar: Grammar | CompiledGrammar | None = None  # what the output must match (each choice its own state)
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's logprob plus the k best (scoring)
    media: PromptMedia | None = None  # the prompt's images/audio, spliced in (a model with media towers)


@dataclass
class Event:
    """What one sequence produced this step. ``finish_reason`` is set on its last event."""

    index: int  # which of the request's n choices
    token_id: int | None = None
    text: str = ""
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: str | None = None


class RequestHandle:
    """The caller's side of a submitted request: counts and cancellation."""

    def __init__(self, request_id: int, request: Request, on_event: Callable[[Event], None]) -> None:
        self.id = request_id
        self.request = request
        self.on_event = on_event
        self.prompt_tokens = len(request.prompt_ids)
        self.cached_tokens = 0  # prompt tokens of the first choice served from the prefix cache
        self.completion_tokens = 0
        self.cancelled = False
        self.remaining = request.n  # choices not finished yet
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        # with request.prompt_logprobs: (token, logprob, top [(id, logprob)]) per prompt token, the
        # first one's logprob and top None (nothing comes before it); complete before the first event
        self.prompt_scores: list[tuple[int, float | None, list[tuple[int, float]] | None]] = []

    def cancel(self) -> None:
        """Stop generating for this request (safe from any thread); its row is freed next step."""
        self.cancelled = True


@dataclass
class _Sequence:
    handle: RequestHandle
    index: int
    tokens: list[int]  # prompt + generated
    keys: list  # what the prefix cache compares per prompt position (PromptMedia.keys; else the ids)
    prompt_len: int
    max_new: int
    generator: torch.Generator
    output: TokenOutput
    row: int = -1
    fed: int = 0  # tokens whose keys/values are in the row
    generated: int = 0
    counts: torch.Tensor | None = None  # [V] times each token was generated (penalties)
    seen: torch.Tensor | None = None  # [V] bool: in prompt or output (repetition penalty)
    grammar: GrammarMatcher | None = None
    scores: bool = False  # computes its prompt's logprobs (the first choice of a scoring request)


@dataclass
class EngineStats:
    requests_total: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    prompt_tokens_total: int = 0
    prefilled_tokens_total: int = 0  # prompt tokens actually computed (not served from the prefix cache)
    cached_tokens_total: int = 0  # prompt tokens served from the prefix cache
    generated_tokens_total: int = 0
    steps_total: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))  # (time, tokens) of recent steps

    def tokens_per_second(self, horizon: float = 10.0) -> float:
        now = time.perf_counter()
        window = [(t, n) for t, n in self.recent if now - t <= horizon]
        if not window:
            return 0.0
        span = max(now - window[0][0], 1e-3)
        return sum(n for _, n in window) / span


class Engine:
    """Serves many requests on one model with continuous batching (see the module docstring).

    ``max_batch`` bounds concurrent sequences; ``max_kv_bytes`` (when given) lowers it so that the
    key/value cache, allocated once up front, fits in that many bytes. ``max_seq_len`` bounds one
    sequence (prompt + output); it defaults to the model's context, capped at 4096 tokens.
    """

    def __init__(self, model, tokenizer=None, *, max_batch: int = 8, max_seq_len: int | None = None,
                 prefill_chunk: int = 256, max_kv_bytes: int | None = None) -> None:
        # a model with media towers: its decoder runs the batch, the towers ran before submit
        self.media_model = model if isinstance(model, MediaModel) else None
        if self.media_model is not None:
            model = model.decoder
        self.position_offset = getattr(self.media_model.config, "position_offset", 0) if self.media_model else 0
        self.model = model
        self.tokenizer = tokenizer
        config = model.config
        self.max_seq_len = min(max_seq_len or min(config.max_position_embeddings, 4096),
                               config.max_position_embeddings)
        self.prefill_chunk = prefill_chunk
        rows = max_batch
        kv_int8 = bool(getattr(model, "kv_int8", False))  # load(..., kv_cache="int8")
        if max_kv_bytes is not None:
            per_row = RowKVCache(config, 1, self.max_seq_len, model.dtype, "meta", kv_int8=kv_int8).nbytes()
            rows = min(rows, max_kv_bytes // per_row)
            if rows < 1:
                raise InvalidRequestError(
                    f"max_kv_bytes {max_kv_bytes} holds no sequence of {self.max_seq_len} tokens "
                    f"(one needs {per_row} bytes); raise it or lower max_seq_len")
        self.rows = rows
        self.cache = RowKVCache(config, rows, self.max_seq_len + self.position_offset, model.dtype, model.device,
                                kv_int8=kv_int8)
        self.default_stop_ids = tokenizer.stop_ids() if tokenizer is not None else frozenset()
        self.stats = EngineStats()
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._incoming: deque[_Sequence] = deque()
        self._waiting: deque[_Sequence] = deque()
        self._owner: list[_Sequence | None] = [None] * rows
        self._row_tokens: list[list[int]] = [[] for _ in range(rows)]  # what each row's cache holds
        self._row_used: list[float] = [0.0] * rows
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- the caller's side (any thread) ---------------------------------------------------------

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> RequestHandle:
        """Validate and queue ``request``; ``on_event`` receives its :class:`Event` s (engine thread)."""
        prompt = list(request.prompt_ids)
        if not prompt:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise InvalidRequestError(f"token ids must be in [0, {vocab})")
        if len(prompt) >= self.max_seq_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt)} tokens but this server's context is {self.max_seq_len} tokens")
        if request.max_tokens < 0:  # 0: the prompt is read (and scored) and nothing is generated
            raise InvalidRequestError(f"max_tokens must be >= 0, got {request.max_tokens}")
        if request.prompt_logprobs is not None and not 0 <= request.prompt_logprobs <= 20:
            raise InvalidRequestError(f"prompt_logprobs must be in [0, 20], got {request.prompt_logprobs}")
        if not 1 <= request.n <= self.rows * 4:
            raise InvalidRequestError(f"n must be in [1, {self.rows * 4}], got {request.n}")
        if request.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a model with a tokenizer")
        if any(not 0 <= t < vocab for t, _ in request.params.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab})")
        if request.media is not None:
            if self.media_model is None:
                raise InvalidRequestError("this model takes no images or audio (it has no media towers)")
            if len(request.media) != len(prompt):
                raise InvalidRequestError(f"the prompt's media cover {len(request.media)} positions, "
                                          f"the prompt has {len(prompt)}")
        grammar = request.grammar
        if isinstance(grammar, Grammar):
            grammar = self.compile_grammar(grammar)
        handle = RequestHandle(next(self._ids), request, on_event)
        max_new = min(request.max_tokens, self.max_seq_len - len(prompt))
        stop_ids = self.default_stop_ids if request.stop_ids is None else request.stop_ids
        if grammar is not None:  # a complete output may end with an end token, whatever ignore_eos says
            stop_ids = stop_ids | grammar.eos_ids
        seqs = []
        for i in range(request.n):
            seed = None if request.params.seed is None else request.params.seed + i
            seqs.append(_Sequence(
                handle=handle, index=i, tokens=list(prompt), prompt_len=len(prompt), max_new=max_new,
                keys=list(request.media.keys) if request.media is not None else list(prompt),
                generator=make_generator(seed),
                output=TokenOutput(stop_ids, request.stop,
                                   self.tokenizer.stream_decoder() if self.tokenizer is not None else None),
                grammar=grammar.matcher() if grammar is not None else None,
                scores=request.prompt_logprobs is not None and i == 0))
        with self._lock:
            self.stats.requests_total += 1
            self.stats.prompt_tokens_total += len(prompt) * request.n
            self._incoming.extend(seqs)
            self._lock.notify()
        return handle

    def compile_grammar(self, grammar: Grammar) -> CompiledGrammar:
        """``grammar`` checked against this engine's vocabulary (a :class:`GrammarError` if it is bad).

        The first grammar builds the vocabulary's index (about a second for 262k tokens); a caller
        that must not block (the server's event loop) calls this on a thread and submits the result.
        """
        if self.tokenizer is None:
            raise InvalidRequestError("a grammar needs a model with a tokenizer")
        return GrammarCompiler.for_tokenizer(self.tokenizer, self.model.config.vocab_size).compile(grammar)

    @property
    def queue_depth(self) -> int:
        return len(self._incoming) + len(self._waiting)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self._owner)

    def start(self) -> Engine:
        """Run the loop on a background thread (idempotent)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="gemmakit-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._stopping and not self._incoming and not self._waiting and not self.running:
                    # idle: the freed caches and scratch of the requests just served go back to the
                    # OS (load() has glibc keep freed memory for reuse while work goes on; heap.py)
                    return_freed_heap()
                while not self._stopping and not self._incoming and not self._waiting and not self.running:
                    self._lock.wait(timeout=1.0)
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # keep serving: fail what was running, not the server
                self._fail_running(f"{type(exc).__name__}: {exc}")

    # --- one iteration (engine thread) ----------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduler iteration: cancel, admit, prefill a chunk, decode a token, sample."""
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        self._drop_cancelled()
        self._admit()
        produced = 0
        prefilling = [s for s in self._owner if s is not None and s.fed < s.prompt_len]
        if prefilling:
            produced += self._prefill(prefilling)
        decoding = [s for s in self._owner if s is not None and s.fed == len(s.tokens) - 1
                    and s.fed >= s.prompt_len]
        if decoding:
            produced += self._decode(decoding)
        self.stats.steps_total += 1
        self.stats.generated_tokens_total += produced
        self.stats.recent.append((time.perf_counter(), produced))

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._waiting if s.handle.cancelled]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled")
        for seq in self._owner:
            if seq is not None and seq.handle.cancelled:
                self._finish(seq, "cancelled")

    def _admit(self) -> None:
        while self._waiting:
            free = [r for r in range(self.rows) if self._owner[r] is None]
            if not free:
                return
            seq = self._waiting.popleft()
            # a scored prompt is computed whole: cached keys/values come without their logits
            row, reuse = (min(free, key=lambda r: self._row_used[r]), 0) if seq.scores else self._pick_row(
                free, seq)
            self.cache.truncate(row, reuse)
            self._row_tokens[row] = self._row_tokens[row][:reuse]
            self._owner[row] = seq
            seq.row, seq.fed = row, reuse
            if seq.index == 0:
                seq.handle.cached_tokens = reuse
            self.stats.cached_tokens_total += reuse

    def _pick_row(self, free: list[int], seq: _Sequence) -> tuple[int, int]:
        """The free row holding the longest reusable prefix of ``seq``'s prompt (else the least recently used)."""
        best_row, best_len = min(free, key=lambda r: self._row_used[r]), 0
        if self.position_offset:  # PaliGemma: its whole prompt is one group (and column 0 is never written)
            return best_row, 0
        prompt = seq.keys
        groups = seq.handle.request.media.groups if seq.handle.request.media is not None else None
        for r in free:
            held = self._row_tokens[r]
            n = 0
            limit = min(len(held), len(prompt) - 1)  # the last prompt token is always computed: its logits
            while n < limit and held[n] == prompt[n]:
                n += 1
            if groups is not None and 0 < n < len(prompt) and _inside_group(groups, n):
                # the cached half of a group saw its other half: reuse it only if that is the same too
                end = _group_end(groups, n)
                if held[n:end] != prompt[n:end]:
                    n = int(groups[n])
            if n > best_len and self.cache.holds_prefix(r, n):
                best_row, best_len = r, n
        return best_row, best_len

    def _prefill(self, seqs: list[_Sequence]) -> int:
        """One chunk of every prompt still being read: the scored prompts in one forward pass,
        with logits at every position, the others (the usual case) in another, with the last only."""
        scored = [s for s in seqs if s.scores]
        plain = [s for s in seqs if not s.scores]
        return (self._prefill_rows(plain, self.prefill_chunk, False) if plain else 0) + (
            self._prefill_rows(scored, min(self.prefill_chunk, SCORE_CHUNK), True) if scored else 0)

    def _prefill_rows(self, seqs: list[_Sequence], size: int, score: bool) -> int:
        """One chunk of at most ``size`` tokens of each of ``seqs``, left-padded into one forward pass."""
        chunks = [s.tokens[s.fed:_chunk_end(s, size)] for s in seqs]
        ending = [i for i, (s, c) in enumerate(zip(seqs, chunks)) if s.fed + len(c) == s.prompt_len]
        logits, masks = self._forward_and_masks(seqs, chunks, ending, every_position=score)
        produced = 0
        last = logits[:, -1] if score else logits  # [len(seqs), V]
        picks = _plain_greedy_picks(seqs, last)  # (used only by rows whose prompt ends in this chunk)
        for i, (seq, chunk) in enumerate(zip(seqs, chunks)):
            if score:
                self._score(seq, logits[i, logits.shape[1] - len(chunk):])
            self._row_tokens[seq.row].extend(seq.keys[seq.fed:seq.fed + len(chunk)])
            seq.fed += len(chunk)
            self.stats.prefilled_tokens_total += len(chunk)
            if seq.fed == seq.prompt_len:
                if seq.max_new == 0:  # only read (and scored): nothing to generate
                    self._finish(seq, "length")
                    continue
                produced += self._sample_or_fail(seq, last[i], picks[i], masks.get(i))
        return produced

    def _score(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """The logprobs of the prompt tokens that ``logits [len(chunk), V]`` (one per position of the
        chunk starting at ``seq.fed``) predict, appended to the handle's ``prompt_scores``."""
        scores, k = seq.handle.prompt_scores, seq.handle.request.prompt_logprobs
        if seq.fed == 0:
            scores.append((seq.tokens[0], None, None))
        predicted = seq.tokens[seq.fed + 1:seq.fed + 1 + len(logits)][:seq.prompt_len - seq.fed - 1]
        for start in range(0, len(predicted), SCORE_SLICE):  # bounds the float32 log-softmax's memory
            ids = torch.tensor(predicted[start:start + SCORE_SLICE], device=logits.device)
            logp = torch.log_softmax(logits[start:start + len(ids)].float(), dim=-1)
            chosen = logp.gather(-1, ids[:, None])[:, 0].tolist()
            top = torch.topk(logp, k, dim=-1) if k else None
            for j, token in enumerate(ids.tolist()):
                best = [(int(i), float(v)) for v, i in zip(top.values[j], top.indices[j])] if top is not None else []
                scores.append((token, chosen[j], best))

    def _decode(self, seqs: list[_Sequence]) -> int:
        logits, masks = self._forward_and_masks(seqs, [[s.tokens[-1]] for s in seqs], range(len(seqs)))
        picks = _plain_greedy_picks(seqs, logits)
        produced = 0
        for i, seq in enumerate(seqs):
            self._row_tokens[seq.row].append(seq.tokens[-1])
            seq.fed += 1
            produced += self._sample_or_fail(seq, logits[i], picks[i], masks.get(i))
        return produced

    def _forward_and_masks(self, seqs: list[_Sequence], chunks: list[list[int]], sampling,
                           every_position: bool = False) -> tuple[torch.Tensor, dict[int, object]]:
        """:meth:`_forward`, and beside it, on the grammar worker thread, the next-token masks of
        the constrained rows among ``sampling`` (indices into ``seqs``): ``(logits, {index: mask})``.

        A failed mask computation is no row's in particular, so it leaves ``{}``: each constrained
        row then computes its own in :meth:`_sample`, where an error fails that row alone.
        """
        constrained = [i for i in sampling if seqs[i].grammar is not None]
        job = start_masks([seqs[i].grammar for i in constrained]) if constrained else None
        try:
            logits = self._forward(seqs, chunks, every_position)
        finally:
            try:
                masks = dict(zip(constrained, job.result())) if job is not None else {}
            except Exception:
                masks = {}
        return logits, masks

    def _sample_or_fail(self, seq: _Sequence, logits: torch.Tensor, token: int | None, mask=None) -> int:
        """:meth:`_sample`, where an error fails ``seq`` alone: what goes wrong in one row's sampling
        (its parameters, its grammar, its consumer) is that row's, and its batch-mates go on."""
        try:
            return self._sample(seq, logits, token, mask)
        except Exception as exc:
            if seq.row >= 0:
                self._fail(seq, f"{type(exc).__name__}: {exc}")
            return 0

    def _forward(self, seqs: list[_Sequence], chunks: list[list[int]], every_position: bool = False) -> torch.Tensor:
        """Run ``chunks`` (one per sequence) on the smallest slice of rows holding them -> logits
        ``[len(seqs), V]``, or ``[len(seqs), T, V]`` at every (left-padded) position if asked."""
        lo = min(s.row for s in seqs)
        hi = max(s.row for s in seqs) + 1
        T = max(len(c) for c in chunks)
        device = self.model.device
        ids = torch.zeros(hi - lo, T, dtype=torch.long)
        positions = torch.full((hi - lo, T), -1, dtype=torch.long)
        for seq, chunk in zip(seqs, chunks):
            r = seq.row - lo
            ids[r, T - len(chunk):] = torch.tensor(chunk, dtype=torch.long)
            positions[r, T - len(chunk):] = torch.arange(seq.fed, seq.fed + len(chunk))
        media = self._media_inputs(seqs, chunks, ids, T, lo)
        if self.position_offset:
            positions = torch.where(positions >= 0, positions + self.position_offset, positions)
        logits = self.model(ids.to(device), cache=self.cache.view(lo, hi), positions=positions.to(device),
                            last_only=not every_position, **media)  # [rows, 1 or T, V]
        index = torch.tensor([s.row - lo for s in seqs], device=logits.device)
        return logits[index].float() if every_position else logits[index, -1].float()

    def _media_inputs(self, seqs: list[_Sequence], chunks: list[list[int]], ids: torch.Tensor, T: int,
                      lo: int) -> dict[str, torch.Tensor]:
        """The decoder's ``inputs_embeds`` and ``groups`` for a call whose prompt chunks read media
        (``ids`` becomes the decoder's ids there), or ``{}``; other rows are embedded as text."""
        reading = [(s, c) for s, c in zip(seqs, chunks)
                   if s.handle.request.media is not None and s.fed < s.prompt_len]
        if not reading and (self.media_model is None or self.media_model.plain_text_embedding):
            return {}
        h = self.media_model.embed_text(ids.to(self.model.device))  # [rows, T, hidden]
        groups = torch.full(ids.shape, -1, dtype=torch.long)
        for seq, chunk in reading:
            media, r, a, b = seq.handle.request.media, seq.row - lo, seq.fed, seq.fed + len(chunk)
            h[r, T - len(chunk):] = media.embeds[a:b].to(h.dtype)
            ids[r, T - len(chunk):] = media.ids[a:b].cpu()
            if media.groups is not None:
                groups[r, T - len(chunk):] = media.groups[a:b].cpu()
        out = {"inputs_embeds": h}
        if bool((groups >= 0).any()):
            out["groups"] = groups.to(self.model.device)
        return out

    def _sample(self, seq: _Sequence, logits: torch.Tensor, token: int | None = None, mask=None) -> int:
        """Pick the next token of ``seq`` from ``logits [V]`` (unless ``token`` is already picked,
        by :func:`_plain_greedy_picks`), under its grammar's ``mask`` if it has a grammar (computed
        here if not given), report it, and finish if it stops.

        Logprobs are the model's own, before biases, penalties and the mask, as vLLM reports them."""
        params = seq.handle.request.params
        raw = logits
        if params.penalised:
            if seq.counts is None:
                seq.counts = torch.zeros_like(logits)
                seq.seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
                seq.seen[torch.tensor(seq.tokens[:seq.prompt_len])] = True
            logits = apply_penalties(logits, params, seq.seen, seq.counts)
        if seq.grammar is not None:
            logits = apply_mask(logits, mask if mask is not None else fill_masks([seq.grammar])[0])
        if token is None:
            token = sample_one(logits, params, seq.generator)
        ended = False
        if seq.grammar is not None:
            seq.grammar.advance(token)
            ended = seq.grammar.finished
        seq.tokens.append(token)
        seq.generated += 1
        if seq.counts is not None:
            seq.counts[token] += 1
            seq.seen[token] = True
        handle = seq.handle
        handle.completion_tokens += 1
        if handle.first_token_at is None:
            handle.first_token_at = time.perf_counter()
        event = Event(index=seq.index, token_id=token)
        want = handle.request.logprobs
        if want is not None:
            logp = torch.log_softmax(raw, dim=-1)
            event.logprob = float(logp[token])
            if want > 0:
                top = torch.topk(logp, want)
                event.top_logprobs = [(int(i), float(v)) for v, i in zip(top.values, top.indices)]
        event.text, finish = seq.output.push(token, seq.generated, seq.max_new, end=ended)
        if finish is not None:
            event.finish_reason = finish
            self._emit(handle, event)
            self._release(seq)
            return 1
        self._emit(handle, event)
        return 1

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        self._emit(seq.handle, Event(index=seq.index, finish_reason=reason, error=error))
        self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        """Free the row but keep its keys/values: a later prompt with the same prefix reuses them."""
        if seq.row >= 0:
            self._owner[seq.row] = None
            self._row_used[seq.row] = time.perf_counter()
            seq.row = -1
        seq.handle.remaining -= 1
        if seq.handle.remaining == 0:
            self.stats.requests_finished += 1
            self.stats.requests_cancelled += seq.handle.cancelled

    def _emit(self, handle: RequestHandle, event: Event) -> None:
        try:
            handle.on_event(event)
        except Exception:  # a broken consumer must not stop the engine
            handle.cancel()

    def _fail(self, seq: _Sequence, message: str) -> None:
        """End ``seq`` with an error; its row's keys/values are dropped, as nothing vouches for them."""
        self.cache.truncate(seq.row, 0)
        self._row_tokens[seq.row] = []
        self._finish(seq, "error", message)

    def _fail_running(self, message: str) -> None:
        """A step that failed outside any one row's sampling (a forward pass) fails every running row."""
        for seq in list(self._owner):
            if seq is not None:
                self._fail(seq, message)

    # --- a synchronous helper (tests, scripts) --------------------------------------------------

    def generate(self, requests: Sequence[Request], timeout: float = 300.0) -> list[list[list[int]]]:
        """Run ``requests`` to completion on the engine thread; token ids per request and choice."""
        results = [[[] for _ in range(r.n)] for r in requests]
        done = threading.Semaphore(0)
        pending = [r.n for r in requests]

        def collector(k: int):
            def on_event(ev: Event) -> None:
                if ev.token_id is not None:
                    results[k][ev.index].append(ev.token_id)
                if ev.finish_reason is not None:
                    pending[k] -= 1
                    if pending[k] == 0:
                        done.release()
            return on_event

        self.start()
        for k, r in enumerate(requests):
            self.submit(r, collector(k))
        deadline = time.monotonic() + timeout
        for _ in requests:
            if not done.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
                raise TimeoutError("the engine did not finish in time")
        return results


def _chunk_end(seq: _Sequence, size: int) -> int:
    """Where ``seq``'s next prefill chunk of at most ``size`` tokens ends: never inside a group of
    soft tokens that attend both ways (each must be computed whole), so before such a group, or past
    its end where it starts the chunk."""
    end = min(seq.fed + size, seq.prompt_len)
    media = seq.handle.request.media
    if media is None or media.groups is None or end == seq.prompt_len:
        return end
    groups = media.groups
    if _inside_group(groups, end):
        start = int(groups[end])
        end = start if start > seq.fed else _group_end(groups, end)
    return end


def _inside_group(groups: torch.Tensor, i: int) -> bool:
    """Whether a cut before position ``i`` (0 < i < len) falls inside a group of soft tokens."""
    return int(groups[i]) >= 0 and bool(groups[i] == groups[i - 1])


def _group_end(groups: torch.Tensor, i: int) -> int:
    """One past the last position of the group that position ``i`` is in."""
    later = (groups[i:] != groups[i]).nonzero()
    return i + int(later[0]) if len(later) else len(groups)


def _plain_greedy_picks(seqs: list[_Sequence], logits: torch.Tensor) -> list[int | None]:
    """The argmax of each row of ``logits [len(seqs), V]`` whose sequence decodes greedily on the
    model's own logits (None for the others, which :meth:`Engine._sample` samples alone): one argmax and
    one read-back for the batch, where row by row would wait for the device once per row."""
    plain = [i for i, s in enumerate(seqs) if s.handle.request.params.plain_greedy and s.grammar is None]
    picks: list[int | None] = [None] * len(seqs)
    if plain:
        for i, token in zip(plain, argmax(logits[plain]).tolist()):
            picks[i] = token
    return picks
