"""CodeGemma fill-in-the-middle: complete the code between a prefix and a suffix.

CodeGemma's prompt (model card, "prefix-suffix-middle" mode) is

    <bos><|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>

and the model then writes the middle, ending it with ``<|file_separator|>`` (or ``<eos>``). A model
that starts another FIM block has also finished the middle, so the FIM markers stop it too.
The markers are added as ids, never parsed out of the user's code, so code that happens to contain
the text ``<|fim_suffix|>`` cannot change the prompt's structure.
"""

from __future__ import annotations

from collections.abc import Iterator

from gemmakit.api import stream
from gemmakit.errors import TokenizerError

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FILE_SEPARATOR = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_separator|>"


def _fim_ids(tokenizer) -> dict[str, int]:
    ids = {piece: tokenizer.token_to_id(piece) for piece in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FILE_SEPARATOR)}
    missing = [piece for piece, i in ids.items() if i is None]
    if missing:
        raise TokenizerError(f"this model's vocabulary has no {', '.join(missing)}; fill-in-the-middle needs a "
                             "CodeGemma model (codegemma-2b, codegemma-7b)")
    return ids  # type: ignore[return-value]


def fim_prompt(tokenizer, prefix: str, suffix: str) -> list[int]:
    """Token ids of the prefix-suffix-middle prompt, starting with ``<bos>``."""
    ids = _fim_ids(tokenizer)
    return ([tokenizer.bos_id, ids[FIM_PREFIX]] + tokenizer.encode(prefix) + [ids[FIM_SUFFIX]]
            + tokenizer.encode(suffix) + [ids[FIM_MIDDLE]])


def fim_stop_ids(tokenizer) -> frozenset[int]:
    """``<|file_separator|>``, ``<eos>`` (and the usual stop tokens), plus the FIM markers."""
    return tokenizer.stop_ids() | frozenset(_fim_ids(tokenizer).values())


def stream_infill(model, tokenizer, prefix: str, suffix: str, max_tokens: int = 128, **sampling) -> Iterator[str]:
    """Yield the middle piece by piece (sampling keywords as for :func:`gemmakit.generate`)."""
    if tokenizer is None:
        raise TokenizerError("fill-in-the-middle needs the model's tokenizer")
    yield from stream(model, tokenizer, fim_prompt(tokenizer, prefix, suffix), max_tokens,
                      stop_ids=fim_stop_ids(tokenizer), **sampling)


def infill(model, tokenizer, prefix: str, suffix: str, max_tokens: int = 128, **sampling) -> str:
    """The code CodeGemma writes between ``prefix`` and ``suffix`` (without the stop token)."""
    return "".join(stream_infill(model, tokenizer, prefix, suffix, max_tokens, **sampling))
