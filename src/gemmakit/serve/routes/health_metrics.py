"""``GET /health`` (open, for load balancers) and ``GET /metrics`` (Prometheus text, behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from gemmakit.serve.dependencies import State
from gemmakit.serve.state import ServerState

health = APIRouter()
metrics = APIRouter()


@health.get("/health")
async def health_check():
    return {"status": "ok"}


@metrics.get("/metrics")
async def prometheus_metrics(state: State):
    return PlainTextResponse(prometheus(state), media_type="text/plain; version=0.0.4")


def prometheus(state: ServerState) -> str:
    """The Prometheus text exposition of the engine's counters and gauges and the HTTP answers."""
    engine, speculative, embedder = state.engine, state.speculative, state.embedder
    label = f'model="{state.model_name}"'
    rows = []
    if engine is not None:
        rows += _engine_rows(engine)
    if embedder is not None:
        rows += [("gemmakit_embedding_requests_total", "counter", "embedding requests answered", embedder.requests),
                 ("gemmakit_embedding_inputs_total", "counter", "inputs embedded", embedder.texts),
                 ("gemmakit_embedding_tokens_total", "counter", "tokens embedded", embedder.tokens)]
    if speculative is not None:
        rows += [("gemmakit_speculative_rounds_total", "counter", "draft-and-verify rounds", speculative.rounds),
                 ("gemmakit_speculative_accepted_tokens_total", "counter", "draft tokens the target accepted",
                  speculative.accepted)]
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{label}}} {value}"]
    lines += ["# HELP gemmakit_http_requests_total HTTP requests by route and status",
              "# TYPE gemmakit_http_requests_total counter"]
    for (path, status), count in sorted(state.http_requests.items()):
        lines.append(f'gemmakit_http_requests_total{{path="{path}",status="{status}"}} {count}')
    return "\n".join(lines) + "\n"


def _engine_rows(engine) -> list[tuple[str, str, str, float]]:
    """The batching engine's counters and gauges: (name, type, help, value)."""
    s = engine.stats
    return [
        ("gemmakit_requests_total", "counter", "completion requests accepted", s.requests_total),
        ("gemmakit_requests_finished_total", "counter", "completion requests finished", s.requests_finished),
        ("gemmakit_requests_cancelled_total", "counter", "requests cancelled (client went away)",
         s.requests_cancelled),
        ("gemmakit_prompt_tokens_total", "counter", "prompt tokens received", s.prompt_tokens_total),
        ("gemmakit_prefilled_tokens_total", "counter", "prompt tokens computed", s.prefilled_tokens_total),
        ("gemmakit_prefix_cache_hit_tokens_total", "counter", "prompt tokens reused from the prefix cache",
         s.cached_tokens_total),
        ("gemmakit_generation_tokens_total", "counter", "tokens generated", s.generated_tokens_total),
        ("gemmakit_engine_steps_total", "counter", "scheduler iterations", s.steps_total),
        ("gemmakit_queue_depth", "gauge", "sequences waiting for a batch row", engine.queue_depth),
        ("gemmakit_running_sequences", "gauge", "sequences in the running batch", engine.running),
        ("gemmakit_batch_rows", "gauge", "most sequences run at once", engine.rows),
        ("gemmakit_kv_cache_bytes", "gauge", "bytes of the key/value cache", engine.cache.nbytes()),
        ("gemmakit_generation_tokens_per_second", "gauge", "tokens generated per second, last 10 s",
         round(s.tokens_per_second(), 3)),
    ]
