"""``POST /v1/responses``: OpenAI's Responses API, served as a chat.

The subset vLLM and llama.cpp serve, and no more (docs/serving.md lists it): ``input`` as a
string or a list of items (messages with text parts, earlier ``function_call`` and
``function_call_output`` items, earlier ``reasoning`` items), ``instructions``, function
``tools`` with ``tool_choice`` and ``parallel_tool_calls``, ``text.format`` (text, json_object,
json_schema), ``reasoning.effort`` (Gemma 4's thinking on or off), ``max_output_tokens``,
``temperature``, ``top_p``, ``seed``, ``stream``. The server keeps no responses, so
``previous_response_id``, ``background`` and ``conversation`` are refused; ``store``,
``metadata`` and ``user`` are accepted bookkeeping.

A request is translated into a chat request (:meth:`ResponsesRequest.chat_body`) and runs as
one; :class:`ResponseAnswer` turns the chat's reply pieces into output items and, streamed, into
the Responses API's typed events.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse
from pydantic import BeforeValidator

from gemmakit.chat.tools import Piece, ReplyParser, reply_pieces
from gemmakit.engine.scheduler import RequestHandle
from gemmakit.serve.errors import error_response, invalid
from gemmakit.serve.generation import _Stream
from gemmakit.serve.schemas import Number, ServedRequest, _metadata, _no_other_keys, checked
from gemmakit.serve.state import ServerState

_MESSAGE_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")


def _content(value: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content as chat takes it: a string, or text and image parts."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(f"'{where}' must be a string or a list of content parts", where)
    parts = []
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            _no_other_keys(part, ("type", "text", "annotations", "logprobs"), at)
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            _no_other_keys(part, ("type", "image_url", "detail"), at)
            parts.append({"type": "image_url", "image_url": {"url": part.get("image_url"),
                                                             **({"detail": part["detail"]} if "detail" in part
                                                                else {})}})
        else:
            raise invalid(f"'{at}' has a content part of unsupported type {kind!r} (use input_text, output_text "
                          "or input_image)", at)
    return parts


def _input(value: Any) -> list[dict[str, Any]]:
    """``input`` as chat messages: consecutive function calls join one assistant message, each
    output becomes a ``tool`` message, a reasoning item goes with the assistant turn after it."""
    if isinstance(value, str):
        if not value:
            raise invalid("'input' is empty", "input")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid("'input' must be a non-empty string or a non-empty list of items", "input")
    messages: list[dict[str, Any]] = []
    thoughts: str | None = None
    for i, item in enumerate(value):
        at = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"'{at}' must be an object", at)
        kind = item.get("type", "message")
        if kind == "message":
            _no_other_keys(item, ("type", "role", "content", "id", "status"), at)
            role = item.get("role")
            if role not in _MESSAGE_ROLES:
                raise invalid(f"'{at}.role' must be one of {', '.join(_MESSAGE_ROLES)}", f"{at}.role")
            message = {"role": role, "content": _content(item.get("content"), f"{at}.content")}
            if role == "assistant" and thoughts is not None:
                message["reasoning_content"], thoughts = thoughts, None
            messages.append(message)
        elif kind == "function_call":
            _no_other_keys(item, ("type", "call_id", "name", "arguments", "id", "status"), at)
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call],
                                 **({"reasoning_content": thoughts} if thoughts is not None else {})})
                thoughts = None
        elif kind == "function_call_output":
            _no_other_keys(item, ("type", "call_id", "output", "id", "status"), at)
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            _no_other_keys(item, ("type", "id", "summary", "content", "encrypted_content", "status"), at)
            texts = [p.get("text", "") for p in (item.get("content") or []) + (item.get("summary") or [])
                     if isinstance(p, dict)]
            thoughts = "".join(texts)
        else:
            raise invalid(f"'{at}' is an item of unsupported type {kind!r} (use message, function_call, "
                          "function_call_output or reasoning)", at)
    return messages


def _tools(value: Any) -> list[dict[str, Any]]:
    """The Responses API's flat function tools, as chat's ``{"type", "function": {...}}``."""
    if not isinstance(value, list):
        raise invalid("'tools' must be a list of function tools", "tools")
    out = []
    for i, tool in enumerate(value):
        at = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid(f"'{at}' must be a function tool ({{'type': 'function', 'name', 'parameters'}}); "
                          "this server runs no built-in tools", at)
        _no_other_keys(tool, ("type", "name", "description", "parameters", "strict"), at)
        out.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
    return out


def _tool_choice(value: Any) -> Any:
    if value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        _no_other_keys(value, ("type", "name"), "tool_choice")
        return {"type": "function", "function": {"name": value.get("name")}}
    raise invalid("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}",
                  "tool_choice")


def _text(value: Any) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format``; ``text.verbosity`` is refused."""
    if not isinstance(value, dict):
        raise invalid("'text' must be an object with a 'format'", "text")
    _no_other_keys(value, ("format",), "text")
    fmt = value.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise invalid("'text.format' must be an object with a 'type'", "text.format")
    if fmt.get("type") == "json_schema":
        _no_other_keys(fmt, ("type", "name", "schema", "description", "strict"), "text.format")
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    return fmt


def _reasoning(value: Any) -> bool:
    """``reasoning.effort``: thinking on for low, medium and high, off for none and minimal."""
    if not isinstance(value, dict):
        raise invalid("'reasoning' must be an object", "reasoning")
    _no_other_keys(value, ("effort",), "reasoning")
    effort = value.get("effort", "medium")
    if effort not in ("none", "minimal", "low", "medium", "high"):
        raise invalid("'reasoning.effort' must be none, minimal, low, medium or high", "reasoning.effort")
    return effort not in ("none", "minimal")


def _no_state(name: str):
    def refuse(value: Any) -> Any:
        if value not in (None, False):
            raise invalid(f"'{name}' is not supported: this server keeps no responses or conversations; send the "
                          "whole conversation as 'input'", name, "unsupported_field")
        return value
    return BeforeValidator(refuse)


def _truncation(value: Any) -> str:
    if value != "disabled":
        raise invalid("'truncation' must be 'disabled': a prompt longer than the context is refused", "truncation")
    return value


class ResponsesRequest(ServedRequest):
    """``POST /v1/responses``."""

    input: Annotated[list[dict[str, Any]], BeforeValidator(_input)]
    instructions: Annotated[str | None, checked((str,))] = None
    max_output_tokens: Annotated[int | None, checked((int,), 1)] = None
    temperature: Annotated[float, checked(Number, 0.0, 2.0)] = 1.0
    top_p: Annotated[float, checked(Number, 0.0, 1.0)] = 1.0
    seed: Annotated[int | None, checked((int,))] = None  # vLLM's extension
    stream: Annotated[bool, checked((bool,))] = False
    tools: Annotated[list[dict[str, Any]], BeforeValidator(_tools)] = []
    tool_choice: Annotated[Any, BeforeValidator(_tool_choice)] = None
    parallel_tool_calls: Annotated[bool, checked((bool,))] = True
    text: Annotated[dict[str, Any] | None, BeforeValidator(_text)] = None
    reasoning: Annotated[bool | None, BeforeValidator(_reasoning)] = None
    truncation: Annotated[str, BeforeValidator(_truncation)] = "disabled"
    store: Annotated[bool, checked((bool,))] = False  # bookkeeping: nothing is kept either way
    metadata: Annotated[dict[str, str] | None, BeforeValidator(_metadata)] = None
    user: Annotated[str | None, checked((str,))] = None
    previous_response_id: Annotated[Any, _no_state("previous_response_id")] = None
    conversation: Annotated[Any, _no_state("conversation")] = None
    background: Annotated[Any, _no_state("background")] = None

    def chat_body(self) -> dict[str, Any]:
        """The chat completions request this one runs as."""
        messages = ([{"role": "system", "content": self.instructions}] if self.instructions else []) + self.input
        body: dict[str, Any] = {"messages": messages, "temperature": self.temperature, "top_p": self.top_p,
                                "max_completion_tokens": self.max_output_tokens, "seed": self.seed,
                                "parallel_tool_calls": self.parallel_tool_calls}
        if self.tools:
            body["tools"] = self.tools
        if self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        if self.text is not None:
            body["response_format"] = self.text
        if self.reasoning is not None:
            body["chat_template_kwargs"] = {"enable_thinking": self.reasoning}
        return body

    def echo_fields(self) -> dict[str, Any]:
        """The request's settings as a response object repeats them."""
        choice = self.tool_choice
        if isinstance(choice, dict):
            choice = {"type": "function", "name": choice["function"]["name"]}
        fmt = self.text or {"type": "text"}
        if fmt.get("type") == "json_schema":
            fmt = {"type": "json_schema", **fmt["json_schema"]}
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "parallel_tool_calls": self.parallel_tool_calls,
                "tool_choice": choice or ("auto" if self.tools else "none"),
                "tools": [{"type": "function", **t["function"]} for t in self.tools], "text": {"format": fmt},
                "previous_response_id": None, "store": False, "metadata": self.metadata or {}, "truncation": "disabled",
                "user": self.user, "reasoning": None if self.reasoning is None else {
                    "effort": None, "summary": None}}


class ResponseAnswer:
    """One submitted chat's events as a Responses API object or its event stream."""

    def __init__(self, state: ServerState, handle: RequestHandle, stream: _Stream, parser: ReplyParser | None,
                 body: ResponsesRequest) -> None:
        self.state, self.handle, self.stream, self.parser, self.body = state, handle, stream, parser, body
        self.id = "resp_" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.output: list[dict[str, Any]] = []  # the items, built as pieces arrive
        self.finish: str | None = None

    def response(self, status: str) -> dict[str, Any]:
        prompt, completion = self.handle.prompt_tokens, self.handle.completion_tokens
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.state.model_name, "output": self.output, "error": None,
                "incomplete_details": incomplete, **self.body.echo_fields(),
                "usage": None if status == "in_progress" else {
                    "input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
                    "input_tokens_details": {"cached_tokens": self.handle.cached_tokens},
                    "output_tokens_details": {"reasoning_tokens": 0}}}

    def status(self) -> str:
        return "incomplete" if self.finish == "length" else "completed"

    def take(self, piece: Piece) -> list[tuple[str, dict[str, Any]]]:
        """Add ``piece`` to the output; the stream events it makes (item added, delta ...)."""
        events: list[tuple[str, dict[str, Any]]] = []
        last = self.output[-1] if self.output else None
        if piece.kind == "tool_call":
            events += self.close_last()
            item = {"type": "function_call", "id": "fc_" + uuid.uuid4().hex[:24], "call_id": piece.call.id,
                    "name": piece.call.name, "arguments": piece.call.arguments, "status": "completed"}
            self.output.append(item)
            index = len(self.output) - 1
            events += [("response.output_item.added", {"output_index": index, "item": {**item, "arguments": "",
                                                                                          "status": "in_progress"}}),
                       ("response.function_call_arguments.delta", {"item_id": item["id"], "output_index": index,
                                                                   "delta": item["arguments"]}),
                       ("response.function_call_arguments.done", {"item_id": item["id"], "output_index": index,
                                                                  "name": item["name"],
                                                                  "arguments": item["arguments"]}),
                       ("response.output_item.done", {"output_index": index, "item": item})]
            return events
        kind = "message" if piece.kind == "content" else "reasoning"
        if last is None or last["type"] != kind or last.get("status") == "completed":
            events += self.close_last()
            if kind == "message":
                last = {"type": "message", "id": "msg_" + uuid.uuid4().hex[:24], "status": "in_progress",
                        "role": "assistant", "content": [{"type": "output_text", "text": "", "annotations": []}]}
            else:
                last = {"type": "reasoning", "id": "rs_" + uuid.uuid4().hex[:24], "summary": [],
                        "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}
            self.output.append(last)
            index = len(self.output) - 1
            events.append(("response.output_item.added", {"output_index": index, "item": _copy(last)}))
            events.append(("response.content_part.added", {"item_id": last["id"], "output_index": index,
                                                            "content_index": 0, "part": _copy(last["content"][0])}))
        last["content"][0]["text"] += piece.text
        delta = {"item_id": last["id"], "output_index": len(self.output) - 1, "content_index": 0,
                 "delta": piece.text}
        events.append(("response.output_text.delta", {**delta, "logprobs": []}) if kind == "message"
                      else ("response.reasoning_text.delta", delta))
        return events

    def close_last(self) -> list[tuple[str, dict[str, Any]]]:
        """Finish the open message or reasoning item: its done events."""
        last = self.output[-1] if self.output else None
        if last is None or last.get("status") == "completed" or last["type"] == "function_call":
            return []
        last["status"] = "completed"
        index, part = len(self.output) - 1, last["content"][0]
        where = {"item_id": last["id"], "output_index": index, "content_index": 0}
        done = ("response.output_text.done", {**where, "text": part["text"], "logprobs": []}) \
            if last["type"] == "message" else ("response.reasoning_text.done", {**where, "text": part["text"]})
        return [done, ("response.content_part.done", {**where, "part": _copy(part)}),
                ("response.output_item.done", {"output_index": index, "item": _copy(last)})]

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The engine's events as (type, fields) pairs, ending with the output closed."""
        while self.finish is None:
            ev = await self.stream.queue.get()
            if ev.finish_reason == "error":
                raise _Failed(ev.error or "generation failed")
            for piece in reply_pieces(self.parser, ev.text, ev.finish_reason is not None):
                for event in self.take(piece):
                    yield event
            if ev.finish_reason is not None:
                self.finish = ev.finish_reason
        for event in self.close_last():
            yield event

    async def collect(self, request: HTTPRequest):
        try:
            pending = self.events().__aiter__()
            while True:
                try:
                    await asyncio.wait_for(pending.__anext__(), timeout=1.0)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return error_response(499, "client closed the request")
        except _Failed as exc:
            return error_response(500, str(exc), "server_error")
        finally:
            if self.finish is None:
                self.handle.cancel()
        return self.response(self.status())

    async def sse(self) -> AsyncIterator[str]:
        sequence = 0

        def event(kind: str, fields: dict[str, Any]) -> str:
            nonlocal sequence
            body = {"type": kind, "sequence_number": sequence, **fields}
            sequence += 1
            return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield event("response.created", {"response": self.response("in_progress")})
            yield event("response.in_progress", {"response": self.response("in_progress")})
            try:
                async for kind, fields in self.events():
                    yield event(kind, fields)
            except _Failed as exc:
                yield event("error", {"message": str(exc), "code": "server_error", "param": None})
                return
            status = self.status()
            yield event(f"response.{status}", {"response": self.response(status)})
        finally:
            if self.finish is None:
                self.handle.cancel()

    async def answer(self, request: HTTPRequest):
        if self.body.stream:
            return StreamingResponse(self.sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self.collect(request)


class _Failed(Exception):
    """The engine reported an error for this request."""


def _copy(value: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value))
