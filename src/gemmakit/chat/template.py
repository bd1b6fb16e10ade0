"""A checkpoint's own chat template (Jinja), rendered in the environment transformers gives it.

Hub checkpoints ship their chat format as a Jinja template: ``chat_template`` in
tokenizer_config.json (a string, or a list of ``{"name", "template"}``), a chat_template.jinja file,
or ``tokenizer.chat_template`` in a GGUF. The template is the model's own definition of its prompt
format, so where there is one it is what gemmakit renders; transformers' ``apply_chat_template`` and
llama.cpp do the same.

Templates are untrusted code from the internet, so they run in Jinja's immutable sandbox, with the
settings and helpers templates are written against (those of transformers): ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception(message)``, ``strftime_now``, a
``tojson`` that leaves non-ASCII and HTML characters alone, and a ``namespace`` that refuses
underscore names. The variables are ``messages``, ``add_generation_prompt``, ``tools`` (None unless
given), ``documents`` (None) and the tokenizer's special tokens (``bos_token``, ``eos_token`` ...).
Everything a template can see is rebuilt from plain JSON types first, so no object with methods
reaches the sandbox.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from gemmakit.errors import InvalidRequestError
from gemmakit.io import read_json_object


# The special tokens transformers passes to every template, by their attribute names.
SPECIAL_TOKEN_NAMES = ("bos", "eos", "unk", "pad", "mask")


class TemplateRaised(Exception):
    """``raise_exception(message)`` in a template: the template refusing the chat it was given."""


def template_from_directory(directory: str | Path) -> str | None:
    """The chat template a checkpoint directory ships, or None.

    As transformers reads it: a chat_template.jinja file first (it overrides the config), then
    tokenizer_config.json's ``chat_template``; then the processor's chat_template.json, which
    multimodal repositories carry.
    """
    directory = Path(directory)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        found = pick_template(read_json_object(directory / name).get("chat_template"))
        if found is not None:
            return found
    return None


def pick_template(value: Any) -> str | None:
    """A ``chat_template`` entry as a template string: itself, or the one named "default" of a list
    of named templates (the others, such as "tool_use", are alternatives a caller would name)."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, Mapping) and entry.get("name") == "default" and isinstance(entry.get("template"), str):
                return entry["template"] or None
    return None


def special_tokens(tokenizer) -> dict[str, str]:
    """``{"bos_token": "<bos>", ...}`` for the special tokens the tokenizer has."""
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        i = tokenizer.token_to_id("<mask>") if name == "mask" else getattr(tokenizer, f"{name}_id", None)
        if i is not None and 0 <= i < tokenizer.vocab_size:
            out[f"{name}_token"] = tokenizer.id_to_piece(i)
    return out


def render_template(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None, **variables: Any) -> str:
    """``template`` rendered for ``messages``, exactly as transformers' ``apply_chat_template(...,
    tokenize=False)`` renders it. ``variables`` are the special tokens and any extra template
    variables (``enable_thinking``). Raises TemplateRaised for ``raise_exception``, and
    InvalidRequestError for a template that cannot be compiled or fails on this chat."""
    jinja2 = _jinja2()
    compiled = _compile(template)
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequestError(f"message {i} is not a {{role, content}} object")
    # Keys holding None are dropped, as transformers drops them: OpenAI clients send
    # "content": null or "tool_calls": null, and templates test for a key's presence.
    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
    context = _plain({**variables, "messages": chat, "tools": list(tools) if tools is not None else None,
                      "documents": None, "add_generation_prompt": bool(add_generation_prompt)})
    try:
        return compiled.render(**context)
    except TemplateRaised:
        raise
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(f"the model's chat template failed on this chat: {_one_line(exc)}") from None
    except Exception as exc:  # a template indexing a string or adding a list to one: TypeError, KeyError ...
        raise InvalidRequestError(f"the model's chat template failed on this chat "
                                  f"({type(exc).__name__}: {_one_line(exc)})") from None


def _jinja2():
    """jinja2 with the parts used here, imported on first use: tens of ms that only rendering a
    checkpoint's own chat template needs (loading a tokenizer does not)."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox
    import jinja2.utils

    return jinja2


@lru_cache(maxsize=8)
def _compile(template: str):
    """The template compiled once (a server renders it for every request)."""
    jinja2 = _jinja2()
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message: Any) -> None:
        raise TemplateRaised(str(message))

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        # namespace(_x=...) would let a template reach attributes the sandbox hides
        def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's own signature trick: self may be a kwarg
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_' ({name!r})")

    class Dict:
        # dict(...) for templates without the dict type itself, whose attributes lead out of the sandbox
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any) -> dict:
            return dict.fromkeys(*args)

    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace,
                       dict=Dict())
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidRequestError(f"the model's chat template has a syntax error on line {exc.lineno}: "
                                  f"{_one_line(exc)}") from None
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(f"the model's chat template cannot be compiled: {_one_line(exc)}") from None


def _plain(value: Any) -> Any:
    """``value`` rebuilt from JSON types (str, int, float, bool, None, dict, list); anything else
    becomes an inert ``"<TypeName>"``, since templates only test whether such keys are present."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # a numpy or torch scalar
    return f"<{type(value).__name__}>"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
