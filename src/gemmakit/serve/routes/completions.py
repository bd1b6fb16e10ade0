"""``POST /v1/completions``: a prompt string or token ids, continued as they are."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request

from gemmakit.serve.dependencies import State, json_body
from gemmakit.serve.errors import FieldError
from gemmakit.serve.generation import Echo, run
from gemmakit.serve.schemas import CompletionRequest

router = APIRouter()

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for text completions (chat's is create_app's default_max_tokens)


@router.post("/v1/completions")
async def completions(request: Request, body: Annotated[CompletionRequest, json_body(CompletionRequest)],
                      state: State):
    common = body.common(DEFAULT_MAX_TOKENS)
    if state.vision is not None and state.vision.layout == "paligemma":
        raise FieldError("PaliGemma answers about an image: send it to /v1/chat/completions as an image_url part")
    if isinstance(body.prompt, str):
        state.require_tokenizer()
        prompt = state.tokenizer.encode(body.prompt, add_bos=True)
    else:
        prompt = body.prompt
    echo = None
    if body.echo:  # the prompt as given; an id prompt as its text
        state.require_tokenizer()
        text = body.prompt if isinstance(body.prompt, str) else state.tokenizer.decode(prompt)
        echo = Echo(text, added_bos=isinstance(body.prompt, str))
    return await run(state, request, prompt, common, body.logprob_count, chat=False, echo=echo)
