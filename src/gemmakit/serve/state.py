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
    """The engine, the tokenizer, the media and speculative runners and the HTTP counters of one app.

    A generative model has an ``engine``; an embedding model has an ``embedder`` instead
    (serve/embeddings.py), and the routes of the other kind answer 400 saying which it is."""

    engine: Engine | None
    tokenizer: Any
    model_name: str
    api_key: str | None = None
    default_max_tokens: int = 256
    accepts_images: bool = False
    vision: Any = None  # a VisionRunner: a vision model's chat requests
    speculative: Any = None  # a SpeculativeRunner: greedy requests with a draft model
    max_body_bytes: int = 32 * 2**20
    embedder: Any = None  # an EmbeddingRunner: an embedding model's /v1/embeddings
    created: int = field(default_factory=lambda: int(time.time()))
    http_requests: dict[tuple[str, int], int] = field(default_factory=dict)  # (path, status) -> count, /metrics

    def count(self, path: str, status: int) -> None:
        key = (path, status)
        self.http_requests[key] = self.http_requests.get(key, 0) + 1

    def require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise FieldError("this model has no tokenizer; only token-id prompts can be served")

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise FieldError(f"{self.model_name!r} is an embedding model: it answers /v1/embeddings, and does not "
                             "generate text", "model", "model_not_generative")
        return self.engine

    def require_embedder(self):
        if self.embedder is None:
            raise FieldError(f"{self.model_name!r} generates text; /v1/embeddings needs an embedding model "
                             "(EmbeddingGemma) served by its own gemmakit serve", "model", "model_not_embedding")
        return self.embedder

    @property
    def max_seq_len(self) -> int:
        """The longest input (an embedding model's) or sequence (a generative model's) served."""
        return self.engine.max_seq_len if self.engine is not None else self.embedder.model.config.max_tokens

    def validation_context(self) -> dict[str, Any]:
        """What the request models check against (schemas.py): the served model id and vocabulary."""
        config = self.engine.model.config if self.engine is not None else self.embedder.model.config.decoder
        return {"model_name": self.model_name, "vocab_size": config.vocab_size}


def get_state(request: Request) -> ServerState:
    """The dependency that hands a route its app's :class:`ServerState`."""
    return request.app.state.gemmakit
