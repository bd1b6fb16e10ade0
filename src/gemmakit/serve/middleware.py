"""The outermost layer of the app: the body-size limit, the per-route counters and the 500 for the unexpected.

A plain ASGI middleware rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware
runs the route in a separate task and buffers its messages, which gets in the way of streaming
responses and of noticing that a client went away.
"""

from __future__ import annotations

import logging

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gemmakit.serve.errors import APIError, error_response
from gemmakit.serve.state import ServerState

log = logging.getLogger("gemmakit.serve")


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                    code="request_too_large")


class ServeMiddleware:
    """Refuses bodies over ``state.max_body_bytes`` with a 413, counts every answer by route and status
    for /metrics, and turns an exception no handler answered into a 500 without a traceback."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []
        limit = self.state.max_body_bytes

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        try:
            if length.isdigit() and int(length) > limit:  # refused before a byte of it is read
                raise too_large(limit)
            received = 0

            async def receive_limited() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":  # a chunked body has no Content-Length: count it
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise too_large(limit)
                return message

            await self.app(scope, receive_limited, send_counted)
        except ClientDisconnect:  # gone while sending its body: no one to answer
            status.append(499)
        except Exception as exc:
            if status:  # a streamed response already under way: nothing more can be sent
                raise
            if isinstance(exc, APIError):
                response = error_response(exc.status, exc.message, exc.kind, code=exc.code, headers=exc.headers)
            else:  # the traceback goes to the server's log, never to the client
                log.error("unexpected error in %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
                response = error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
            await response(scope, receive, send_counted)
        finally:
            self.state.count(scope.get("path", ""), status[0] if status else 500)
