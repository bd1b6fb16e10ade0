"""Tool calls in each Gemma's own syntax: what the prompt says, how a reply is read, and the
grammar that makes a forced call valid.

Three syntaxes, picked from the chat template (:func:`tool_syntax`):

- **Gemma 4** (native): ``<|tool_call>call:NAME{key:value,...}<tool_call|>``; strings are
  wrapped in ``<|"|>``, keys are bare, numbers, booleans and null are written as in JSON. The
  model's own template declares the tools, renders earlier calls and ``tool`` results.
- **FunctionGemma** (a Gemma 3 270M fine-tune): the same shape with ``<start_function_call>``,
  ``<end_function_call>`` and ``<escape>`` as the string quote; its template does the rest.
- **JSON** (Gemma 1-3 and every template without a tool syntax): Google's prompted format for
  Gemma 3, ``{"name": ..., "parameters": {...}}``. The template knows nothing of tools, so the
  declarations go into the system message and earlier calls and results into plain turns
  (:func:`prompt_messages`).

A reply is split into content and calls by :class:`ReplyParser`, as it streams. With
``tool_choice`` "required" or a named function the call itself is constrained
(:func:`call_grammar`): for the JSON syntax by the JSON schema of the call, for the native
syntaxes by a Lark grammar written here from the tool's parameter schema, so the arguments
always validate against it.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gemmakit.chat.thinking import ThoughtSplitter, partial_suffix
from gemmakit.errors import InvalidRequestError


class ToolSchemaError(InvalidRequestError):
    """A tool's parameter schema that a constrained call cannot follow in the model's syntax."""


@dataclass(frozen=True)
class ToolSyntax:
    """How one family writes a call: ``open`` + ``call:NAME{...}`` + ``close``, strings in ``quote``
    (native), or a JSON object (``name == "json"``, the other fields empty)."""

    name: str
    open: str = ""
    close: str = ""
    quote: str = ""

    @property
    def native(self) -> bool:
        return self.name != "json"


GEMMA4 = ToolSyntax("gemma4", "<|tool_call>", "<tool_call|>", '<|"|>')
FUNCTIONGEMMA = ToolSyntax("functiongemma", "<start_function_call>", "<end_function_call>", "<escape>")
JSON_SYNTAX = ToolSyntax("json")


def tool_syntax(template: str | None) -> ToolSyntax:
    """The syntax a chat template writes calls in: a native one where the template renders its
    markers, else the prompted JSON format."""
    for syntax in (GEMMA4, FUNCTIONGEMMA):
        if template and syntax.open in template:
            return syntax
    return JSON_SYNTAX


@dataclass(frozen=True)
class ToolCall:
    """One call as OpenAI returns it: ``arguments`` is JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


# --- the prompt ----------------------------------------------------------------------------------

JSON_INSTRUCTIONS = (
    "You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the "
    'format of\n{"name": function name, "parameters": dictionary of argument name and its value}\n\n'
    "You SHOULD NOT include any other text in the response if you call a function\n")


def prompt_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                    syntax: ToolSyntax) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """``(messages, tools)`` as the chat template is given them.

    For a native syntax the template renders tools, calls and results itself; the calls'
    ``arguments`` are handed over as objects, as templates expect (OpenAI clients send JSON text).
    For the JSON syntax the tools become a system message, each assistant's calls its text, and
    each run of ``tool`` results one user turn (merged with a user message that follows), so a
    template without tools renders the whole exchange.
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments_object(c["function"])}}
                               for c in calls]
        out.append(m)
    if syntax.native:
        return out, list(tools) if tools else None
    plain: list[dict[str, Any]] = []
    if tools:
        declared = JSON_INSTRUCTIONS + json.dumps([t["function"] for t in tools], ensure_ascii=False, indent=2)
        if out and out[0].get("role") in ("system", "developer"):
            first = out.pop(0)
            declared = f"{_text_of(first.get('content'))}\n\n{declared}"
        plain.append({"role": "system", "content": declared})
    for m in out:
        role = m.get("role")
        if role == "developer" and not plain:
            m = {**m, "role": "system"}
        if role == "assistant" and m.get("tool_calls"):
            said = _text_of(m.get("content"))
            calls = "\n".join(json.dumps({"name": c["function"]["name"], "parameters": c["function"]["arguments"]},
                                         ensure_ascii=False) for c in m["tool_calls"])
            plain.append({"role": "assistant", "content": f"{said}\n{calls}".strip()})
        elif role == "tool":
            result = f"```tool_outputs\n{_text_of(m.get('content'))}\n```"
            if plain and plain[-1].get("role") == "user" and plain[-1].get("_results"):
                plain[-1]["content"] += "\n" + result
            else:
                plain.append({"role": "user", "content": result, "_results": True})
        elif role == "user" and plain and plain[-1].get("_results"):
            plain[-1]["content"] += "\n\n" + _text_of(m.get("content"))
        else:
            plain.append({k: v for k, v in m.items() if k in ("role", "content")})
    return [{k: v for k, v in m.items() if k != "_results"} for m in plain], None


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return ""


def _arguments_object(function: Mapping[str, Any]) -> Any:
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise InvalidRequestError(f"the arguments of the call to {function.get('name')!r} are not JSON") from None
    return arguments if arguments is not None else {}


# --- reading a reply -----------------------------------------------------------------------------


def parse_native_call(body: str, syntax: ToolSyntax) -> tuple[str, Any] | None:
    """``call:NAME{...}`` (what stands between the markers) -> ``(name, arguments)``, or None
    where it is not a well-formed call."""
    m = re.match(r"\s*call:([^{\s]+)\s*", body)
    if m is None:
        return None
    try:
        value, end = _Gemma4Value(body, syntax.quote).read(m.end())
    except ValueError:
        return None
    if not isinstance(value, dict) or body[end:].strip():
        return None
    return m.group(1), value


class _Gemma4Value:
    """A reader of the native value syntax: ``{key:value}``, ``[a,b]``, quoted strings, JSON scalars."""

    _SCALAR = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|true|false|null")

    def __init__(self, text: str, quote: str) -> None:
        self.text, self.quote = text, quote

    def _skip(self, i: int) -> int:
        while i < len(self.text) and self.text[i].isspace():
            i += 1
        return i

    def read(self, i: int) -> tuple[Any, int]:
        text, quote = self.text, self.quote
        i = self._skip(i)
        if text.startswith(quote, i):
            end = text.find(quote, i + len(quote))
            if end < 0:
                raise ValueError("an unclosed string")
            return text[i + len(quote):end], end + len(quote)
        if text.startswith("{", i):
            members, i = self._sequence(i + 1, "}", self._member)
            return dict(members), i
        if text.startswith("[", i):
            return self._sequence(i + 1, "]", self.read)
        m = self._SCALAR.match(text, i)
        if m is None:
            raise ValueError("a value expected")
        return json.loads(m.group()), m.end()

    def _sequence(self, i: int, close: str, item: Callable[[int], tuple[Any, int]]) -> tuple[list[Any], int]:
        """Items read by ``item`` and separated by commas, up to ``close``."""
        out: list[Any] = []
        i = self._skip(i)
        while not self.text.startswith(close, i):
            value, i = item(i)
            out.append(value)
            i = self._skip(i)
            if self.text.startswith(",", i):
                i = self._skip(i + 1)
            elif not self.text.startswith(close, i):
                raise ValueError(f"',' or '{close}' expected")
        return out, i + len(close)

    def _member(self, i: int) -> tuple[tuple[str, Any], int]:
        """``key:value``, the key bare or quoted."""
        text = self.text
        if text.startswith(self.quote, i):
            key, i = self.read(i)
        else:
            colon = text.find(":", i)
            if colon < 0:
                raise ValueError("a key without a value")
            key, i = text[i:colon].strip(), colon
        i = self._skip(i)
        if not text.startswith(":", i) or not key:
            raise ValueError("a key without a value")
        value, i = self.read(i + 1)
        return (key, value), i


def parse_json_calls(text: str, names: Sequence[str]) -> list[ToolCall] | None:
    """The calls of a reply in the JSON syntax (an object, a list of them, or either in a code
    fence), or None where the reply is not calls of the given tools."""
    body = text.strip()
    fence = re.fullmatch(r"```[A-Za-z_]*\s*\n?(.*?)\n?```", body, re.DOTALL)
    if fence:
        body = fence.group(1).strip()
    try:
        value = json.loads(body)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("parameters", item.get("arguments", {}))
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls or None


@dataclass(frozen=True)
class Piece:
    """One part of a reply: ``kind`` "content", "reasoning" or "tool_call" (then ``call``)."""

    kind: str
    text: str = ""
    call: ToolCall | None = None


def reply_pieces(parser: ReplyParser | None, text: str, final: bool) -> list[Piece]:
    """The pieces ``text`` completes (``final``: the reply's last text); without a parser, all content."""
    if parser is None:
        return [Piece("content", text)] if text else []
    return parser.push(text) + (parser.flush() if final else [])


def joined(pieces: list[Piece], kind: str) -> str:
    """The text of the pieces of ``kind`` ("content" or "reasoning"), in order."""
    return "".join(p.text for p in pieces if p.kind == kind)


class ReplyParser:
    """A streamed reply split into reasoning (Gemma 4's thought channel), content and tool calls.

    Feed text with :meth:`push` and end with :meth:`flush`; each gives the pieces now certain.
    A native call is held back from its opening marker to its closing one and comes out whole;
    in the JSON syntax a reply that may be a call (it starts with ``{``, ``[`` or a fence) is held
    to the end. ``names`` are the tools the reply may call (none: nothing is read as a call);
    ``thoughts`` splits off the thought channel.
    """

    def __init__(self, syntax: ToolSyntax, names: Sequence[str] = (), thoughts: bool = False) -> None:
        self.syntax, self.names = syntax, tuple(names)
        self._thoughts = ThoughtSplitter() if thoughts else None
        self._pending = ""  # answer text not yet given out
        self._in_call = False
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> list[Piece]:
        if self._thoughts is None:
            return self._answer(text)
        return self._route(self._thoughts.push(text))

    def flush(self) -> list[Piece]:
        out = self._route(self._thoughts.flush()) if self._thoughts is not None else []
        return out + self._answer("", final=True)

    def _route(self, parts: list[tuple[str, str]]) -> list[Piece]:
        out: list[Piece] = []
        for kind, text in parts:
            out += [Piece("reasoning", text)] if kind == "thought" else self._answer(text)
        return out

    def _answer(self, text: str, final: bool = False) -> list[Piece]:
        self._pending += text
        if not self.names:
            return self._content(self._take_all())
        if not self.syntax.native:
            return self._json_answer(final)
        out: list[Piece] = []
        while self._pending:
            marker = self.syntax.close if self._in_call else self.syntax.open
            at = self._pending.find(marker)
            if at < 0:
                if final:
                    # an unclosed call: what the model wrote is kept, as content
                    out += self._content((self.syntax.open if self._in_call else "") + self._take_all())
                elif not self._in_call:
                    keep = partial_suffix(self._pending, marker)
                    out += self._content(self._pending[:len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep:]
                break
            before, self._pending = self._pending[:at], self._pending[at + len(marker):]
            if self._in_call:
                parsed = parse_native_call(before, self.syntax)
                if parsed is not None and parsed[0] in self.names:
                    call = ToolCall(parsed[0], json.dumps(parsed[1], ensure_ascii=False))
                    self.calls.append(call)
                    out.append(Piece("tool_call", call=call))
                else:
                    out += self._content(self.syntax.open + before + marker)
            else:
                out += self._content(before)
            self._in_call = not self._in_call
        return out

    def _json_answer(self, final: bool) -> list[Piece]:
        head = self._pending.lstrip()
        if head and head[0] not in "{[`":
            self.names = ()  # plain text: no call can follow in this syntax
            return self._content(self._take_all())
        if not final:
            return []
        calls = parse_json_calls(self._pending, self.names)
        if calls is None:
            return self._content(self._take_all())
        self._pending = ""
        self.calls += calls
        return [Piece("tool_call", call=c) for c in calls]

    def _take_all(self) -> str:
        text, self._pending = self._pending, ""
        return text

    @staticmethod
    def _content(text: str) -> list[Piece]:
        return [Piece("content", text)] if text else []


# --- constraining a call -------------------------------------------------------------------------


def call_grammar(tools: Sequence[Mapping[str, Any]], syntax: ToolSyntax, *, parallel: bool = True,
                 thought: bool = False, special_id: Callable[[str], int | None] = lambda text: None
                 ) -> tuple[str, Any]:
    """The grammar a forced call follows: ``("json_schema", schema)`` for the JSON syntax, else
    ``("lark", text)``: one or more calls (one where not ``parallel``) of ``tools``, each with
    arguments following its parameter schema, after an optional thought channel where ``thought``.

    ``special_id(text)`` is the vocabulary's id of a special token spelled ``text`` (None where
    there is none): markers that are single tokens must be matched as those tokens.
    Raises :class:`ToolSchemaError` for a schema keyword the native grammar cannot follow.
    """
    if not syntax.native:
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                  "properties": {"name": {"const": t["function"]["name"]},
                                 "parameters": _parameters(t["function"])}} for t in tools]
        return "json_schema", calls[0] if len(calls) == 1 else {"anyOf": calls}
    writer = _LarkWriter(syntax, special_id)
    names = [writer.call(t["function"]) for t in tools]
    call = f"{writer.lit(syntax.open)} \"call:\" ({' | '.join(names)}) {writer.lit(syntax.close)}"
    head = ""
    if thought:
        head = (f"({writer.lit('<|channel>')} THOUGHT {writer.lit('<channel|>')})? ")
        writer.rules.append("THOUGHT: /(.|\\n)*/")
    writer.rules.insert(0, f"start: {head}call_one{'+' if parallel else ''}")
    writer.rules.insert(1, f"call_one: {call}")
    return "lark", "\n".join(writer.rules)


def _parameters(function: Mapping[str, Any]) -> Any:
    """A function's parameter schema; none given means it takes no arguments (as in OpenAI's API)."""
    params = function.get("parameters")
    return params if params is not None else {"type": "object", "properties": {}, "additionalProperties": False}


# Keywords that only describe (or that the grammar meets by what it writes: keys are only the
# declared ones, so "additionalProperties" always holds).
_IGNORED = {"description", "title", "default", "examples", "$schema", "$id", "$comment", "additionalProperties",
            "deprecated", "readOnly", "writeOnly", "strict", "propertyOrdering", "$defs", "definitions"}
_NUMERIC = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
_HANDLED = {"type", "properties", "required", "items", "minItems", "maxItems", "enum", "const", "anyOf", "oneOf",
            "$ref", "nullable", "minLength", "maxLength", "pattern"} | _NUMERIC


class _LarkWriter:
    """Lark rules for the native value syntax, one rule per schema node."""

    def __init__(self, syntax: ToolSyntax, special_id: Callable[[str], int | None]) -> None:
        self.syntax, self.special_id = syntax, special_id
        self.rules: list[str] = []
        self._count = 0
        self._refs: dict[str, str] = {}
        self._root: Any = None
        self._generic = False

    def lit(self, text: str) -> str:
        """``text`` as a Lark literal, or a special token's reference when it is one."""
        i = self.special_id(text)
        return f"<[{i}]>" if i is not None else json.dumps(text)

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def _rule(self, stem: str, body: str) -> str:
        name = self._name(stem)
        self.rules.append(f"{name}: {body}")
        return name

    def call(self, function: Mapping[str, Any]) -> str:
        self._root = _parameters(function)
        name = function["name"]
        return self._rule("fn", f"{json.dumps(name)} {self.value(self._root, name)}")

    # a quoted string: the quote as a special token, or as text that the body may not contain
    def string(self, regexes: list[str]) -> str:
        quote = self.syntax.quote
        term = self._name("S").upper()
        body = " & ".join(f"/{r}/" for r in regexes)
        if self.special_id(quote) is not None:
            self.rules.append(f"{term}: {body}")
            return f"{self.lit(quote)} {term} {self.lit(quote)}"
        no_quote = "(.|\\n)*" + re.escape(quote).replace("/", "\\/") + "(.|\\n)*"
        self.rules.append(f"{term}_BODY: {body} & ~/{no_quote}/")
        self.rules.append(f"{term}: {json.dumps(quote)} {term}_BODY {json.dumps(quote)}")
        return term

    def literal(self, value: Any) -> str:
        """A constant written as the model would write it."""
        if isinstance(value, str):
            return f"{self.lit(self.syntax.quote)} {json.dumps(value)} {self.lit(self.syntax.quote)}"
        if isinstance(value, dict):
            items = [f"{json.dumps(str(k) + ':')} {self.literal(v)}" for k, v in sorted(value.items())]
            return '"{" ' + ' "," '.join(items) + ' "}"'
        if isinstance(value, list):
            return '"[" ' + ' "," '.join(self.literal(v) for v in value) + ' "]"'
        return json.dumps(json.dumps(value))

    def value(self, schema: Any, where: str) -> str:
        if schema is True or schema == {}:
            return self.generic()
        if schema is False or not isinstance(schema, dict):
            raise ToolSchemaError(f"the schema at '{where}' is not a JSON schema object")
        unknown = set(schema) - _HANDLED - _IGNORED
        if unknown:
            raise ToolSchemaError(
                f"the parameter schema of {where.split('.')[0]!r} uses {', '.join(sorted(unknown))} at '{where}', "
                "which a forced tool call cannot follow in this model's syntax; leave it out, or use "
                "tool_choice 'auto'")
        if "$ref" in schema:
            return self.ref(schema["$ref"], where)
        options: list[str]
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            options = [self.literal(v) for v in values]
        elif "anyOf" in schema or "oneOf" in schema:
            branches = schema.get("anyOf") or schema.get("oneOf")
            options = [self.value(b, f"{where}[{i}]") for i, b in enumerate(branches)]
        else:
            kinds = schema.get("type")
            kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
            if not kinds:
                kinds = ["object"] if "properties" in schema else ["array"] if "items" in schema else []
            if not kinds:
                return self.generic()
            options = [self.typed(kind, schema, where) for kind in kinds]
        if schema.get("nullable"):
            options.append('"null"')
        return self._rule("v", " | ".join(f"({o})" for o in options))

    def ref(self, ref: str, where: str) -> str:
        if ref not in self._refs:
            m = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref)
            target = (self._root.get(m.group(1), {}) if m and isinstance(self._root, dict) else {}).get(
                m.group(2)) if m else None
            if target is None:
                raise ToolSchemaError(f"the schema at '{where}' refers to {ref!r}, which it does not define")
            name = self._refs[ref] = self._name("ref")
            self.rules.append(f"{name}: {self.value(target, where)}")
        return self._refs[ref]

    def typed(self, kind: str, schema: dict, where: str) -> str:
        if kind in ("integer", "number"):
            numeric = {"type": kind, **{k: schema[k] for k in _NUMERIC if k in schema}}
            return self._rule("n", f"%json {json.dumps(numeric)}")
        if kind == "boolean":
            return '"true" | "false"'
        if kind == "null":
            return '"null"'
        if kind == "string":
            return self.string(_string_regexes(schema, where))
        if kind == "array":
            item = self.value(schema.get("items", True), f"{where}[]")
            low, high = int(schema.get("minItems", 0)), schema.get("maxItems")
            if high is not None and int(high) == 0:
                return '"[" "]"'
            tail = f'("," {item})' + ("{%d,%s}" % (max(low - 1, 0), "" if high is None else int(high) - 1))
            body = f'"[" {item} {tail} "]"'
            return body if low >= 1 else f'{body} | "[" "]"'
        if kind == "object":
            properties = schema.get("properties")
            if not properties:
                return '"{" "}"' if schema.get("additionalProperties") is False else self.generic_dict()
            required = set(schema.get("required", []))
            missing = required - set(properties)
            if missing:
                raise ToolSchemaError(f"the schema at '{where}' requires {sorted(missing)}, which it does not define")
            keys = sorted(properties)  # the order the templates write arguments in (dictsort)
            members = [(k, self.value(properties[k], f"{where}.{k}"), k in required) for k in keys]
            return f'"{{" {self._members(members)} "}}"'
        raise ToolSchemaError(f"the schema at '{where}' has an unknown type {kind!r}")

    def _members(self, members: list[tuple[str, str, bool]]) -> str:
        """Declared keys in order, the required ones always, commas only between those written."""
        rest: dict[tuple[int, bool], str] = {}  # (from member i, something written yet) -> rule

        def tail(i: int, started: bool) -> str:
            if i == len(members):
                return '""'
            if (i, started) in rest:
                return rest[(i, started)]
            key, value, needed = members[i]
            sep = '"," ' if started else ""
            take = f'{sep}{json.dumps(key + ":")} {value} {tail(i + 1, True)}'
            body = take if needed else f"({take}) | {tail(i + 1, started)}"
            rest[(i, started)] = self._rule("m", body)
            return rest[(i, started)]

        return tail(0, False)

    def generic(self) -> str:
        """Any value in the native syntax."""
        if not self._generic:
            self._generic = True
            string = self.string(["(.|\\n)*"])
            self.rules += [
                f"any_value: any_dict | any_list | {string} | any_number | \"true\" | \"false\" | \"null\"",
                'any_dict: "{" (any_member ("," any_member)*)? "}"',
                'any_member: ANY_KEY ":" any_value',
                "ANY_KEY: /[A-Za-z_][A-Za-z0-9_]*/",
                'any_list: "[" (any_value ("," any_value)*)? "]"',
                'any_number: %json {"type": "number"}',
            ]
        return "any_value"

    def generic_dict(self) -> str:
        self.generic()
        return "any_dict"


def _string_regexes(schema: dict, where: str) -> list[str]:
    """The regexes a string's text must all match: its ``pattern`` (as a whole) and its length."""
    low, high = schema.get("minLength"), schema.get("maxLength")
    out = ["(.|\\n)" + ("{%d,%s}" % (int(low or 0), "" if high is None else int(high))
                         if low or high is not None else "*")]
    pattern = schema.get("pattern")
    if pattern is not None:
        if not isinstance(pattern, str):
            raise ToolSchemaError(f"the 'pattern' at '{where}' is not a string")
        out.append(pattern.removeprefix("^").removesuffix("$").replace("/", "\\/"))
    return out
