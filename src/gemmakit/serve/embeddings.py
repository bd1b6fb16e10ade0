"""``/v1/embeddings`` for an embedding model (EmbeddingGemma): many requests to one forward pass.

Requests are tokenised and checked in the route (a bad one is a 400 before any model work), then
queued for one worker thread. Each turn it takes every request waiting, up to ``max_texts``
texts, and embeds their texts together, sorted by length (engine/embed.py), so that concurrent
clients sending a text each share a batch. Should a batch fail, its requests are run again one
by one, so that only the request that cannot be embedded gets the error.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import queue
import threading
from dataclasses import dataclass, field

import torch

from gemmakit.engine.embed import EncodedInputs, embed_rows, truncate
from gemmakit.models.encoder import EmbeddingModel

MAX_TEXTS = 256  # texts one turn of the worker takes (the embedding batches within it are smaller)


@dataclass
class _Job:
    encoded: EncodedInputs
    dim: int | None
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class EmbeddingRunner:
    """The worker thread that embeds queued requests; :meth:`embed` is its asynchronous door."""

    def __init__(self, model: EmbeddingModel, batch_size: int = 32, max_texts: int = MAX_TEXTS) -> None:
        self.model = model
        self.batch_size = batch_size
        self.max_texts = max_texts
        self.requests = 0  # finished, for /metrics
        self.texts = 0
        self.tokens = 0
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gemmakit-embeddings", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    async def embed(self, encoded: EncodedInputs, dim: int | None) -> torch.Tensor:
        """The embeddings ``[len(encoded.rows), dim or width]`` of one request's encoded inputs."""
        job = _Job(encoded, dim)
        self._queue.put(job)
        return await asyncio.wrap_future(job.done)

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            jobs, texts, stop = [first], len(first.encoded.rows), False
            while texts < self.max_texts:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
                texts += len(job.encoded.rows)
            self._run(jobs)
            if stop:
                return

    def _run(self, jobs: list[_Job]) -> None:
        rows = [row for job in jobs for row in job.encoded.rows]
        skips = [skip for job in jobs for skip in job.encoded.skips]
        try:
            vectors = embed_rows(self.model, EncodedInputs(rows, skips), self.batch_size)
        except Exception as exc:  # noqa: BLE001 - one at a time, so only the failing request gets it
            if len(jobs) == 1:
                jobs[0].done.set_exception(exc)
                return
            for job in jobs:
                self._run([job])
            return
        start = 0
        for job in jobs:
            count = len(job.encoded.rows)
            job.done.set_result(truncate(self.model, vectors[start:start + count], job.dim))
            start += count
            self.requests += 1
            self.texts += count
            self.tokens += job.encoded.tokens


def embedding_list(vectors: torch.Tensor, encoding_format: str) -> list[dict]:
    """OpenAI's ``data``: one ``{"object": "embedding", "index", "embedding"}`` per vector, the
    embedding as a list of floats or, for ``base64``, its little-endian float32 bytes in base64."""
    rows = vectors.to(torch.float32).contiguous()
    if encoding_format == "base64":
        values = [base64.b64encode(row.numpy().astype("<f4").tobytes()).decode("ascii") for row in rows]
    else:
        values = rows.tolist()
    return [{"object": "embedding", "index": i, "embedding": value} for i, value in enumerate(values)]
