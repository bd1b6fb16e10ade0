"""The dependencies routes declare: the shared state, the API key, and a body parsed into its request model."""

from __future__ import annotations

import json
import math
import secrets
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from gemmakit.serve.errors import APIError, FieldError
from gemmakit.serve.state import ServerState, get_state

State = Annotated[ServerState, Depends(get_state)]

_bearer = HTTPBearer(auto_error=False)  # the 401 is ours, in OpenAI's format, not FastAPI's 403


async def require_api_key(state: State,
                          credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """With an API key set, every guarded route needs ``Authorization: Bearer KEY``."""
    if state.api_key is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), state.api_key.encode()):
        raise APIError(401, "invalid or missing API key (Authorization: Bearer)", "authentication_error",
                       code="invalid_api_key")


async def require_generation(state: State) -> None:
    """The generating routes' guard: an embedding model's server answers them with a 400."""
    state.require_engine()


M = TypeVar("M", bound=BaseModel)


def json_body(model: type[M]):
    """A dependency giving the body as ``model``, validated against the served model and vocabulary.

    The body is read here rather than by FastAPI's own body parameter so that any Content-Type
    is read as JSON (curl's ``-d`` sends a form type) and a body that is not a JSON object is a
    400 with its own message; the size limit applies while it is read (serve/middleware.py).
    """

    async def parse(request: Request, state: State) -> M:
        raw = await request.body()
        try:
            data: Any = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise FieldError(f"the request body is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise FieldError("the request body must be a JSON object")
        if (where := non_finite(data)) is not None:
            raise FieldError(f"'{where}' must be a finite number (JSON has no NaN or Infinity)", where)
        try:
            return model.model_validate(data, context=state.validation_context())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None

    return Depends(parse)


def non_finite(value: Any, path: str = "") -> str | None:
    """The path of the first NaN or infinity in a parsed body (Python's json reads ``NaN`` and
    ``Infinity``, which JSON has not), or None. Checked once here, for every field at every
    depth: a NaN passes each ``<``/``>`` bound check, and a NaN temperature reaches the sampler."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path or "body"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        if (found := non_finite(item, where)) is not None:
            return found
    return None
