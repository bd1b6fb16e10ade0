"""Sliding-window perplexity with llama.cpp's conventions, so the numbers compare with ``llama-perplexity``.

The convention (llama.cpp ``tools/perplexity/perplexity.cpp``, function ``perplexity``):

1. The whole text is tokenised once, with ``<bos>`` in front when the model adds one (Gemma does).
2. It is cut into ``n_chunk = len(tokens) // n_ctx`` non-overlapping windows of ``n_ctx`` tokens;
   the remainder is dropped, and at least ``2 * n_ctx`` tokens are required.
3. Each window is evaluated from scratch with its first token replaced by ``<bos>``.
4. Only the second half is scored: positions ``j = n_ctx/2 .. n_ctx-2`` predict token ``j + 1``,
   i.e. ``n_ctx - 1 - n_ctx/2`` tokens per window, each with at least ``n_ctx/2`` tokens of context.
5. PPL = exp(mean negative log-likelihood over all scored tokens); the +/- is llama.cpp's
   ``ppl * sqrt(var(nll) / (count - 1))``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from gemmakit.errors import InvalidRequestError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    error: float  # llama.cpp's "+/-" estimate
    nll: float  # mean negative log-likelihood per scored token
    tokens: int  # tokens in the text (with <bos>)
    scored: int
    chunks: int
    n_ctx: int


@torch.no_grad()
def perplexity(model, ids: list[int], n_ctx: int, bos_id: int | None, progress: bool = False) -> PerplexityResult:
    """Perplexity of a token sequence that already starts with ``<bos>`` (if the model uses one)."""
    if n_ctx < 4:
        raise InvalidRequestError("--ctx must be at least 4")
    if len(ids) < 2 * n_ctx:
        raise InvalidRequestError(f"the text has {len(ids)} tokens; perplexity with --ctx {n_ctx} needs at least "
                                  f"{2 * n_ctx} (2 x ctx, as llama.cpp); use a longer text or a smaller --ctx")
    model.eval()
    n_chunk = len(ids) // n_ctx
    first = n_ctx // 2
    tokens = torch.tensor(ids[:n_chunk * n_ctx], dtype=torch.long).view(n_chunk, n_ctx)
    nll_sum, nll2_sum, count = 0.0, 0.0, 0
    chunks = range(n_chunk)
    if progress:
        chunks = tqdm(chunks, desc="perplexity", unit="chunk", file=sys.stderr)
    for i in chunks:
        window = tokens[i:i + 1].clone()  # [1, n_ctx]
        if bos_id is not None:
            window[0, 0] = bos_id
        logits = model(window.to(model.device))[0, first:n_ctx - 1].float()  # [n_ctx - 1 - first, V]
        targets = tokens[i, first + 1:].to(logits.device)
        nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0].double()
        nll_sum += nll.sum().item()
        nll2_sum += nll.pow(2).sum().item()
        count += nll.numel()
    mean = nll_sum / count
    ppl = math.exp(mean)
    var = nll2_sum / count - mean * mean
    error = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    return PerplexityResult(ppl, error, mean, len(ids), count, n_chunk, n_ctx)


def perplexity_of_file(model, tokenizer, path: str | Path, n_ctx: int = 512, progress: bool = False) -> PerplexityResult:
    """Read a raw text file (e.g. wiki.test.raw) and compute its perplexity."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequestError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read {path}: {exc}") from None
    if not text.strip():
        raise InvalidRequestError(f"{path} is empty")
    ids = tokenizer.encode(text, add_bos=True)
    return perplexity(model, ids, n_ctx, tokenizer.bos_id, progress=progress)
