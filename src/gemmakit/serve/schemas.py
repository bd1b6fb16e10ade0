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

import json
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


class AudioPart(Body):
    """OpenAI's ``input_audio`` part: base64 ``data`` and its ``format``, checked and decoded by serve/vision.py."""

    type: str = "input_audio"
    data: Any = None
    format: Any = None


class VideoPart(Body):
    """vLLM's ``video_url`` part: ``{"video_url": {"url": "data:video/mp4;base64,..."}}``, checked and
    decoded by serve/vision.py."""

    type: str = "video_url"
    url: Any = None


class FunctionCall(Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallEntry(Body):
    """An earlier assistant turn's call, rendered back into the prompt."""

    id: str
    type: str = "function"
    function: FunctionCall


class Message(Body):
    role: Any = None  # render_chat names a wrong one
    content: str | list[TextPart | ImagePart | AudioPart | VideoPart]
    tool_calls: tuple[ToolCallEntry, ...] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    name: str | None = None  # tool: the function's name (OpenAI's older field)
    reasoning_content: str | None = None  # assistant: Gemma 4's thoughts between calls


# The keys each role's message may have beyond role and content.
_ROLE_KEYS = {"assistant": ("tool_calls", "reasoning_content", "reasoning"), "tool": ("tool_call_id", "name")}


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


def _audio_part(part: dict, path: str) -> AudioPart:
    """OpenAI's ``{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}``."""
    _no_other_keys(part, ("type", "input_audio"), path)
    value = part.get("input_audio")
    if not isinstance(value, dict):
        raise invalid(f"'{path}.input_audio' must be an object with 'data' (base64) and 'format'", f"{path}.input_audio")
    _no_other_keys(value, ("data", "format"), f"{path}.input_audio")
    return AudioPart(data=value.get("data"), format=value.get("format"))


def _video_part(part: dict, path: str) -> VideoPart:
    """vLLM's ``{"type": "video_url", "video_url": {"url": ...}}`` (or the url string itself)."""
    _no_other_keys(part, ("type", "video_url"), path)
    value = part.get("video_url")
    if isinstance(value, dict):
        _no_other_keys(value, ("url",), f"{path}.video_url")
        value = value.get("url")
    return VideoPart(url=value)


def _tool_calls(value: Any, where: str) -> tuple[ToolCallEntry, ...]:
    if not isinstance(value, list):
        raise invalid(f"'{where}' must be a list of calls", where)
    out = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise invalid(f"'{at}' must be an object", at)
        _no_other_keys(call, ("id", "type", "function"), at)
        function = call.get("function")
        if call.get("type", "function") != "function" or not isinstance(function, dict):
            raise invalid(f"'{at}' must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}", at)
        _no_other_keys(function, ("name", "arguments"), f"{at}.function")
        name, arguments = function.get("name"), function.get("arguments", "{}")
        if not isinstance(name, str) or not name:
            raise invalid(f"'{at}.function.name' must be a non-empty string", f"{at}.function.name")
        if isinstance(arguments, dict):  # some clients send the object itself
            arguments = json.dumps(arguments, ensure_ascii=False)
        if not isinstance(arguments, str):
            raise invalid(f"'{at}.function.arguments' must be a JSON string", f"{at}.function.arguments")
        try:
            if not isinstance(json.loads(arguments or "{}"), dict):
                raise ValueError
        except ValueError:
            raise invalid(f"'{at}.function.arguments' must be a JSON object's text", f"{at}.function.arguments") \
                from None
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise invalid(f"'{at}.id' must be a non-empty string", f"{at}.id")
        out.append(ToolCallEntry(id=call_id, function=FunctionCall(name=name, arguments=arguments or "{}")))
    return tuple(out)


def _messages(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty list", "messages")
    out: list[Message] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        _no_other_keys(m, ("role", "content", *(_ROLE_KEYS.get(role, ()) if isinstance(role, str) else ())),
                       f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):
            parts: list[TextPart | ImagePart | AudioPart | VideoPart] = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    _no_other_keys(part, ("type", "text"), f"messages[{i}].content[{j}]")
                    parts.append(TextPart(text=part["text"]))
                elif kind in IMAGE_PARTS:
                    parts.append(_image_part(part, f"messages[{i}].content[{j}]"))
                elif kind == "input_audio":
                    parts.append(_audio_part(part, f"messages[{i}].content[{j}]"))
                elif kind == "video_url":
                    parts.append(_video_part(part, f"messages[{i}].content[{j}]"))
                else:
                    raise invalid(f"messages[{i}] has a content part of unknown type {kind!r}", "messages")
            content = parts
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, (str, list)):
            raise invalid(f"messages[{i}] needs a string 'content'", "messages")
        extra: dict[str, Any] = {}
        if m.get("tool_calls") is not None:
            extra["tool_calls"] = _tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        thoughts = m.get("reasoning_content", m.get("reasoning"))
        if thoughts is not None:
            if not isinstance(thoughts, str):
                raise invalid(f"'messages[{i}].reasoning_content' must be a string", f"messages[{i}].reasoning_content")
            extra["reasoning_content"] = thoughts
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"messages[{i}] is a tool result and needs its 'tool_call_id'",
                              f"messages[{i}].tool_call_id")
            extra["tool_call_id"] = call_id
            if m.get("name") is not None:
                if not isinstance(m["name"], str):
                    raise invalid(f"'messages[{i}].name' must be a string", f"messages[{i}].name")
                extra["name"] = m["name"]
        out.append(Message(role=role, content=content, **extra))
    return out


Messages = Annotated[list[Message], BeforeValidator(_messages)]


def chat_dicts(messages: list[Message], on_image: Callable[[ImagePart | AudioPart | VideoPart], dict | None]) -> list[dict[str, Any]]:
    """``messages`` as render_chat takes them; ``on_image(part)`` says what an image (or audio) part becomes.

    It returns a part to keep, None to drop it, or raises: text-only and vision requests share
    this walk and differ only there. Calls, call ids and thoughts are kept under OpenAI's keys.
    """
    out = []
    for m in messages:
        content: str | list[dict] = m.content if isinstance(m.content, str) else []
        for part in [] if isinstance(m.content, str) else m.content:
            kept = {"type": "text", "text": part.text} if isinstance(part, TextPart) else on_image(part)
            if kept is not None:
                content.append(kept)
        entry: dict[str, Any] = {"role": m.role, "content": content}
        if m.tool_calls:
            entry["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        for key in ("tool_call_id", "name", "reasoning_content"):
            if getattr(m, key) is not None:
                entry[key] = getattr(m, key)
        out.append(entry)
    return out


def text_chat(messages: list[Message], accepts_images: bool) -> list[dict[str, Any]]:
    """``messages`` as render_chat takes them with each content a string (text parts joined)."""
    def refuse(part: ImagePart | AudioPart | VideoPart) -> None:
        if isinstance(part, AudioPart):
            raise FieldError("this model does not accept audio (it needs a Gemma 4 or Gemma 3n checkpoint with its "
                             "audio tower)", "messages")
        if isinstance(part, VideoPart):
            raise FieldError("this model does not accept video (it needs a Gemma 4 checkpoint with its vision tower)",
                             "messages")
        raise FieldError("this model does not accept images" if not accepts_images
                         else "images are not supported by this server yet", "messages")

    return [{**m, "content": m["content"] if isinstance(m["content"], str)
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


def _tools(value: Any) -> tuple[dict[str, Any], ...]:
    """OpenAI's ``tools``: function tools, each ``{"type": "function", "function": {"name",
    "description", "parameters", "strict"}}``; names unique."""
    if not isinstance(value, list):
        raise invalid("'tools' must be a list of function tools", "tools")
    out, names = [], set()
    for i, tool in enumerate(value):
        at = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise invalid(f"'{at}' must be {{'type': 'function', 'function': {{...}}}} (only function tools are "
                          "supported)", at)
        _no_other_keys(tool, ("type", "function"), at)
        function = tool["function"]
        _no_other_keys(function, ("name", "description", "parameters", "strict"), f"{at}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _FORMAT_NAME.fullmatch(name):
            raise invalid(f"'{at}.function.name' must be 1 to 64 letters, digits, '_' or '-'", f"{at}.function.name")
        if name in names:
            raise invalid(f"two tools are named {name!r}", f"{at}.function.name")
        names.add(name)
        if not isinstance(function.get("description", ""), str):
            raise invalid(f"'{at}.function.description' must be a string", f"{at}.function.description")
        params = function.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise invalid(f"'{at}.function.parameters' must be a JSON schema of type 'object'",
                          f"{at}.function.parameters")
        if function.get("strict") is not None and not isinstance(function["strict"], bool):
            raise invalid(f"'{at}.function.strict' must be true or false", f"{at}.function.strict")
        out.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    return tuple(out)


def _tool_choice(value: Any) -> str:
    """``"none"``, ``"auto"``, ``"required"``, or the name of the one function to call."""
    if value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        _no_other_keys(value, ("type", "function"), "tool_choice")
        _no_other_keys(value["function"], ("name",), "tool_choice.function")
        name = value["function"].get("name")
        if isinstance(name, str) and name:
            return "function:" + name
    raise invalid("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                  "{'name': ...}}", "tool_choice")


# Names a template's variables already have: chat_template_kwargs may not replace them.
_TEMPLATE_NAMES = {"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token", "unk_token",
                   "pad_token", "mask_token"}


def _template_kwargs(value: Any) -> dict[str, Any]:
    """vLLM's ``chat_template_kwargs``: extra variables for the chat template (``enable_thinking``)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
        raise invalid("'chat_template_kwargs' must be an object whose keys are names", "chat_template_kwargs")
    taken = sorted(set(value) & _TEMPLATE_NAMES)
    if taken:
        raise invalid(f"'chat_template_kwargs' may not set {', '.join(taken)}", "chat_template_kwargs")
    return dict(value)


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
    tools: Annotated[tuple[dict[str, Any], ...], BeforeValidator(_tools)] = ()
    tool_choice: Annotated[str | None, BeforeValidator(_tool_choice)] = None  # "auto" with tools, else "none"
    parallel_tool_calls: Annotated[bool, checked((bool,))] = True
    chat_template_kwargs: Annotated[dict[str, Any], BeforeValidator(_template_kwargs)] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatRequest:
        if not self.logprobs and self.top_logprobs is not None:
            raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatRequest:
        choice = self.tool_choice or "none"
        if choice != "none" and not self.tools:
            raise invalid(f"'tool_choice' {choice.removeprefix('function:')!r} needs 'tools'", "tool_choice")
        if choice.startswith("function:") and choice[9:] not in {t["function"]["name"] for t in self.tools}:
            raise invalid(f"'tool_choice' names {choice[9:]!r}, which is not among 'tools'", "tool_choice")
        if choice != "none" and (self.response_format is not None or self.structured_outputs is not None):
            raise invalid("give 'tools' or a structured output ('response_format', 'structured_outputs'), not "
                          "both; send tool_choice 'none' to keep the tools out", "tools")
        return self

    @property
    def offered_tools(self) -> tuple[dict[str, Any], ...]:
        """The tools the model is told of and may call: none with tool_choice "none"."""
        return self.tools if self.effective_tool_choice != "none" else ()

    @property
    def effective_tool_choice(self) -> str:
        return self.tool_choice or ("auto" if self.tools else "none")

    @property
    def forced_tools(self) -> tuple[dict[str, Any], ...]:
        """The tools a constrained reply must call (all of them for "required", the named one), or ()."""
        choice = self.effective_tool_choice
        if choice == "required":
            return self.tools
        if choice.startswith("function:"):
            return tuple(t for t in self.tools if t["function"]["name"] == choice[9:])
        return ()

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


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on inputs per request


def _embedding_input(value: Any, info: ValidationInfo) -> tuple[str | tuple[int, ...], ...]:
    """OpenAI's ``input``: a string, a list of strings, a list of token ids, or a list of such lists."""
    vocab = (info.context or {}).get("vocab_size")

    def ids(item: Any) -> tuple[int, ...] | None:
        ok = isinstance(item, list) and item and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t and (vocab is None or t < vocab) for t in item)
        return tuple(item) if ok else None

    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            items: tuple = tuple(value)
        elif (single := ids(value)) is not None:
            items = (single,)
        elif all(ids(item) is not None for item in value):
            items = tuple(ids(item) for item in value)
        else:
            items = ()
        if items:
            if len(items) > MAX_EMBEDDING_INPUTS:
                raise invalid(f"'input' may hold at most {MAX_EMBEDDING_INPUTS} items, got {len(items)}", "input")
            return items
    raise invalid(f"'input' must be a string, a non-empty list of strings, a non-empty list of token ids in "
                  f"[0, {vocab}), or a list of such lists", "input")


class EmbeddingRequest(ServedRequest):
    """``POST /v1/embeddings``. ``dimensions`` keeps the first features (Matryoshka) and normalises
    again; ``prompt_name`` (sentence-transformers' name, an extension) picks one of the model's
    task prompts, such as EmbeddingGemma's "query" or "document"."""

    input: Annotated[tuple[str | tuple[int, ...], ...], BeforeValidator(_embedding_input)]
    dimensions: Annotated[int | None, checked((int,), 1)] = None
    encoding_format: Annotated[str, checked((str,))] = "float"
    prompt_name: Annotated[str | None, checked((str,))] = None
    user: Annotated[str | None, checked((str,))] = None  # bookkeeping: accepted, not used

    @field_validator("encoding_format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value not in ("float", "base64"):
            raise invalid(f"'encoding_format' must be 'float' or 'base64', got {value!r}", "encoding_format")
        return value


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
