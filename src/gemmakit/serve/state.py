"""What every route shares: one object on ``app.state.gemmakit`` instead of closures in create_app."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from gemmakit.engine.scheduler import Engine
from gemmakit.serve.errors import FieldError


@dataclass
class ServerState:
    """The engine, the tokenizer, the one-at-a-time runners and the HTTP counters of one app."""

    engine: Engine
    tokenizer: Any
    model_name: str
    api_key: str | None = None
    default_max_tokens: int = 256
    accepts_images: bool = False
    vision: Any = None  # a VisionRunner: a vision model's chat requests
    speculative: Any = None  # a SpeculativeRunner: greedy requests with a draft model
    max_body_bytes: int = 32 * 2**20
    created: int = field(default_factory=lambda: int(time.time()))
    http_requests: dict[tuple[str, int], int] = field(default_factory=dict)  # (path, status) -> count, /metrics

    def count(self, path: str, status: int) -> None:
        key = (path, status)
        self.http_requests[key] = self.http_requests.get(key, 0) + 1

    def require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise FieldError("this model has no tokenizer; only token-id prompts can be served")

    def validation_context(self) -> dict[str, Any]:
        """What the request models check against (schemas.py): the served model id and vocabulary."""
        return {"model_name": self.model_name, "vocab_size": self.engine.model.config.vocab_size}


def get_state(request: Request) -> ServerState:
    """The dependency that hands a route its app's :class:`ServerState`."""
    return request.app.state.gemmakit
