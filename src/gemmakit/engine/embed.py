"""Texts to embeddings with an embedding model (models/encoder.py), many texts per forward pass.

:func:`embed_texts` tokenises each text as sentence-transformers' ``encode`` does (the prompt's
text before it, the tokenizer's special tokens around it, cut to the model's longest input with
those kept), sorts the texts by length and runs them in batches of similar lengths, so that
little of a batch is padding; the results come back in the order given. With ``dim`` the
embeddings are cut to their first ``dim`` features (Matryoshka) and, for a model that normalises,
normalised again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gemmakit.errors import InvalidRequestError, TokenizerError
from gemmakit.models.encoder import EmbeddingModel

DEFAULT_BATCH = 32  # texts per forward pass
# tokens per forward pass, padding included: a batch of long texts is cut to fewer rows, which
# keeps its activations (and the attention scores of one row) to the size of a few short batches
BATCH_TOKENS = 32 * 512


@dataclass
class EncodedInputs:
    """Inputs as the model reads them: each one's token ids (``rows``) and how many of its first
    tokens are left out of the pooling (``skips``: the prompt's, where the model excludes prompts)."""

    rows: list[list[int]]
    skips: list[int]

    @property
    def tokens(self) -> int:
        """The tokens embedded, special tokens included (what usage reports)."""
        return sum(len(row) for row in self.rows)


def embed_texts(model: EmbeddingModel, tokenizer, inputs: Sequence[str | Sequence[int]], dim: int | None = None,
                prompt: str | None = None, batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """Embed ``inputs`` (texts, or lists of token ids taken as they are) with ``model``: float32
    ``[len(inputs), dim or the model's width]``, in input order (one string is one input).

    ``prompt`` names one of the model's prompts (``config.prompts``: "query", "document", ...),
    whose text goes before each text; None takes the model's default prompt (usually none).
    ``dim`` cuts the embeddings to their first ``dim`` features. Raises InvalidRequestError for
    an unknown prompt, a ``dim`` out of range, no inputs, or token ids outside the vocabulary.
    """
    check_embedding_model(model)
    if isinstance(inputs, str):
        inputs = [inputs]
    check_dimensions(model, dim)
    if batch_size < 1:
        raise InvalidRequestError(f"batch_size must be at least 1, not {batch_size}")
    encoded = encode_inputs(model, tokenizer, inputs, prompt)
    vectors = embed_rows(model, encoded, batch_size)
    return truncate(model, vectors, dim)


def encode_inputs(model: EmbeddingModel, tokenizer, inputs: Sequence[str | Sequence[int]],
                  prompt: str | None = None) -> EncodedInputs:
    """Tokenise ``inputs`` as sentence-transformers does, with the prompt ``prompt`` (a name)."""
    if not inputs:
        raise InvalidRequestError("no input to embed")
    config = model.config
    prompt_text = prompt_of(model, prompt)
    rows = [_token_ids(model, tokenizer, item, prompt_text) for item in inputs]
    skip = 0
    if not config.include_prompt and prompt_text:  # the prompt's tokens are left out of the pooling
        skip = len(_token_ids(model, tokenizer, prompt_text, "")) - config.add_eos
    # token-id inputs carry no prompt of ours, so nothing of theirs is skipped
    skips = [skip if isinstance(item, str) else 0 for item in inputs]
    return EncodedInputs(rows, skips)


def embed_rows(model: EmbeddingModel, encoded: EncodedInputs, batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """The full-width embeddings ``[N, dimension]`` (float32, in input order) of encoded inputs,
    ``batch_size`` rows of similar length to a forward pass (fewer for long rows: BATCH_TOKENS)."""
    rows, skips = encoded.rows, encoded.skips
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = torch.empty(len(rows), model.config.dimension, dtype=torch.float32)
    start = 0
    with torch.inference_mode():
        while start < len(order):
            longest = max(1, len(rows[order[min(start + batch_size, len(order)) - 1]]))
            count = max(1, min(batch_size, BATCH_TOKENS // longest))
            batch = order[start:start + count]
            out[batch] = _forward(model, [rows[i] for i in batch], [skips[i] for i in batch]).float().cpu()
            start += count
    return out


def check_dimensions(model: EmbeddingModel, dim: int | None) -> None:
    width = model.config.dimension
    if dim is not None and not 1 <= dim <= width:
        raise InvalidRequestError(f"dimensions {dim} is out of range: this model's embeddings have "
                                  f"{width} (choose 1 to {width})")


def truncate(model: EmbeddingModel, vectors: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``vectors`` cut to their first ``dim`` features (Matryoshka), normalised again where the
    model normalises; as they are for None or the full width."""
    if dim is None or dim >= vectors.shape[-1]:
        return vectors
    out = vectors[:, :dim]
    return (F.normalize(out, p=2, dim=-1) if model.config.normalize else out).contiguous()


def check_embedding_model(model) -> None:
    if not isinstance(model, EmbeddingModel):
        raise InvalidRequestError("this model generates text; embeddings need an embedding model "
                                  "(EmbeddingGemma: a sentence-transformers directory or a gemma-embedding GGUF; "
                                  "EmbeddingGemma 2: its transformers or sentence-transformers directory)")


def prompt_of(model: EmbeddingModel, name: str | None) -> str:
    """The text of the model's prompt ``name`` (its default prompt for None)."""
    try:
        return model.config.prompt(name)
    except KeyError:
        known = ", ".join(name for name, _ in model.config.prompts) or "none"
        raise InvalidRequestError(f"unknown prompt {name!r}; this model's prompts: {known}") from None


def _token_ids(model: EmbeddingModel, tokenizer, item: str | Sequence[int], prompt_text: str) -> list[int]:
    config = model.config
    limit = config.max_tokens
    if not isinstance(item, str):
        ids = [int(i) for i in item]
        if not ids:
            raise InvalidRequestError("an input of token ids is empty")
        bad = next((i for i in ids if not 0 <= i < config.decoder.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary (0 to {config.decoder.vocab_size - 1})")
        if len(ids) > limit:
            raise InvalidRequestError(f"an input of {len(ids)} token ids is longer than this model's {limit}")
        return ids
    if tokenizer is None:
        raise TokenizerError("this model has no tokenizer; pass token ids")
    text = tokenizer.encode(prompt_text + item)
    head = [tokenizer.bos_id] if config.add_bos else []
    tail = [tokenizer.eos_id] if config.add_eos else []
    # cut the text, not the special tokens around it, as transformers' truncation does
    return head + text[:max(0, limit - len(head) - len(tail))] + tail


def _forward(model: EmbeddingModel, rows: list[list[int]], skips: list[int]) -> torch.Tensor:
    """One batch, padded on the right: padding has position -1 (no key sees it) and is not pooled,
    nor are each row's first ``skips`` tokens."""
    T = max(1, max(len(r) for r in rows))
    device = model.device
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    positions = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        positions[b, :len(row)] = torch.arange(len(row))
    mask = positions >= torch.tensor(skips, dtype=torch.long)[:, None]
    return model(ids.to(device), positions.to(device), mask.to(device))
