"""The OpenAI-compatible server (``gemmakit serve``): FastAPI app in app.py, request parsing in protocol.py."""

from __future__ import annotations

from pathlib import Path


def model_id(source) -> str:
    """The id clients put in ``"model"``: the checkpoint's file or directory name without suffix."""
    return Path(str(source)).name.removesuffix(".gguf") if source else "gemma"


def run_server(model_source: str | None = None, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, max_batch: int = 8, dtype: str | None = None,
               max_seq_len: int | None = None, max_kv_bytes: int | None = None, adapter: str | None = None) -> None:
    """Load a model, start the engine and serve it with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError:
        from gemmakit.errors import GemmakitError

        raise GemmakitError("serving needs FastAPI and uvicorn: pip install 'gemmakit[serve]'") from None
    from gemmakit.api import load
    from gemmakit.engine.scheduler import Engine
    from gemmakit.serve.app import create_app

    model, tokenizer = load(model_source, dtype=dtype, adapter=adapter)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, max_kv_bytes=max_kv_bytes)
    app = create_app(engine, tokenizer, model_id(getattr(model, "source", model_source)), api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level="warning")
