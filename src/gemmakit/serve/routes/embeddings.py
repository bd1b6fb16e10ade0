"""``POST /v1/embeddings``: texts or token ids to vectors, with an embedding model (EmbeddingGemma)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter

from gemmakit.engine.embed import check_dimensions, encode_inputs, prompt_of
from gemmakit.errors import InvalidRequestError
from gemmakit.serve.dependencies import State, json_body
from gemmakit.serve.embeddings import embedding_list
from gemmakit.serve.errors import FieldError
from gemmakit.serve.schemas import EmbeddingRequest

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(body: Annotated[EmbeddingRequest, json_body(EmbeddingRequest)], state: State):
    runner = state.require_embedder()
    model = runner.model
    for check, param in ((lambda: check_dimensions(model, body.dimensions), "dimensions"),
                         (lambda: prompt_of(model, body.prompt_name), "prompt_name")):
        try:
            check()
        except InvalidRequestError as exc:
            raise FieldError(str(exc), param) from None
    if any(isinstance(item, str) for item in body.input):
        state.require_tokenizer()
    try:
        encoded = await asyncio.to_thread(encode_inputs, model, state.tokenizer, list(body.input), body.prompt_name)
    except InvalidRequestError as exc:
        raise FieldError(str(exc), "input") from None
    vectors = await runner.embed(encoded, body.dimensions)
    tokens = encoded.tokens
    return {"object": "list", "data": embedding_list(vectors, body.encoding_format), "model": state.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
