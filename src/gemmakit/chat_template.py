"""Gemma's chat format, as the official templates render it.

    <start_of_turn>user
    {text}<end_of_turn>
    <start_of_turn>model
    {text}<end_of_turn>

No Gemma generation has a system role: a system message is folded into the first user turn
(followed by a blank line), as the official Gemma 3 template does and as Gemma 1/2 users do by hand.
The ``<bos>`` token is added by the tokenizer, not written here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gemmakit.errors import InvalidRequestError

ROLES = {"user": "user", "assistant": "model", "model": "model"}


def render_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """Render ``[{"role": ..., "content": ...}, ...]`` into one prompt string."""
    if not messages:
        raise InvalidRequestError("a chat needs at least one message")
    system = ""
    parts: list[str] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(content, str):
            raise InvalidRequestError(f"message {i} has no text content")
        if role == "system":
            if i != 0:
                raise InvalidRequestError("a system message may only come first")
            system = content.strip() + "\n\n"
            continue
        if role not in ROLES:
            raise InvalidRequestError(f"message {i} has unknown role {role!r} (use system, user or assistant)")
        if system and role == "user":
            content, system = system + content, ""
        parts.append(f"<start_of_turn>{ROLES[role]}\n{content.strip()}<end_of_turn>\n")
    if system:  # a system message with no user turn after it
        parts.append(f"<start_of_turn>user\n{system.strip()}<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)
