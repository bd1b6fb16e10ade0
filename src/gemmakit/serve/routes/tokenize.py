"""``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info`` (vLLM's routes): the ids a
prompt becomes, and back, and the special tokens (lm-eval's remote tokenizer reads all three)."""

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
        ids = (await asyncio.to_thread(state.vision.prepare, body.messages))[1]
    elif body.is_chat:
        text = render_chat(text_chat(body.messages, state.accepts_images), tokenizer=state.tokenizer)
        ids = state.tokenizer.encode(text, add_bos=True)
    elif body.prompt is not None:
        ids = state.tokenizer.encode(body.prompt, add_bos=bool(body.add_special_tokens))
    else:
        raise FieldError("give 'prompt' (a string) or 'messages'", "prompt")
    return {"tokens": ids, "count": len(ids), "max_model_len": state.max_seq_len}


@router.post("/detokenize")
async def detokenize(body: Annotated[DetokenizeRequest, json_body(DetokenizeRequest)], state: State):
    state.require_tokenizer()
    return {"prompt": state.tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(state: State):
    """The special tokens as text, the chat template and the context: what a client that tokenises
    through this server (lm-eval's ``tokenizer_backend=remote``) needs besides /tokenize."""
    state.require_tokenizer()
    tokenizer = state.tokenizer

    def piece(i: int) -> str | None:
        return tokenizer.id_to_piece(i) if 0 <= i < tokenizer.vocab_size else None

    return {"eos_token": piece(tokenizer.eos_id), "bos_token": piece(tokenizer.bos_id),
            "pad_token": piece(tokenizer.pad_id), "chat_template": tokenizer.chat_template,
            "model_max_length": state.max_seq_len, "vocab_size": tokenizer.vocab_size}
