"""Chat prompts: a list of ``{"role", "content"}`` messages -> the prompt text a Gemma model expects.

:func:`render_chat` is the one function every chat surface goes through (``gemmakit chat``, the
server's chat route and /tokenize, chat-formatted training data, vision prompts). With a tokenizer
that carries its checkpoint's chat template (``tokenizer.chat_template``) it renders that template
(template.py); otherwise gemmakit's built-in Gemma renderer (builtin.py), which writes the same
text the official Gemma 1/2/3 templates write, or, for a Gemma 4 vocabulary, Gemma 4's.

The prompt never starts with ``<bos>``: official templates write ``{{ bos_token }}`` first, but the
tokenizer adds the token itself (``encode(prompt, add_bos=True)``, as for a plain prompt), so a
leading bos the template wrote is taken off the text, and a prompt never begins with two.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gemmakit.chat.builtin import render_builtin
from gemmakit.chat.template import (TemplateRaised, pick_template, render_template, special_tokens,
                                    template_from_directory)
from gemmakit.errors import InvalidRequestError

__all__ = ["render_chat", "render_builtin", "render_template", "template_from_directory", "pick_template",
           "pretrained_warning", "looks_instruction_tuned"]


def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, *, tokenizer=None,
                tools: Sequence[Mapping[str, Any]] | None = None, **variables: Any) -> str:
    """The prompt for ``messages``, without ``<bos>``: the checkpoint's chat template where
    ``tokenizer`` has one, else the built-in renderer. ``tools`` (JSON schemas) and ``variables``
    (``enable_thinking=True``) reach the template as transformers passes them."""
    if not messages:
        raise InvalidRequestError("a chat needs at least one message")
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        if tools:
            raise InvalidRequestError("this model has no chat template, so it has no format for tools")
        return render_builtin(messages, add_generation_prompt, turns=turn_format(tokenizer),
                              enable_thinking=bool(variables.get("enable_thinking")))
    specials = special_tokens(tokenizer)
    context = {**specials, **variables}
    try:
        text = render_template(template, messages, add_generation_prompt, tools, **context)
    except TemplateRaised as refused:
        folded = _fold_system(messages)
        if folded is None:
            raise InvalidRequestError(f"the model's chat template refuses this chat: {refused}") from None
        try:
            text = render_template(template, folded, add_generation_prompt, tools, **context)
        except TemplateRaised as exc:
            raise InvalidRequestError(f"the model's chat template refuses this chat: {exc}") from None
    bos = specials.get("bos_token")
    return text.removeprefix(bos) if bos else text


def turn_format(tokenizer) -> str:
    """"gemma4" for a vocabulary with Gemma 4's turn markers (``<|turn>``), else "gemma"."""
    find = getattr(tokenizer, "token_to_id", None)
    return "gemma4" if find is not None and find("<|turn>") is not None else "gemma"


def _fold_system(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    """The chat with its leading system message written at the top of the first user turn.

    Gemma 1 and 2 (and CodeGemma) templates refuse a system role outright; folding it in is what
    Gemma 3's template does itself, what llama.cpp does for these models, and what the built-in
    renderer does, so ``--system`` works with every Gemma checkpoint. None when the chat does not
    start with a system message followed by a text user message (the refusal then stands).
    """
    if len(messages) < 2 or messages[0].get("role") != "system" or messages[1].get("role") != "user":
        return None
    system, first = messages[0].get("content"), messages[1].get("content")
    if isinstance(system, list) and system and isinstance(system[0], Mapping):
        system = system[0].get("text")
    if not isinstance(system, str) or not isinstance(first, str):
        return None
    return [{**messages[1], "content": f"{system.strip()}\n\n{first.strip()}"}, *messages[2:]]


_INSTRUCTION_TUNED = re.compile(r"(?:^|[-_.])it(?:$|[-_.])|instruct", re.IGNORECASE)


def looks_instruction_tuned(source: str | Path | None) -> bool:
    """Whether a checkpoint's path names an instruction-tuned model (gemma-3-1b-it, ...-instruct).

    Each component of the path is looked at (a hub cache keeps the name in a parent directory:
    models--google--gemma-3-1b-it/snapshots/...); "it" must stand between separators ("-it",
    "_it.gguf"), not inside a word such as "kit" or "git".
    """
    return source is not None and any(_INSTRUCTION_TUNED.search(part) for part in Path(str(source)).parts)


def pretrained_warning(tokenizer, source: str | Path | None) -> str | None:
    """The one-line warning chat surfaces print at start for a model that will not chat, or None.

    A pretrained checkpoint has no chat template and was never taught the turn format, so it treats
    a chat prompt as text to continue: the bundled 270M answers "What is the capital of France?" by
    repeating the question forever (llama.cpp does the same with that file).
    """
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is not None or looks_instruction_tuned(source):
        return None
    name = Path(str(source)).name if source else "the model"
    return (f"gemmakit: warning: {name} has no chat template and looks pretrained, so chat replies may just "
            "continue or repeat the text; use an instruction-tuned (-it) checkpoint")
