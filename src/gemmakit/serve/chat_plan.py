"""What a chat request asks beyond its messages: tools, a forced call, thinking, template variables.

:class:`ChatPlan` is built once per request from the parsed body and the served tokenizer. It
renders the prompt (the messages rewritten for the model's tool syntax, chat/tools.py), gives the
grammar a forced call follows, and makes the parser that splits each choice's reply into
``reasoning_content``, ``content`` and ``tool_calls``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gemmakit.chat import render_chat, turn_format
from gemmakit.chat.tools import GEMMA4, ReplyParser, ToolSchemaError, ToolSyntax, call_grammar, prompt_messages, \
    tool_syntax
from gemmakit.engine.grammar import Grammar
from gemmakit.models.multimodal import ImagePrompt
from gemmakit.serve.errors import FieldError
from gemmakit.serve.schemas import ChatRequest, Common, Constraint, text_chat
from gemmakit.serve.state import ServerState


@dataclass(frozen=True)
class ChatPlan:
    syntax: ToolSyntax
    tools: tuple[dict[str, Any], ...] = ()  # offered to the model
    variables: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs
    thoughts: bool = False  # a Gemma 4 vocabulary: its thought channel goes to reasoning_content
    constraint: Constraint | None = None  # a forced call's grammar

    @classmethod
    def of(cls, body: ChatRequest, tokenizer) -> ChatPlan:
        syntax = tool_syntax(getattr(tokenizer, "chat_template", None))
        thoughts = turn_format(tokenizer) == "gemma4"
        constraint = None
        if body.forced_tools:
            try:
                kind, grammar = call_grammar(body.forced_tools, syntax, parallel=body.parallel_tool_calls,
                                             thought=syntax is GEMMA4 and bool(body.chat_template_kwargs.get(
                                                 "enable_thinking")), special_id=tokenizer.special_id)
            except ToolSchemaError as exc:
                raise FieldError(str(exc), "tools") from None
            constraint = Constraint(Grammar.lark(grammar) if kind == "lark" else Grammar.json_schema(grammar),
                                    "tools")
        return cls(syntax, body.offered_tools, body.chat_template_kwargs, thoughts, constraint)

    def render(self, chat: list[dict[str, Any]], tokenizer) -> str:
        """The prompt of ``chat`` (render_chat's messages) with this request's tools and variables."""
        messages, tools = prompt_messages(chat, self.tools, self.syntax)
        return render_chat(messages, tokenizer=tokenizer, tools=tools, **self.variables)

    def parser(self) -> ReplyParser | None:
        """A fresh parser for one choice's reply, or None when the reply is plain content."""
        if not self.tools and not self.thoughts:
            return None
        return ReplyParser(self.syntax, [t["function"]["name"] for t in self.tools], self.thoughts)


@dataclass(frozen=True)
class PreparedChat:
    """A chat request ready to submit: prompt ids, the model bound to its media (or None), the
    generation fields with a forced call's grammar, and the plan that reads the replies."""

    prompt: list[int]
    media: ImagePrompt | None
    common: Common
    plan: ChatPlan


async def prepare_chat(state: ServerState, body: ChatRequest) -> PreparedChat:
    """What /v1/chat/completions and /v1/responses do before submitting a chat."""
    state.require_tokenizer()
    plan = ChatPlan.of(body, state.tokenizer)
    common = body.common(state.default_max_tokens)
    if plan.constraint is not None:
        common = dataclasses.replace(common, constraint=plan.constraint)
    if state.vision is not None:  # a media model's chat, images or not: placed and checked here
        bound, ids = await asyncio.to_thread(state.vision.prepare, body.messages, plan)  # decodes the media
        return PreparedChat(ids, bound, common, plan)
    text = plan.render(text_chat(body.messages, state.accepts_images), state.tokenizer)
    return PreparedChat(state.tokenizer.encode(text, add_bos=True), None, common, plan)
