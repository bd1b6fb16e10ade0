"""gemmakit's own rendering of Gemma's chat format, for checkpoints that ship no chat template.

It renders the turns as the official chat templates do:

    <start_of_turn>user
    {text}<end_of_turn>
    <start_of_turn>model
    {text}<end_of_turn>

Every generation uses this turn format; they differ only in the system message:

- Gemma 3's official template folds a leading system message into the first user turn: the system
  text as given, a blank line, then the (trimmed) user text.
- Gemma 1 and Gemma 2 (and CodeGemma) have no system role; their official templates raise an error
  on one. gemmakit folds it in exactly as Gemma 3 does, which is what people do by hand with them,
  so one renderer serves every generation and a system prompt never silently disappears.

As in the official templates, each message's text is trimmed, roles must alternate user / model
(starting with user), and content may be a string or a list of ``{"type": "text", "text": ...}`` /
``{"type": "image"}`` parts (an image becomes ``<start_of_image>``). One deliberate difference: a
system message with no user message after it becomes a user turn (the official Gemma 3 template
would drop it without a word). The ``<bos>`` token the templates start with is added by the
tokenizer, not written here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gemmakit.chat.thinking import strip_thoughts
from gemmakit.errors import InvalidRequestError

ROLES = {"user": "user", "assistant": "model", "model": "model"}


def _text(content: Any, i: int, first_part_only: bool = False, image: str = "<start_of_image>") -> str:
    """The text of a message's content: a string, or the parts of a multimodal content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)) and all(isinstance(p, Mapping) for p in content):
        if first_part_only:  # the official template takes a system message's first part as is
            return str(content[0].get("text", "")) if content else ""
        pieces = []
        for part in content:
            if part.get("type") == "image":
                pieces.append(image)
            elif part.get("type") == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"].strip())
            else:
                raise InvalidRequestError(f"message {i} has a content part of unknown type {part.get('type')!r}")
        return "".join(pieces)
    raise InvalidRequestError(f"message {i} has no text content")


def render_builtin(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, *,
                   turns: str = "gemma", enable_thinking: bool = False) -> str:
    """Render ``[{"role": ..., "content": ...}, ...]`` into one prompt string (without ``<bos>``), in
    Gemma 1-3's turn format or, with ``turns="gemma4"``, Gemma 4's (:func:`render_gemma4`)."""
    if not messages:
        raise InvalidRequestError("a chat needs at least one message")
    if turns == "gemma4":
        return render_gemma4(messages, add_generation_prompt, enable_thinking)
    prefix = ""
    turns = list(messages)
    if turns[0].get("role") == "system":
        prefix = _text(turns[0].get("content"), 0, first_part_only=True) + "\n\n"
        turns = turns[1:]
    offset = len(messages) - len(turns)
    parts: list[str] = []
    for j, message in enumerate(turns):
        i, role = j + offset, message.get("role")
        if role == "system":
            raise InvalidRequestError("a system message may only come first")
        if role not in ROLES:
            raise InvalidRequestError(f"message {i} has unknown role {role!r} (use system, user or assistant)")
        if (role == "user") != (j % 2 == 0):
            raise InvalidRequestError(f"message {i} is from {role!r}: roles must alternate user/assistant, "
                                      "starting with user")
        text = _text(message.get("content"), i)
        text = text.strip() if isinstance(message.get("content"), str) else text
        parts.append(f"<start_of_turn>{ROLES[role]}\n{prefix if j == 0 else ''}{text}<end_of_turn>\n")
    if not turns:  # a system message and nothing else
        parts.append(f"<start_of_turn>user\n{prefix.strip()}<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


def render_gemma4(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                  enable_thinking: bool = False) -> str:
    """Gemma 4's turn format, as its official template writes a chat without tools:

        <|turn>system
        <|think|>            (with thinking on)
        {system text}<turn|>
        <|turn>user
        {text}<turn|>
        <|turn>model
        {answer, earlier thoughts stripped}<turn|>
        <|turn>model
        <|channel>thought
        <channel|>           (the empty thought that turns thinking off)

    The system role is native; roles must alternate as for the earlier generations."""
    turns = list(messages)
    parts: list[str] = []
    if enable_thinking or turns[0].get("role") == "system":
        system = _text(turns[0].get("content"), 0).strip() if turns[0].get("role") == "system" else ""
        parts.append("<|turn>system\n" + ("<|think|>\n" if enable_thinking else "") + system + "<turn|>\n")
        if turns[0].get("role") == "system":
            turns = turns[1:]
    offset = len(messages) - len(turns)
    for j, message in enumerate(turns):
        i, role = j + offset, message.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"message {i} has unknown role {role!r} (use system, user or assistant)"
                                      if role != "system" else "a system message may only come first")
        if (role == "user") != (j % 2 == 0):
            raise InvalidRequestError(f"message {i} is from {role!r}: roles must alternate user/assistant, "
                                      "starting with user")
        text = _text(message.get("content"), i, image="<|image|>")
        text = strip_thoughts(text) if role != "user" else text.strip()
        parts.append(f"<|turn>{ROLES[role]}\n{text}<turn|>\n")
    if add_generation_prompt:
        parts.append("<|turn>model\n" + ("" if enable_thinking else "<|channel>thought\n<channel|>"))
    return "".join(parts)
