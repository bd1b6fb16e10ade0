"""``POST /v1/chat/completions``: messages rendered with the model's chat template."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Annotated

from fastapi import APIRouter, Request

from gemmakit.serve.chat_plan import ChatPlan
from gemmakit.serve.dependencies import State, json_body
from gemmakit.serve.generation import run
from gemmakit.serve.schemas import ChatRequest, text_chat

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: Annotated[ChatRequest, json_body(ChatRequest)], state: State):
    state.require_tokenizer()
    plan = ChatPlan.of(body, state.tokenizer)
    common = body.common(state.default_max_tokens)
    if plan.constraint is not None:
        common = dataclasses.replace(common, constraint=plan.constraint)
    if state.vision is not None:  # a vision model's chat, images or not: its one-at-a-time path
        text, images, ids = await asyncio.to_thread(state.vision.prepare, body.messages, common,
                                                    body.logprobs, plan)  # decodes the images
        return await run(state, request, ids, common, None, chat=True, images=(text, images), reply=plan.parser)
    text = plan.render(text_chat(body.messages, state.accepts_images), state.tokenizer)
    prompt = state.tokenizer.encode(text, add_bos=True)
    return await run(state, request, prompt, common, body.logprob_count, chat=True, reply=plan.parser)
