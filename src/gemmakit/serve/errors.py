"""Every error the server answers, in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``.

OpenAI clients read ``error.message`` whatever the status, so nothing leaves the server as
FastAPI's default ``{"detail": ...}`` or as a traceback: bad fields (400), a missing key (401), an
unknown route (404), a wrong method (405), a body over the limit (413) and an unexpected exception
(500, from serve/middleware.py) all take this shape. Validation errors answer 400, not FastAPI's 422, as OpenAI does.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemmakit.errors import GemmakitError, InvalidRequestError

def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


class FieldError(InvalidRequestError):
    """A bad value in one request field; ``param`` names it (OpenAI's ``error.param``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class APIError(Exception):
    """An HTTP error other than a bad field (401, 413, ...), answered as ``status`` in OpenAI's format."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers


def invalid(message: str, param: str | None = None, code: str | None = None) -> PydanticCustomError:
    """The error a request-model validator raises: pydantic collects it, :func:`validation_error` answers it.

    ``param`` overrides the field path pydantic records (a nested field named by its own path).
    """
    return PydanticCustomError("invalid_request", message, {"param": param, "code": code})


def field_path(loc: tuple[Any, ...]) -> str:
    """``("messages", 0, "name")`` -> ``messages[0].name``; FastAPI's ``"body"`` prefix dropped."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def validation_error(errors: list[dict[str, Any]]) -> JSONResponse:
    """A 400 for the first of pydantic's errors: one line naming the field, ``param`` the field's path."""
    if not errors:
        return error_response(400, "the request is invalid")
    first = errors[0]
    path = field_path(tuple(first.get("loc", ())))
    ctx = first.get("ctx") or {}
    if first["type"] == "invalid_request":
        return error_response(400, first["msg"], param=ctx.get("param") or path or None, code=ctx.get("code"))
    if first["type"] == "extra_forbidden":
        return error_response(400, f"the field '{path}' is not supported by this server", param=path,
                              code="unsupported_field")
    if first["type"] == "missing":
        return error_response(400, f"the field '{path}' is required", param=path)
    if first["type"] == "json_invalid":
        return error_response(400, f"the request body is not valid JSON ({first['msg']})")
    return error_response(400, f"'{path}': {first['msg']}" if path else first["msg"], param=path or None)


def install_handlers(app: FastAPI) -> None:
    """Answer the expected errors in OpenAI's format; an unexpected exception's 500 is serve/middleware.py's."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(list(exc.errors()))

    @app.exception_handler(GemmakitError)
    async def _gemmakit(request: Request, exc: GemmakitError):
        return error_response(400, str(exc), param=getattr(exc, "param", None), code=getattr(exc, "code", None))

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.kind, code=exc.code, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404:
            message, code = f"no route {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            allowed = (headers or {}).get("allow", (headers or {}).get("Allow", ""))
            message = f"{request.method} is not allowed on {request.url.path}" + (f" (use {allowed})" if allowed
                                                                                  else "")
            code = "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return error_response(exc.status_code, message, code=code, headers=headers)

