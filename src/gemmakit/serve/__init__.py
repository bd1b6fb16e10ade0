"""The OpenAI-compatible server (``gemmakit serve``).

app.py builds the FastAPI app from routes/ (one router per concern); schemas.py holds the request
models, generation.py turns a submitted request into a JSON answer or an SSE stream, errors.py and
middleware.py answer every error in OpenAI's format; vision.py places a media model's images and
audio and runs its towers before the request joins the engine's batch; speculative.py is the
one-at-a-time path for --draft-model requests.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gemmakit.errors import InvalidRequestError


def model_id(source) -> str:
    """The id clients put in ``"model"``: the checkpoint's file or directory name without suffix."""
    return Path(str(source)).name.removesuffix(".gguf") if source else "gemma"


def run_server(model_source: str | None = None, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, max_batch: int = 8, dtype: str | None = None,
               max_seq_len: int | None = None, max_kv_bytes: int | None = None, adapter: str | None = None,
               draft_model: str | None = None, draft_tokens: int = 4, quant: str = "auto",
               device: str = "cpu", kv_cache: str = "auto", prefill_dtype: str = "auto",
               matformer: str | None = None, mmproj: str | bool | None = None, activations: str = "auto") -> None:
    """Load a model, start the engine and serve it with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError:
        from gemmakit.errors import GemmakitError

        raise GemmakitError("serving needs FastAPI and uvicorn: pip install 'gemmakit[serve]'") from None
    from gemmakit.api import LoadOptions, load_model, settle_for_serving
    from gemmakit.chat import pretrained_warning

    model, tokenizer, report = load_model(model_source, LoadOptions(
        dtype=dtype, adapter=adapter, quant=quant, device=device, kv_cache=kv_cache, prefill_dtype=prefill_dtype,
        matformer=matformer, mmproj=mmproj, activations=activations))
    draft = (load_model(draft_model, LoadOptions(dtype=dtype, device=device, mmproj=False)).model
             if draft_model else None)  # a drafter drafts text, whatever lies beside it
    for loaded in (model, draft):
        if loaded is not None:
            settle_for_serving(loaded)  # before the first request, not during one
    from gemmakit.models.encoder import EmbeddingModel

    # an embedding model answers no chat, so a chat template's absence says nothing about it
    if not isinstance(model, EmbeddingModel) and (warning := pretrained_warning(tokenizer, report.source)):
        print(warning, file=sys.stderr)
    app = build_app(model, tokenizer, model_id(report.source), api_key=api_key,
                    max_batch=max_batch, max_seq_len=max_seq_len, max_kv_bytes=max_kv_bytes, draft=draft,
                    draft_tokens=draft_tokens)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def build_app(model, tokenizer, name: str, api_key: str | None = None, max_batch: int = 8,
              max_seq_len: int | None = None, max_kv_bytes: int | None = None, draft=None, draft_tokens: int = 4,
              **engine_options):
    """The app for a loaded model: a batching engine (with ``draft``, plus the one-at-a-time
    speculative path for greedy requests); for an embedding model, the embedding runner alone.

    A media model's chat requests have their images and audio placed, checked and run through the
    towers by :class:`~gemmakit.serve.vision.VisionRunner`, then join the engine's batch.
    """
    from gemmakit.engine.scheduler import Engine
    from gemmakit.models.encoder import EmbeddingModel
    from gemmakit.models.multimodal import MediaModel
    from gemmakit.serve.app import create_app

    if isinstance(model, EmbeddingModel):
        from gemmakit.serve.embeddings import EmbeddingRunner

        if draft is not None:
            raise InvalidRequestError("--draft-model speeds up generation; an embedding model does not generate")
        return create_app(None, tokenizer, name, api_key=api_key, embedder=EmbeddingRunner(model))
    media_model = isinstance(model, MediaModel)
    speculative = None
    if draft is not None:
        from gemmakit.engine.speculative import drafting_model
        from gemmakit.serve.speculative import SpeculativeRunner

        speculative = SpeculativeRunner(model.decoder if media_model else model, drafting_model(draft), tokenizer,
                                        draft_tokens)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, max_kv_bytes=max_kv_bytes,
                    **engine_options)
    vision = None
    if media_model:
        from gemmakit.serve.vision import VisionRunner

        vision = VisionRunner(model, tokenizer, engine)
    return create_app(engine, tokenizer, name, api_key=api_key, accepts_images=vision is not None, vision=vision,
                      speculative=speculative)
