"""OpenAI request bodies -> engine requests, with a 400 for anything malformed.

Plain functions over the decoded JSON rather than schema classes: every check raises
:class:`~gemmakit.errors.InvalidRequestError` naming the offending field, which the app turns
into OpenAI's error format (``{"error": {"message", "type", "param", "code"}}``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gemmakit.engine.sampling import SamplingParams
from gemmakit.errors import InvalidRequestError

_MISSING = object()


class FieldError(InvalidRequestError):
    """A bad value in one request field; ``param`` names it (OpenAI's ``error.param``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def _field(body: Mapping[str, Any], name: str, kinds: tuple[type, ...], default: Any = None,
           low: float | None = None, high: float | None = None) -> Any:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise FieldError(f"'{name}' must be {names}, got {type(value).__name__}", name)
    if low is not None and value < low or high is not None and value > high:
        raise FieldError(f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


@dataclass(frozen=True)
class Common:
    """The fields chat and text completions share."""

    max_tokens: int
    params: SamplingParams
    n: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool  # vLLM's extension: keep going past end-of-turn tokens (benchmarks, tests)


def parse_common(body: Mapping[str, Any], default_max_tokens: int, chat: bool) -> Common:
    max_tokens = _field(body, "max_completion_tokens", (int,), None) if chat else None
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", (int,), default_max_tokens)
    if max_tokens < 1:
        raise FieldError(f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens")
    number = (int, float)
    params = SamplingParams(
        temperature=float(_field(body, "temperature", number, 1.0, 0.0, 2.0)),
        top_p=float(_field(body, "top_p", number, 1.0, 0.0, 1.0)) or 1e-9,
        top_k=_field(body, "top_k", (int,), 0, 0) if body.get("top_k") != -1 else 0,
        min_p=float(_field(body, "min_p", number, 0.0, 0.0, 1.0)),
        repetition_penalty=float(_field(body, "repetition_penalty", number, 1.0, 0.01, 10.0)),
        presence_penalty=float(_field(body, "presence_penalty", number, 0.0, -2.0, 2.0)),
        frequency_penalty=float(_field(body, "frequency_penalty", number, 0.0, -2.0, 2.0)),
        seed=_field(body, "seed", (int,), None),
    )
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise FieldError("'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    options = _field(body, "stream_options", (dict,), {})
    stream = _field(body, "stream", (bool,), False)
    return Common(max_tokens=max_tokens, params=params, n=_field(body, "n", (int,), 1, 1, 16),
                  stop=tuple(stop), stream=stream, include_usage=bool(options.get("include_usage")),
                  ignore_eos=_field(body, "ignore_eos", (bool,), False))


def parse_logprobs(body: Mapping[str, Any], chat: bool) -> int | None:
    """How many top logprobs per token (0 = only the chosen one's), or None when off."""
    if chat:
        if not _field(body, "logprobs", (bool,), False):
            if body.get("top_logprobs") is not None:
                raise FieldError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return None
        return _field(body, "top_logprobs", (int,), 0, 0, 20)
    return _field(body, "logprobs", (int,), None, 0, 20)


IMAGE_PARTS = ("image_url", "input_image", "image")


def message_parts(body: Mapping[str, Any], on_image: Callable[[Mapping[str, Any]], dict | None]
                  ) -> list[dict[str, Any]]:
    """Validated ``messages``; a list content becomes render_chat parts (``{"type": "text", ...}``).

    ``on_image(part)`` decides what an image part becomes: a part to keep, None to drop it, or a
    FieldError. Text-only and vision requests share this walk and differ only there.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FieldError("'messages' must be a non-empty list", "messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise FieldError(f"messages[{i}] must be an object", "messages")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind in IMAGE_PARTS:
                    kept = on_image(part)
                    if kept is not None:
                        parts.append(kept)
                else:
                    raise FieldError(f"messages[{i}] has a content part of unknown type {kind!r}", "messages")
            content = parts
        if content is None and m.get("role") == "assistant":
            content = ""
        if not isinstance(content, (str, list)):
            raise FieldError(f"messages[{i}] needs a string 'content'", "messages")
        out.append({"role": m.get("role"), "content": content})
    return out


def chat_messages(body: Mapping[str, Any], accepts_images: bool) -> list[dict[str, str]]:
    """``messages`` as ``[{"role", "content": str}]`` for render_chat (text parts joined)."""

    def refuse(part: Mapping[str, Any]) -> None:
        raise FieldError("this model does not accept images" if not accepts_images
                         else "images are not supported by this server yet", "messages")

    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else "".join(p["text"] for p in m["content"])} for m in message_parts(body, refuse)]


def completion_prompt(body: Mapping[str, Any], tokenizer) -> list[int]:
    """``prompt`` as token ids: one string (encoded with <bos>) or one list of ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise FieldError("'prompt' is empty", "prompt")
        return tokenizer.encode(prompt, add_bos=True)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise FieldError("'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
                     "prompt")
