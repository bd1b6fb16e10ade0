"""Tiny models, tokenizers and data files for the training tests (real code paths, random weights)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import gemmakit
from tiny import random_model, tiny_config, write_gguf


def tiny_gguf(tmp_path: Path, name: str = "tiny.gguf", seed: int = 0, **overrides) -> Path:
    """A random tiny Gemma 3 written as GGUF with the tiny tokenizer, as a user's model file would be."""
    cfg = tiny_config("gemma3", num_layers=overrides.pop("num_layers", 2), **overrides)
    return write_gguf(tmp_path / name, random_model(cfg, seed=seed))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def synthetic_task(n: int = 40, seed: int = 0) -> list[dict]:
    """A learnable task: sentences made of a handful of repeated words."""
    g = torch.Generator().manual_seed(seed)
    words = ["the cat sat", "a hat", "this is it", "we win", "he sat in the hat"]
    return [{"text": " ".join(words[i] for i in torch.randint(0, len(words), (4,), generator=g).tolist())}
            for _ in range(n)]


def load(path):
    return gemmakit.load(path)
