"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's routes): the ids a prompt becomes, and back."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter

from gemmakit.chat import render_chat
from gemmakit.serve.dependencies import State, json_body
from gemmakit.serve.errors import FieldError
from gemmakit.serve.schemas import DetokenizeRequest, TokenizeRequest, text_chat

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: Annotated[TokenizeRequest, json_body(TokenizeRequest)], state: State):
    state.require_tokenizer()
    if body.is_chat and state.vision is not None:  # images placed where their parts are
        ids = (await asyncio.to_thread(state.vision.prepare, body.messages))[2]
    elif body.is_chat:
        text = render_chat(text_chat(body.messages, state.accepts_images), tokenizer=state.tokenizer)
        ids = state.tokenizer.encode(text, add_bos=True)
    elif body.prompt is not None:
        ids = state.tokenizer.encode(body.prompt, add_bos=bool(body.add_special_tokens))
    else:
        raise FieldError("give 'prompt' (a string) or 'messages'", "prompt")
    return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_seq_len}


@router.post("/detokenize")
async def detokenize(body: Annotated[DetokenizeRequest, json_body(DetokenizeRequest)], state: State):
    state.require_tokenizer()
    return {"prompt": state.tokenizer.decode(body.tokens)}
