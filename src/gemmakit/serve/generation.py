"""One completion from submit to answer, shared by the chat and text routes: a JSON body or an SSE stream.

The engine thread (or a vision/speculative worker thread) produces events; each request's
coroutine receives them through an asyncio queue, so the event loop never blocks on the model.
A client that goes away cancels its request, which frees its batch row at the next token
boundary: the collecting loop polls for the disconnect, and a streaming generator that is
closed cancels in its ``finally``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from gemmakit.chat.tools import Piece, ReplyParser, joined, reply_pieces
from gemmakit.engine.grammar import CompiledGrammar, GrammarError
from gemmakit.engine.scheduler import Event, Request, RequestHandle
from gemmakit.models.multimodal import ImagePrompt
from gemmakit.serve.errors import FieldError, error_response
from gemmakit.serve.schemas import Common
from gemmakit.serve.state import ServerState


class _Stream:
    """Events of one request, carried from the engine thread into the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def on_event(self, event: Event) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


@dataclass(frozen=True)
class Echo:
    """A text completion's ``echo``: the prompt's text to put first, and whether its first token
    is the <bos> the server added (in the logprobs, but no part of the text)."""

    text: str
    added_bos: bool


async def run(state: ServerState, request: HTTPRequest, prompt: list[int], common: Common, logprobs: int | None,
              chat: bool, media: ImagePrompt | None = None, echo: Echo | None = None,
              reply: Callable[[], ReplyParser | None] | None = None):
    """Submit ``prompt`` to the path that serves it and answer with the whole completion or its stream.

    ``media`` (the model bound to the request's media, serve/vision.py) has the towers run first; greedy
    text requests go to the speculative runner when there is one; everything else to the batching engine. ``echo``
    with ``logprobs`` has the engine score the prompt. ``reply`` makes each chat choice's parser
    (reasoning, content and tool calls apart; chat/tools.py).
    """
    handle, stream = await submit(state, prompt, common, logprobs, media, echo)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    answer = _Answer(state, handle, stream, rid, chat, echo, reply)
    if common.stream:
        return StreamingResponse(answer.sse(common.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await answer.collect(request)


async def submit(state: ServerState, prompt: list[int], common: Common, logprobs: int | None = None,
                 media: ImagePrompt | None = None, echo: Echo | None = None
                 ) -> tuple[RequestHandle, _Stream]:
    """``prompt`` submitted to the path that serves it: its handle, and the stream its events arrive on."""
    grammar = await compiled_grammar(state, common)
    stream = _Stream(asyncio.get_running_loop())
    plain = grammar is None and echo is None and common.max_tokens > 0
    embedded = None
    if media is not None:  # the towers run once, on a worker thread, before the request is queued
        embedded = await asyncio.to_thread(state.vision.media, media, prompt)
    if embedded is None and plain and state.speculative is not None and state.speculative.accepts(common, logprobs):
        handle = state.speculative.submit(prompt, common, stream.on_event)
    else:
        engine_request = Request(prompt_ids=tuple(prompt), max_tokens=common.max_tokens, params=common.params,
                                 n=common.n, stop=common.stop, logprobs=logprobs,
                                 stop_ids=frozenset() if common.ignore_eos else None, grammar=grammar,
                                 prompt_logprobs=logprobs if echo is not None else None, media=embedded)
        handle = state.engine.submit(engine_request, stream.on_event)
    return handle, stream


async def compiled_grammar(state: ServerState, common: Common) -> CompiledGrammar | None:
    """The request's grammar compiled against the served vocabulary, on a thread (the first one
    builds the vocabulary's index, about a second); one that does not compile is a 400 naming its field."""
    if common.constraint is None:
        return None
    try:
        return await asyncio.to_thread(state.engine.compile_grammar, common.constraint.grammar)
    except GrammarError as exc:
        raise FieldError(str(exc), common.constraint.param) from None


class _Answer:
    """The events of one submitted request turned into OpenAI's completion objects."""

    def __init__(self, state: ServerState, handle: RequestHandle, stream: _Stream, rid: str, chat: bool,
                 echo: Echo | None = None, reply: Callable[[], ReplyParser | None] | None = None) -> None:
        self.state, self.handle, self.stream, self.rid, self.chat = state, handle, stream, rid, chat
        self.echo = echo
        self.want_logprobs = handle.request.logprobs is not None
        n = handle.request.n
        self.parsers = [reply() for _ in range(n)] if reply is not None else [None] * n

    def pieces(self, ev: Event) -> list[Piece]:
        """The reply pieces an event completes (all of its text as content without a parser)."""
        return reply_pieces(self.parsers[ev.index], ev.text, ev.finish_reason is not None)

    def finish_reason(self, ev: Event) -> str | None:
        parser = self.parsers[ev.index]
        return "tool_calls" if ev.finish_reason == "stop" and parser is not None and parser.calls else ev.finish_reason

    def token_text(self, token_id: int) -> str:
        tokenizer = self.state.tokenizer
        return tokenizer.decode([token_id]) if tokenizer is not None else ""

    def logprob_content(self, ev: Event) -> dict[str, Any]:
        """One token's entry in a chat ``logprobs.content`` list."""
        text = self.token_text(ev.token_id)
        top = [{"token": self.token_text(i), "logprob": lp, "bytes": list(self.token_text(i).encode())}
               for i, lp in ev.top_logprobs or []]
        return {"token": text, "logprob": ev.logprob, "bytes": list(text.encode()), "top_logprobs": top}

    def usage(self) -> dict[str, Any]:
        prompt, completion = self.handle.prompt_tokens, self.handle.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.handle.cached_tokens}}

    async def collect(self, request: HTTPRequest):
        """The whole completion as one JSON object; a 499 if the client left first."""
        handle, chat = self.handle, self.chat
        n = handle.request.n
        texts, reasons = [self.echo.text if self.echo else ""] * n, [None] * n
        replies: list[list[Piece]] = [[] for _ in range(n)]
        content: list[list[dict]] = [[] for _ in range(n)]
        legacy: list[dict[str, list]] = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                                         for _ in range(n)]
        try:
            while any(r is None for r in reasons):
                try:
                    ev = await asyncio.wait_for(self.stream.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        return error_response(499, "client closed the request")
                    continue
                if ev.token_id is not None and self.want_logprobs:
                    if chat:
                        content[ev.index].append(self.logprob_content(ev))
                    else:
                        lg = legacy[ev.index]
                        lg["text_offset"].append(len(texts[ev.index]))
                        lg["tokens"].append(self.token_text(ev.token_id))
                        lg["token_logprobs"].append(ev.logprob)
                        lg["top_logprobs"].append({self.token_text(i): lp for i, lp in ev.top_logprobs or []})
                texts[ev.index] += ev.text
                if chat:
                    replies[ev.index] += self.pieces(ev)
                if ev.finish_reason is not None:
                    if ev.finish_reason == "error":
                        return error_response(500, ev.error or "generation failed", "server_error")
                    reasons[ev.index] = self.finish_reason(ev)
        finally:  # an error, a disconnect or a cancelled task: free the row
            if any(r is None for r in reasons):
                handle.cancel()
        if chat:
            choices = [{"index": i, "message": _message(replies[i]),
                        "logprobs": {"content": content[i]} if self.want_logprobs else None,
                        "finish_reason": reasons[i]} for i in range(n)]
        else:
            if self.echo is not None and self.want_logprobs:
                prompt = self.prompt_logprobs()
                legacy = [{key: prompt[key] + lg[key] for key in lg} for lg in legacy]
            choices = [{"index": i, "text": texts[i], "logprobs": legacy[i] if self.want_logprobs else None,
                        "finish_reason": reasons[i]} for i in range(n)]
        return {"id": self.rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.state.model_name, "choices": choices,
                "usage": self.usage()}

    def prompt_logprobs(self) -> dict[str, list]:
        """The prompt's tokens in the legacy ``logprobs`` lists (the engine scored them): the first
        token's logprob and top list null; a <bos> the server added takes no room in the text."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for j, (token, logprob, top) in enumerate(self.handle.prompt_scores):
            text = self.token_text(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(None if top is None else {self.token_text(i): lp for i, lp in top})
            out["text_offset"].append(offset)
            offset += 0 if j == 0 and self.echo.added_bos else len(text)
        return out

    async def sse(self, include_usage: bool) -> AsyncIterator[str]:
        """The completion as server-sent events: one chunk per event, then ``[DONE]``."""
        handle, chat = self.handle, self.chat
        n = handle.request.n
        open_choices = n
        calls_sent = [0] * n
        created_at = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict], **extra) -> str:
            body = {"id": self.rid, "object": kind, "created": created_at, "model": self.state.model_name,
                    "choices": choices}
            if include_usage:
                body["usage"] = None
            body.update(extra)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(n)])
            while open_choices:
                ev = await self.stream.queue.get()
                if ev.finish_reason == "error":
                    err = {"message": ev.error or "generation failed", "type": "server_error", "param": None,
                           "code": None}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    return
                if ev.finish_reason is not None:
                    open_choices -= 1
                pieces = self.pieces(ev) if chat else []
                if not (pieces if chat else ev.text) and ev.finish_reason is None and not self.want_logprobs:
                    continue
                logprobs = None
                if self.want_logprobs and ev.token_id is not None:
                    if chat:
                        logprobs = {"content": [self.logprob_content(ev)]}
                    else:
                        logprobs = {"tokens": [self.token_text(ev.token_id)], "token_logprobs": [ev.logprob],
                                    "top_logprobs": [{self.token_text(i): lp for i, lp in ev.top_logprobs or []}],
                                    "text_offset": [0]}
                if chat:
                    delta, calls_sent[ev.index] = _delta(pieces, calls_sent[ev.index])
                    choice = {"index": ev.index, "delta": delta, "logprobs": logprobs,
                              "finish_reason": self.finish_reason(ev)}
                else:
                    choice = {"index": ev.index, "text": ev.text, "logprobs": logprobs,
                              "finish_reason": ev.finish_reason}
                yield chunk([choice])
            if include_usage:
                yield chunk([], usage=self.usage())
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the task is cancelled): free the row
            if open_choices:
                handle.cancel()


def _message(pieces: list[Piece]) -> dict[str, Any]:
    """A chat choice's ``message``: content (null beside calls, as OpenAI's), reasoning, calls."""
    content, reasoning = joined(pieces, "content"), joined(pieces, "reasoning")
    calls = [p.call.as_openai() for p in pieces if p.kind == "tool_call"]
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message


def _delta(pieces: list[Piece], calls_sent: int) -> tuple[dict[str, Any], int]:
    """One chunk's ``delta`` and the choice's count of calls sent so far; each call goes out whole,
    in one delta with its index, id, name and arguments."""
    delta: dict[str, Any] = {}
    content, reasoning = joined(pieces, "content"), joined(pieces, "reasoning")
    if reasoning:
        delta["reasoning_content"] = reasoning
    if content:
        delta["content"] = content
    calls = []
    for p in pieces:
        if p.kind == "tool_call":
            calls.append({"index": calls_sent, **p.call.as_openai()})
            calls_sent += 1
    if calls:
        delta["tool_calls"] = calls
    return delta, calls_sent
