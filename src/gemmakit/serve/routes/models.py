"""``GET /v1/models``: the one model this server serves, by the id clients put in ``"model"``."""

from __future__ import annotations

from fastapi import APIRouter

from gemmakit.serve.dependencies import State

router = APIRouter()


@router.get("/v1/models")
async def models(state: State):
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                        "owned_by": "gemmakit", "max_model_len": state.max_seq_len}]}
