"""``POST /v1/chat/completions``: messages rendered with the model's chat template."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request

from gemmakit.serve.chat_plan import prepare_chat
from gemmakit.serve.dependencies import State, json_body
from gemmakit.serve.generation import run
from gemmakit.serve.schemas import ChatRequest

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: Annotated[ChatRequest, json_body(ChatRequest)], state: State):
    chat = await prepare_chat(state, body)
    return await run(state, request, chat.prompt, chat.common, body.logprob_count, chat=True, media=chat.media,
                     reply=chat.plan.parser)
