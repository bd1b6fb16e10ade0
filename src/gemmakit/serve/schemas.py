"""The request bodies as pydantic models: every field the server implements, and no other.

A field the server does not implement is refused with a 400 that names it (``extra="forbid"``
here, and the same rule inside ``messages``), never silently ignored: a client that sends
``tools`` or ``suffix`` learns at once that it has no effect. ``null`` means "not given", as
in OpenAI's API, so a field sent as null takes its default.

The validators raise :func:`~gemmakit.serve.errors.invalid` with messages written for the
client (``'temperature' must be between 0.0 and 2.0, got 3.5``); serve/errors.py answers the
first of them as OpenAI's 400 with ``param`` naming the field. They accept what OpenAI's API
accepts: an int where a number is asked for, never a bool where an int is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from gemmakit.engine.grammar import Grammar, GrammarError
from gemmakit.engine.sampling import SamplingParams
from gemmakit.serve.errors import FieldError, invalid

IMAGE_PARTS = ("image_url", "input_image", "image")


def unsupported(path: str):
    """The error for a field the server does not implement, at ``path`` (``messages[0].name``)."""
    return invalid(f"the field '{path}' is not supported by this server", path, "unsupported_field")


def _check(value: Any, name: str, kinds: tuple[type, ...], low: float | None = None,
           high: float | None = None) -> Any:
    """``value`` if it is one of ``kinds`` (a bool is no int) within ``[low, high]`` where given."""
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise invalid(f"'{name}' must be {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}", name)
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
        raise invalid(f"'{name}' must be a finite number, got {value}", name)
    if low is not None and value < low or high is not None and value > high:
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise invalid(f"'{name}' must be {bounds}, got {value}", name)
    return value


def checked(kinds: tuple[type, ...], low: float | None = None, high: float | None = None) -> BeforeValidator:
    """A field checked by :func:`_check` before pydantic converts it (an int to a float)."""
    return BeforeValidator(lambda value, info: _check(value, info.field_name, kinds, low, high))


def _top_k(value: Any) -> int:
    return 0 if value == -1 and not isinstance(value, bool) else _check(value, "top_k", (int,), 0)  # -1: vLLM's "off"


def _stop(value: Any) -> tuple[str, ...]:
    stop = _check(value, "stop", (str, list))
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise invalid("'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    return tuple(stop)


Number = (int, float)


def _logit_bias(value: Any, info: ValidationInfo) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}``, bias in [-100, 100], as sorted ``(id, bias)`` pairs."""
    if not isinstance(value, dict):
        raise invalid("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    if len(value) > 1024:  # OpenAI's limit; each entry costs a scatter per token
        raise invalid(f"'logit_bias' may hold at most 1024 tokens, got {len(value)}", "logit_bias")
    vocab = (info.context or {}).get("vocab_size")
    out = {}
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else None
        if token is None or token < 0 or vocab is not None and token >= vocab:
            raise invalid(f"'logit_bias' keys must be token ids in [0, {vocab}), got {key!r}", "logit_bias")
        out[token] = float(_check(bias, f"logit_bias.{key}", Number, -100.0, 100.0))
    return tuple(sorted(out.items()))


def _metadata(value: Any) -> dict[str, str]:
    """OpenAI's bookkeeping map: at most 16 string pairs (keys up to 64 characters, values up to 512)."""
    if not isinstance(value, dict) or len(value) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in value.items()):
        raise invalid("'metadata' must be an object of at most 16 string values (keys up to 64 characters, "
                      "values up to 512)", "metadata")
    return value


class Body(BaseModel):
    """Unknown fields refused; frozen, since a parsed request is only read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StreamOptions(Body):
    include_usage: Any = None  # any truthy value asks for the usage chunk


class TextPart(Body):
    type: str = "text"
    text: str


class ImagePart(Body):
    """An image content part; ``url`` is what the client gave, checked and decoded by serve/vision.py."""

    type: str
    url: Any = None


class Message(Body):
    role: Any = None  # render_chat names a wrong one
    content: str | list[TextPart | ImagePart]


def _no_other_keys(obj: dict, allowed: tuple[str, ...], path: str) -> None:
    for key in obj:
        if key not in allowed:
            raise unsupported(f"{path}.{key}")


def _image_part(part: dict, path: str) -> ImagePart:
    """OpenAI's ``{"image_url": {"url"}}`` or ``{"image_url": "..."}``, or a bare ``{"url"}``."""
    _no_other_keys(part, ("type", "image_url", "url", "detail"), path)
    value = part.get("image_url", part.get("url"))
    details = [(f"{path}.detail", part.get("detail"))]
    if isinstance(value, dict):
        _no_other_keys(value, ("url", "detail"), f"{path}.image_url")
        details.append((f"{path}.image_url.detail", value.get("detail")))
        value = value.get("url")
    for where, detail in details:
        if detail not in (None, "auto"):  # the vision tower takes one resolution: "auto" is what happens
            raise invalid(f"'{where}' {detail!r} is not supported: every image is resized to the model's "
                          "vision input (give 'auto' or leave it out)", where)
    return ImagePart(type=part["type"], url=value)


def _messages(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty list", "messages")
    out: list[Message] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object", "messages")
        _no_other_keys(m, ("role", "content"), f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):
            parts: list[TextPart | ImagePart] = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    _no_other_keys(part, ("type", "text"), f"messages[{i}].content[{j}]")
                    parts.append(TextPart(text=part["text"]))
                elif kind in IMAGE_PARTS:
                    parts.append(_image_part(part, f"messages[{i}].content[{j}]"))
                else:
                    raise invalid(f"messages[{i}] has a content part of unknown type {kind!r}", "messages")
            content = parts
        if content is None and m.get("role") == "assistant":
            content = ""
        if not isinstance(content, (str, list)):
            raise invalid(f"messages[{i}] needs a string 'content'", "messages")
        out.append(Message(role=m.get("role"), content=content))
    return out


Messages = Annotated[list[Message], BeforeValidator(_messages)]


def chat_dicts(messages: list[Message], on_image: Callable[[ImagePart], dict | None]) -> list[dict[str, Any]]:
    """``messages`` as render_chat takes them; ``on_image(part)`` says what an image part becomes.

    It returns a part to keep, None to drop it, or raises: text-only and vision requests share
    this walk and differ only there.
    """
    out = []
    for m in messages:
        content: str | list[dict] = m.content if isinstance(m.content, str) else []
        for part in [] if isinstance(m.content, str) else m.content:
            kept = {"type": "text", "text": part.text} if isinstance(part, TextPart) else on_image(part)
            if kept is not None:
                content.append(kept)
        out.append({"role": m.role, "content": content})
    return out


def text_chat(messages: list[Message], accepts_images: bool) -> list[dict[str, str]]:
    """``messages`` as ``[{"role", "content": str}]`` for render_chat (text parts joined)."""
    def refuse(part: ImagePart) -> None:
        raise FieldError("this model does not accept images" if not accepts_images
                         else "images are not supported by this server yet", "messages")

    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else "".join(p["text"] for p in m["content"])} for m in chat_dicts(messages, refuse)]


@dataclass(frozen=True)
class Constraint:
    """A request's grammar, and the field it came from (the ``param`` of a 400 if it does not compile)."""

    grammar: Grammar
    param: str


_FORMAT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _response_format(value: Any) -> Constraint | None:
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` or ``json_schema``.

    A ``json_schema`` constrains the output whether ``strict`` or not. Strict, a keyword the
    grammar library does not implement is a 400; not strict, it is ignored (the output still
    follows everything else in the schema).
    """
    if not isinstance(value, dict):
        raise invalid("'response_format' must be an object with a 'type'", "response_format")
    kind = value.get("type")
    if kind in ("text", "json_object"):
        _no_other_keys(value, ("type",), "response_format")
        return None if kind == "text" else Constraint(Grammar.json_object(), "response_format")
    if kind != "json_schema":
        raise invalid(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                      "response_format.type")
    _no_other_keys(value, ("type", "json_schema"), "response_format")
    spec = value.get("json_schema")
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise invalid(f"'{where}' must be an object with 'name' and 'schema'", where)
    _no_other_keys(spec, ("name", "description", "schema", "strict"), where)
    name = spec.get("name")
    if not isinstance(name, str) or not _FORMAT_NAME.fullmatch(name):
        raise invalid(f"'{where}.name' must be 1 to 64 letters, digits, '_' or '-'", f"{where}.name")
    if not isinstance(spec.get("description", ""), str):
        raise invalid(f"'{where}.description' must be a string", f"{where}.description")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid(f"'{where}.strict' must be true or false", f"{where}.strict")
    schema = spec.get("schema", {})  # OpenAI's schema is optional: then any JSON value
    if not isinstance(schema, (dict, bool)):
        raise invalid(f"'{where}.schema' must be a JSON schema object", f"{where}.schema")
    return Constraint(Grammar.json_schema(schema, lenient=not strict), f"{where}.schema")


STRUCTURED_OUTPUTS = ("json", "regex", "choice", "grammar", "json_object")


def _structured_outputs(value: Any) -> Constraint:
    """vLLM's extension ``structured_outputs``: exactly one of ``json`` (a schema), ``regex``,
    ``choice`` (a list of strings), ``grammar`` (Lark or GBNF) or ``json_object: true``."""
    if not isinstance(value, dict):
        raise invalid("'structured_outputs' must be an object", "structured_outputs")
    _no_other_keys(value, STRUCTURED_OUTPUTS, "structured_outputs")
    given = [k for k in STRUCTURED_OUTPUTS if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise invalid(f"'structured_outputs' needs exactly one of {', '.join(STRUCTURED_OUTPUTS)}",
                      "structured_outputs")
    key = given[0]
    item, where = value[key], f"structured_outputs.{key}"
    try:
        if key == "json" and isinstance(item, (dict, bool, str)):
            return Constraint(Grammar.json_schema(item), where)
        if key in ("regex", "grammar") and isinstance(item, str) and item:
            return Constraint(Grammar.regex(item) if key == "regex" else Grammar.lark(item), where)
        if key == "choice" and isinstance(item, list) and item and all(isinstance(c, str) and c for c in item):
            return Constraint(Grammar.choice(item), where)
        if key == "json_object" and item is True:
            return Constraint(Grammar.json_object(), where)
    except GrammarError as exc:  # JSON text that is not JSON
        raise invalid(str(exc), where) from None
    wanted = {"json": "a JSON schema (an object or its JSON text)", "regex": "a non-empty string",
              "grammar": "a non-empty string", "choice": "a non-empty list of non-empty strings",
              "json_object": "true"}[key]
    raise invalid(f"'{where}' must be {wanted}", where)


@dataclass(frozen=True)
class Common:
    """The fields chat and text completions share, as the engine and the runners take them."""

    max_tokens: int
    params: SamplingParams
    n: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool  # vLLM's extension: keep going past end-of-turn tokens (benchmarks, tests)
    constraint: Constraint | None = None  # response_format or structured_outputs


class ServedRequest(Body):
    """A body naming (optionally) the model: another model's id is a 400, as this server serves one."""

    model: Annotated[str | None, checked((str,))] = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("model")
    @classmethod
    def _served(cls, name: str | None, info: ValidationInfo) -> str | None:
        served = (info.context or {}).get("model_name")
        if name is not None and served is not None and name != served:
            raise invalid(f"the model {name!r} does not exist; this server serves {served!r}", "model",
                          "model_not_found")
        return name


class Sampling(ServedRequest):
    """Sampling and stopping, shared by chat and text completions (top_k, min_p, repetition_penalty
    and ignore_eos are vLLM's extensions)."""

    max_tokens: Annotated[int | None, checked((int,), 1)] = None
    temperature: Annotated[float, checked(Number, 0.0, 2.0)] = 1.0
    top_p: Annotated[float, checked(Number, 0.0, 1.0)] = 1.0
    top_k: Annotated[int, BeforeValidator(_top_k)] = 0
    min_p: Annotated[float, checked(Number, 0.0, 1.0)] = 0.0
    repetition_penalty: Annotated[float, checked(Number, 0.01, 10.0)] = 1.0
    presence_penalty: Annotated[float, checked(Number, -2.0, 2.0)] = 0.0
    frequency_penalty: Annotated[float, checked(Number, -2.0, 2.0)] = 0.0
    seed: Annotated[int | None, checked((int,))] = None
    stop: Annotated[tuple[str, ...], BeforeValidator(_stop)] = ()
    stream: Annotated[bool, checked((bool,))] = False
    stream_options: Annotated[StreamOptions, checked((dict,))] = StreamOptions()
    n: Annotated[int, checked((int,), 1, 16)] = 1
    logit_bias: Annotated[tuple[tuple[int, float], ...], BeforeValidator(_logit_bias)] = ()
    ignore_eos: Annotated[bool, checked((bool,))] = False
    user: Annotated[str | None, checked((str,))] = None  # bookkeeping: accepted, not used
    response_format: Annotated[Constraint | None, BeforeValidator(_response_format)] = None
    structured_outputs: Annotated[Constraint | None, BeforeValidator(_structured_outputs)] = None  # vLLM's

    @model_validator(mode="after")
    def _one_constraint(self) -> Sampling:
        if self.response_format is not None and self.structured_outputs is not None:
            raise invalid("give 'response_format' or 'structured_outputs', not both", "structured_outputs")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def common(self, default_max_tokens: int) -> Common:
        max_tokens = self.requested_max_tokens()
        params = SamplingParams(temperature=self.temperature, top_p=self.top_p or 1e-9, top_k=self.top_k,  # 0: top-1
                                min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                                seed=self.seed, logit_bias=self.logit_bias)
        return Common(max_tokens=default_max_tokens if max_tokens is None else max_tokens, params=params, n=self.n,
                      stop=self.stop, stream=self.stream, include_usage=bool(self.stream_options.include_usage),
                      ignore_eos=self.ignore_eos, constraint=self.response_format or self.structured_outputs)


class ChatRequest(Sampling):
    """``POST /v1/chat/completions``."""

    messages: Messages = Field(default=None, validate_default=True)
    max_completion_tokens: Annotated[int | None, checked((int,), 1)] = None  # OpenAI's newer name, first
    logprobs: Annotated[bool, checked((bool,))] = False
    top_logprobs: Annotated[int | None, checked((int,), 0, 20)] = None
    # OpenAI's bookkeeping fields, accepted and not used: this server keeps no completions (store),
    # and prefix caching needs no key (prompt_cache_key)
    metadata: Annotated[dict[str, str] | None, BeforeValidator(_metadata)] = None
    store: Annotated[bool, checked((bool,))] = False
    safety_identifier: Annotated[str | None, checked((str,))] = None
    prompt_cache_key: Annotated[str | None, checked((str,))] = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatRequest:
        if not self.logprobs and self.top_logprobs is not None:
            raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens

    @property
    def logprob_count(self) -> int | None:
        """How many top logprobs per token (0 = only the chosen one's), or None when off."""
        return (self.top_logprobs or 0) if self.logprobs else None


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        if not value:
            raise invalid("'prompt' is empty", "prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return list(value)
    raise invalid("'prompt' must be a non-empty string or a list of token ids (one prompt per request)", "prompt")


class CompletionRequest(Sampling):
    """``POST /v1/completions``: one prompt, a string (encoded with <bos>) or token ids.

    ``echo`` puts the prompt before the completion, and with ``logprobs`` its tokens' logprobs
    before the completion's (the first token's null); ``max_tokens: 0`` then scores a text
    without generating, as evaluation harnesses do.
    """

    prompt: Annotated[str | list[int], BeforeValidator(_prompt)] = Field(default=None, validate_default=True)
    logprobs: Annotated[int | None, checked((int,), 0, 20)] = None
    max_tokens: Annotated[int | None, checked((int,), 0)] = None
    echo: Annotated[bool, checked((bool,))] = False

    @model_validator(mode="after")
    def _echo_is_not_streamed(self) -> CompletionRequest:
        if self.echo and self.stream:
            raise invalid("'echo' is not supported with 'stream': true", "echo")
        return self

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs


class TokenizeRequest(ServedRequest):
    """``POST /tokenize``: a ``prompt`` string, or chat ``messages`` rendered as chat completions would."""

    prompt: Annotated[str | None, checked((str,))] = None
    messages: Messages = None  # not validated when absent
    add_special_tokens: Any = True  # read as a truth value

    @property
    def is_chat(self) -> bool:
        return "messages" in self.model_fields_set


def _tokens(value: Any, info: ValidationInfo) -> list[int]:
    vocab = (info.context or {}).get("vocab_size")
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t
                                              and (vocab is None or t < vocab) for t in value):
        raise invalid(f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
    return value


class DetokenizeRequest(ServedRequest):
    """``POST /detokenize``: token ids back to text."""

    tokens: Annotated[list[int], BeforeValidator(_tokens)] = Field(default=None, validate_default=True)
