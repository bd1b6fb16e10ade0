"""Training data: JSONL examples -> token ids with a loss mask -> packed fixed-length blocks.

Each line of the file is one example, either ``{"text": "..."}`` (every token is a target) or
``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered with Gemma's chat template, where
only the model turns (their text and closing ``<end_of_turn>``) are targets: the model should learn
to answer, not to write the user's questions.

Examples are packed end to end into blocks of ``seq_len + 1`` tokens (inputs are the first
``seq_len``, targets the last ``seq_len``), so short examples do not waste compute on padding. A
held-out split is taken by *example* before packing, so no evaluation text leaks into training.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gemmakit.chat import render_chat
from gemmakit.errors import GemmakitError, InvalidRequestError


@dataclass(frozen=True)
class Example:
    ids: list[int]
    targets: list[bool]  # targets[i]: token i is predicted with loss (the first token never is)


@dataclass
class Blocks:
    """Packed examples: ``ids [N, seq_len + 1]`` and ``mask [N, seq_len + 1]`` (True = scored target)."""

    ids: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def target_tokens(self) -> int:
        return int(self.mask[:, 1:].sum())


def read_jsonl(path: str | Path, tokenizer, skip_bad: bool = False,
               warn: Callable[[str], None] | None = None) -> list[Example]:
    """Tokenise every line of a JSONL file; a malformed line is fatal unless ``skip_bad``.

    Errors name ``file:line`` so the user can fix the data; skipped lines are reported to ``warn``
    (stderr by default) with the same prefix.
    """
    path = Path(path)
    warn = warn or (lambda msg: print(f"gemmakit: warning: {msg}", file=sys.stderr))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InvalidRequestError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read data file {path}: {exc}") from None
    examples: list[Example] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            examples.append(parse_example(line, tokenizer))
        except (ValueError, GemmakitError) as exc:
            message = f"{path}:{number}: {exc}"
            if not skip_bad:
                raise InvalidRequestError(message + " (use --skip-bad-lines to skip such lines)") from None
            warn(message + " (skipped)")
    if not examples:
        raise InvalidRequestError(f"{path}: no usable examples (the file is empty or every line was skipped)")
    return examples


def parse_example(line: str, tokenizer) -> Example:
    """One JSONL line -> :class:`Example`; raises ValueError with a short reason."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError('expected an object with "text" or "messages"')
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise ValueError('"text" must be a non-empty string')
        ids = [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
        return Example(ids, [False] + [True] * (len(ids) - 1))
    if "messages" in record:
        return _chat_example(record["messages"], tokenizer)
    raise ValueError('expected a "text" or a "messages" key')


def _chat_example(messages, tokenizer) -> Example:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError('"messages" must be a list of {"role", "content"} objects')
    model_turns = [k for k, m in enumerate(messages) if m.get("role") in ("assistant", "model")]
    if not model_turns:
        raise ValueError("the chat has no assistant turn to learn from")
    if model_turns[0] == 0 or (model_turns[0] == 1 and messages[0].get("role") == "system"):
        raise ValueError("the chat must start with a user turn")
    full = render_chat(messages, add_generation_prompt=False, tokenizer=tokenizer)
    # Character spans of the model turns: what the template adds for turn k, after the
    # "<start_of_turn>model\n" header that the prompt for turn k already ends with.
    spans: list[tuple[int, int]] = []
    for k in model_turns:
        before = render_chat(messages[:k], add_generation_prompt=True, tokenizer=tokenizer)
        after = render_chat(messages[:k + 1], add_generation_prompt=False, tokenizer=tokenizer)
        if not (full.startswith(before) and full.startswith(after)):
            raise ValueError(f"message {k} cannot be rendered incrementally")
        spans.append((len(before), len(after)))
    ids, targets = [tokenizer.bos_id], [False]
    cursor = 0
    for start, end in spans:
        for text, scored in ((full[cursor:start], False), (full[start:end], True)):
            piece = tokenizer.encode(text) if text else []
            ids += piece
            targets += [scored] * len(piece)
        cursor = end
    return Example(ids, targets)


def split_heldout(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministically move ``fraction`` of the examples (at least one, if two or more) to a held-out set."""
    n = len(examples)
    n_eval = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, math.ceil(n * fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    heldout = [e for i, e in enumerate(examples) if i in held]
    return train, heldout


def pack(examples: Sequence[Example], seq_len: int, pad_id: int) -> Blocks:
    """Concatenate examples and cut them into blocks of ``seq_len + 1`` tokens; the tail is padded.

    Examples sharing a block attend to each other (no document mask): the cost of that is small
    next to the padding packing saves, and every example starts with <bos> as a boundary marker.
    """
    if seq_len < 2:
        raise InvalidRequestError("--seq-len must be at least 2")
    ids: list[int] = []
    mask: list[bool] = []
    for e in examples:
        ids += e.ids
        mask += e.targets
    width = seq_len + 1
    n_blocks = max(1, math.ceil(len(ids) / width))
    pad = n_blocks * width - len(ids)
    ids += [pad_id] * pad
    mask += [False] * pad
    return Blocks(torch.tensor(ids, dtype=torch.long).view(n_blocks, width),
                  torch.tensor(mask, dtype=torch.bool).view(n_blocks, width))


def load_blocks(path: str | Path, tokenizer, seq_len: int, heldout: float = 0.1, seed: int = 0,
                skip_bad: bool = False) -> tuple[Blocks, Blocks | None]:
    """The whole data pipeline: read, split by example, pack each side. Returns (train, held-out or None)."""
    examples = read_jsonl(path, tokenizer, skip_bad=skip_bad)
    train, held = split_heldout(examples, heldout, seed)
    train_blocks = pack(train, seq_len, tokenizer.pad_id)
    if train_blocks.target_tokens == 0:
        raise InvalidRequestError(f"{path}: the training split has no target tokens")
    return train_blocks, (pack(held, seq_len, tokenizer.pad_id) if held else None)


def epoch_order(n_blocks: int, epoch: int, seed: int) -> list[int]:
    """The block order of one epoch: a pure function of (seed, epoch), so a resumed run sees the same data."""
    return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
