"""``POST /v1/responses``: OpenAI's Responses API, run as a chat (serve/responses.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from gemmakit.serve.chat_plan import prepare_chat
from gemmakit.serve.dependencies import State, json_body
from gemmakit.serve.generation import submit
from gemmakit.serve.responses import ResponseAnswer, ResponsesRequest
from gemmakit.serve.schemas import ChatRequest

router = APIRouter()


@router.post("/v1/responses")
async def responses(request: Request, body: Annotated[ResponsesRequest, json_body(ResponsesRequest)], state: State):
    try:
        chat_request = ChatRequest.model_validate(body.chat_body(), context=state.validation_context())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    chat = await prepare_chat(state, chat_request)
    handle, stream = await submit(state, chat.prompt, chat.common, media=chat.media)
    return await ResponseAnswer(state, handle, stream, chat.plan.parser(), body).answer(request)
