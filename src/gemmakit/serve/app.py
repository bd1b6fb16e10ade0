"""The OpenAI-compatible HTTP server: a FastAPI app over one :class:`~gemmakit.engine.scheduler.Engine`.

``create_app(engine, tokenizer, model_name)`` builds the app (tests start it on a loopback port
with a tiny model; ``gemmakit serve`` with a real one). Routes:

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models
    GET /health   POST /tokenize   POST /detokenize   GET /metrics (Prometheus text)

The engine thread produces events; each request's coroutine receives them through an asyncio
queue, so the event loop never blocks on the model. A client that goes away cancels its request,
which frees its batch row at the next token boundary.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from gemmakit.chat import render_chat
from gemmakit.engine.scheduler import Engine, Event, Request, RequestHandle
from gemmakit.errors import GemmakitError
from gemmakit.serve import protocol
from gemmakit.serve.protocol import FieldError


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class _Stream:
    """Events of one request, carried from the engine thread into the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def on_event(self, event: Event) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               default_max_tokens: int = 256, accepts_images: bool = False, vision=None,
               speculative=None) -> FastAPI:
    """The app serving ``engine`` under the model id ``model_name``; starts the engine with the app.

    ``speculative`` (a :class:`~gemmakit.serve.speculative.SpeculativeRunner`) serves greedy requests
    with a draft model. ``vision`` (a :class:`~gemmakit.serve.vision.VisionRunner`) serves a vision model's chat
    requests, images or not, one at a time; ``engine`` then runs its text decoder for the rest.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="gemmakit", lifespan=lifespan)
    created = int(time.time())
    http = {"requests": {}}  # per-route status counts for /metrics

    @app.middleware("http")
    async def guard(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path != "/health":
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return _count(http, request, error_response(401, "invalid or missing API key (Authorization: Bearer)",
                                                            "authentication_error", code="invalid_api_key"))
        try:
            response = await call_next(request)
        except Exception as exc:  # never a bare traceback to the client
            response = error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return _count(http, request, response)

    async def read_json(request: HTTPRequest) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise FieldError(f"the request body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise FieldError("the request body must be a JSON object")
        return body

    def check_model(body: dict[str, Any]) -> None:
        name = body.get("model")
        if name is not None and name != model_name:
            raise FieldError(f"the model {name!r} does not exist; this server serves {model_name!r}",
                             "model", "model_not_found")

    @app.exception_handler(GemmakitError)
    async def gemmakit_error(request: HTTPRequest, exc: GemmakitError):
        return error_response(400, str(exc), param=getattr(exc, "param", None), code=getattr(exc, "code", None))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "gemmakit", "max_model_len": engine.max_seq_len}]}

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        body = await read_json(request)
        check_model(body)
        require_tokenizer()
        if "messages" in body and vision is not None:
            ids = (await asyncio.to_thread(vision.prepare, body, None))[2]
        elif "messages" in body:
            text = render_chat(protocol.chat_messages(body, accepts_images), tokenizer=tokenizer)
            ids = tokenizer.encode(text, add_bos=True)
        elif isinstance(body.get("prompt"), str):
            ids = tokenizer.encode(body["prompt"], add_bos=bool(body.get("add_special_tokens", True)))
        else:
            raise FieldError("give 'prompt' (a string) or 'messages'", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        body = await read_json(request)
        check_model(body)
        require_tokenizer()
        ids = body.get("tokens")
        vocab = engine.model.config.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise FieldError(f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
        return {"prompt": tokenizer.decode(ids)}

    def require_tokenizer() -> None:
        if tokenizer is None:
            raise FieldError("this model has no tokenizer; only token-id prompts can be served")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await read_json(request)
        check_model(body)
        require_tokenizer()
        common = protocol.parse_common(body, default_max_tokens, chat=True)
        logprobs = protocol.parse_logprobs(body, chat=True)
        if vision is not None:
            text, images, ids = await asyncio.to_thread(vision.prepare, body, common)  # decodes images
            return await run(request, ids, common, None, chat=True, images=(text, images))
        text = render_chat(protocol.chat_messages(body, accepts_images), tokenizer=tokenizer)
        prompt = tokenizer.encode(text, add_bos=True)
        return await run(request, prompt, common, logprobs, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await read_json(request)
        check_model(body)
        common = protocol.parse_common(body, 16, chat=False)
        if vision is not None and vision.layout == "paligemma":
            raise FieldError("PaliGemma answers about an image: send it to /v1/chat/completions as an image_url part")
        logprobs = protocol.parse_logprobs(body, chat=False)
        if isinstance(body.get("prompt"), str) or isinstance(body.get("prompt"), list) and body["prompt"] \
                and isinstance(body["prompt"][0], str):
            require_tokenizer()
        prompt = protocol.completion_prompt(body, tokenizer)
        return await run(request, prompt, common, logprobs, chat=False)

    async def run(request: HTTPRequest, prompt: list[int], common: protocol.Common, logprobs: int | None,
                  chat: bool, images: tuple[str, list[bytes]] | None = None):
        stream = _Stream(asyncio.get_running_loop())
        if images is not None:  # the vision path: rendered text + images, generated in a worker thread
            handle = vision.submit(images[0], images[1], prompt, common, stream.on_event)
        elif speculative is not None and speculative.accepts(common, logprobs):  # greedy, with a draft model
            handle = speculative.submit(prompt, common, stream.on_event)
        else:
            handle = None
        engine_request = Request(prompt_ids=tuple(prompt), max_tokens=common.max_tokens, params=common.params,
                                 n=common.n, stop=common.stop, logprobs=logprobs,
                                 stop_ids=frozenset() if common.ignore_eos else None)
        handle = handle or engine.submit(engine_request, stream.on_event)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if common.stream:
            return StreamingResponse(_sse(handle, stream, rid, chat, common), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _collect(request, handle, stream, rid, chat)

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id]) if tokenizer is not None else ""

    def logprob_content(ev: Event) -> dict[str, Any]:
        """One token's entry in a chat ``logprobs.content`` list."""
        text = token_text(ev.token_id)
        top = [{"token": token_text(i), "logprob": lp, "bytes": list(token_text(i).encode())}
               for i, lp in ev.top_logprobs or []]
        return {"token": text, "logprob": ev.logprob, "bytes": list(text.encode()), "top_logprobs": top}

    def usage(handle: RequestHandle) -> dict[str, Any]:
        prompt = handle.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": handle.completion_tokens,
                "total_tokens": prompt + handle.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": handle.cached_tokens}}

    async def _collect(request: HTTPRequest, handle: RequestHandle, stream: _Stream, rid: str, chat: bool):
        n = handle.request.n
        texts, reasons = [""] * n, [None] * n
        content: list[list[dict]] = [[] for _ in range(n)]
        legacy: list[dict[str, list]] = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                                         for _ in range(n)]
        want_logprobs = handle.request.logprobs is not None
        try:
            while any(r is None for r in reasons):
                try:
                    ev = await asyncio.wait_for(stream.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        return error_response(499, "client closed the request")
                    continue
                if ev.token_id is not None and want_logprobs:
                    if chat:
                        content[ev.index].append(logprob_content(ev))
                    else:
                        lg = legacy[ev.index]
                        lg["text_offset"].append(len(texts[ev.index]))
                        lg["tokens"].append(token_text(ev.token_id))
                        lg["token_logprobs"].append(ev.logprob)
                        lg["top_logprobs"].append({token_text(i): lp for i, lp in ev.top_logprobs or []})
                texts[ev.index] += ev.text
                if ev.finish_reason is not None:
                    if ev.finish_reason == "error":
                        return error_response(500, ev.error or "generation failed", "server_error")
                    reasons[ev.index] = ev.finish_reason
        finally:
            if any(r is None for r in reasons):
                handle.cancel()
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": {"content": content[i]} if want_logprobs else None,
                        "finish_reason": reasons[i]} for i in range(n)]
        else:
            choices = [{"index": i, "text": texts[i], "logprobs": legacy[i] if want_logprobs else None,
                        "finish_reason": reasons[i]} for i in range(n)]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices, "usage": usage(handle)}

    async def _sse(handle: RequestHandle, stream: _Stream, rid: str, chat: bool,
                   common: protocol.Common) -> AsyncIterator[str]:
        n = handle.request.n
        open_choices = n
        created_at = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        want_logprobs = handle.request.logprobs is not None

        def chunk(choices: list[dict], **extra) -> str:
            body = {"id": rid, "object": kind, "created": created_at, "model": model_name, "choices": choices}
            if common.include_usage:
                body["usage"] = None
            body.update(extra)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(n)])
            while open_choices:
                ev = await stream.queue.get()
                if ev.finish_reason == "error":
                    err = {"message": ev.error or "generation failed", "type": "server_error", "param": None,
                           "code": None}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    return
                if ev.finish_reason is not None:
                    open_choices -= 1
                if not ev.text and ev.finish_reason is None and not want_logprobs:
                    continue
                logprobs = None
                if want_logprobs and ev.token_id is not None:
                    if chat:
                        logprobs = {"content": [logprob_content(ev)]}
                    else:
                        logprobs = {"tokens": [token_text(ev.token_id)], "token_logprobs": [ev.logprob],
                                    "top_logprobs": [{token_text(i): lp for i, lp in ev.top_logprobs or []}],
                                    "text_offset": [0]}
                if chat:
                    choice = {"index": ev.index, "delta": {"content": ev.text} if ev.text else {},
                              "logprobs": logprobs, "finish_reason": ev.finish_reason}
                else:
                    choice = {"index": ev.index, "text": ev.text, "logprobs": logprobs,
                              "finish_reason": ev.finish_reason}
                yield chunk([choice])
            if common.include_usage:
                yield chunk([], usage=usage(handle))
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the task is cancelled): free the row
            if open_choices:
                handle.cancel()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(engine, http, model_name, speculative),
                                 media_type="text/plain; version=0.0.4")

    return app


def _count(http: dict, request: HTTPRequest, response) -> Any:
    key = (request.url.path, response.status_code)
    http["requests"][key] = http["requests"].get(key, 0) + 1
    return response


def _prometheus(engine: Engine, http: dict, model_name: str, speculative=None) -> str:
    """The Prometheus text exposition of the engine's counters and gauges."""
    s = engine.stats
    label = f'model="{model_name}"'
    rows = [
        ("gemmakit_requests_total", "counter", "completion requests accepted", s.requests_total),
        ("gemmakit_requests_finished_total", "counter", "completion requests finished", s.requests_finished),
        ("gemmakit_requests_cancelled_total", "counter", "requests cancelled (client went away)",
         s.requests_cancelled),
        ("gemmakit_prompt_tokens_total", "counter", "prompt tokens received", s.prompt_tokens_total),
        ("gemmakit_prefilled_tokens_total", "counter", "prompt tokens computed", s.prefilled_tokens_total),
        ("gemmakit_prefix_cache_hit_tokens_total", "counter", "prompt tokens reused from the prefix cache",
         s.cached_tokens_total),
        ("gemmakit_generation_tokens_total", "counter", "tokens generated", s.generated_tokens_total),
        ("gemmakit_engine_steps_total", "counter", "scheduler iterations", s.steps_total),
        ("gemmakit_queue_depth", "gauge", "sequences waiting for a batch row", engine.queue_depth),
        ("gemmakit_running_sequences", "gauge", "sequences in the running batch", engine.running),
        ("gemmakit_batch_rows", "gauge", "most sequences run at once", engine.rows),
        ("gemmakit_kv_cache_bytes", "gauge", "bytes of the key/value cache", engine.cache.nbytes()),
        ("gemmakit_generation_tokens_per_second", "gauge", "tokens generated per second, last 10 s",
         round(s.tokens_per_second(), 3)),
    ]
    if speculative is not None:
        rows += [("gemmakit_speculative_rounds_total", "counter", "draft-and-verify rounds", speculative.rounds),
                 ("gemmakit_speculative_accepted_tokens_total", "counter", "draft tokens the target accepted",
                  speculative.accepted)]
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{label}}} {value}"]
    lines += ["# HELP gemmakit_http_requests_total HTTP requests by route and status",
              "# TYPE gemmakit_http_requests_total counter"]
    for (path, status), count in sorted(http["requests"].items()):
        lines.append(f'gemmakit_http_requests_total{{path="{path}",status="{status}"}} {count}')
    return "\n".join(lines) + "\n"
