"""The OpenAI-compatible HTTP server: a FastAPI app over one :class:`~gemmakit.engine.scheduler.Engine`.

``create_app(engine, tokenizer, model_name)`` builds the app (tests start it on a loopback port
with a tiny model; ``gemmakit serve`` with a real one). Routes (serve/routes/):

    POST /v1/chat/completions   POST /v1/completions   POST /v1/responses   POST /v1/embeddings
    GET /v1/models   GET /health   POST /tokenize   POST /detokenize   GET /metrics (Prometheus text)
    POST /v1/audio/transcriptions (Gemma 4 with its audio tower)

A generative model is served by an engine and an embedding model by an embedder
(serve/embeddings.py); each kind's routes answer the other kind's model with a 400.

Requests are pydantic models (schemas.py), answered through generation.py; every error is in
OpenAI's format (errors.py, middleware.py). What the routes share is one
:class:`~gemmakit.serve.state.ServerState` on ``app.state.gemmakit``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from gemmakit.engine.scheduler import Engine
from gemmakit.serve.dependencies import require_api_key, require_generation
from gemmakit.serve.errors import install_handlers
from gemmakit.serve.middleware import ServeMiddleware
from gemmakit.serve.routes import audio, chat, completions, embeddings, health_metrics, models, responses, tokenize
from gemmakit.serve.state import ServerState

MAX_BODY_BYTES = 32 * 2**20  # room for several images as data: URIs


def create_app(engine: Engine | None, tokenizer, model_name: str, api_key: str | None = None,
               default_max_tokens: int = 256, accepts_images: bool = False, vision=None,
               speculative=None, max_body_bytes: int = MAX_BODY_BYTES, embedder=None) -> FastAPI:
    """The app serving ``engine`` (or, for an embedding model, ``embedder``: an
    :class:`~gemmakit.serve.embeddings.EmbeddingRunner`) under the model id ``model_name``; starts
    it with the app.

    ``speculative`` (a :class:`~gemmakit.serve.speculative.SpeculativeRunner`) serves greedy requests
    with a draft model. ``vision`` (a :class:`~gemmakit.serve.vision.VisionRunner`) prepares a media model's
    chat requests (their images and audio through the towers) for ``engine``, which batches them with the rest.
    A request body over ``max_body_bytes`` is refused with a 413 before it is parsed.
    """
    state = ServerState(engine=engine, tokenizer=tokenizer, model_name=model_name, api_key=api_key,
                        default_max_tokens=default_max_tokens, accepts_images=accepts_images, vision=vision,
                        speculative=speculative, max_body_bytes=max_body_bytes, embedder=embedder)
    workers = [worker for worker in (engine, embedder) if worker is not None]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for worker in workers:
            worker.start()
        yield
        for worker in workers:
            worker.shutdown()

    app = FastAPI(title="gemmakit", lifespan=lifespan)
    app.state.gemmakit = state
    install_handlers(app)
    app.add_middleware(ServeMiddleware, state=state)
    app.include_router(health_metrics.health)  # open: load balancers probe it without the key
    guarded = [Depends(require_api_key)]
    for router in (chat.router, completions.router, responses.router, audio.router):
        app.include_router(router, dependencies=[*guarded, Depends(require_generation)])
    for router in (embeddings.router, models.router, tokenize.router, health_metrics.metrics):
        app.include_router(router, dependencies=guarded)
    return app
