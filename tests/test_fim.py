"""CodeGemma fill-in-the-middle on a tiny Gemma 1 model whose vocabulary has the FIM tokens.

To check stopping without trained weights: run greedy decoding once without stop tokens, then swap
the embedding rows of the token produced at step k and of the stop token. Everything before step k
is computed identically (neither token occurs earlier), and at step k the stop token now wins, so
infill must return exactly the text of steps 0..k-1.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import gemmakit
from gemmakit.engine.generate import generate_steps
from gemmakit.errors import TokenizerError
from gemmakit.fim import fim_prompt
from tiny import FIM_VOCAB_SIZE, random_model, tiny_config, write_gguf

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test

PREFIX, SUFFIX = "the heat was ", "in the west\n"


def _codegemma_like():
    """Random weights, projections scaled up so that greedy decoding does not just repeat the last token."""
    model = random_model(tiny_config("gemma", vocab_size=FIM_VOCAB_SIZE, num_kv_heads=1, num_layers=3), seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(6.0)
    return model


@pytest.fixture(scope="module")
def fim_model(tmp_path_factory):
    model = _codegemma_like()
    path = write_gguf(tmp_path_factory.mktemp("fim") / "codegemma.gguf", model, fim_tokens=True)
    return model, path


def _swapped_model(fim_model, tmp_path, stop_piece: str):
    """(path of a GGUF that stops at step k with ``stop_piece``, expected middle text)."""
    model, path = fim_model
    loaded, tokenizer = gemmakit.load(path)
    prompt = fim_prompt(tokenizer, PREFIX, SUFFIX)
    run = [s.tokens[0] for s in generate_steps(loaded, [prompt], 10)]
    stop = tokenizer.token_to_id(stop_piece)
    k = next(k for k in range(2, 10) if run[k] not in prompt + run[:k] and run[k] != stop)
    assert not set(run[:k]) & tokenizer.stop_ids() and stop not in prompt + run[:k]
    swapped = _codegemma_like()
    with torch.no_grad():
        swapped.embed.weight[[run[k], stop]] = swapped.embed.weight[[stop, run[k]]]
    out = write_gguf(tmp_path / f"swapped-{k}.gguf", swapped, fim_tokens=True)
    return out, tokenizer.decode(run[:k]), k


def test_prompt_matches_the_reference_tokenizer(fim_model, tmp_path):
    """transformers' tokenizer, given CodeGemma's documented prompt string, yields the same ids."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from gemmakit.convert import convert

    _, path = fim_model
    _, tokenizer = gemmakit.load(path)
    convert(path, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>"
    assert hf_tok(text)["input_ids"] == fim_prompt(tokenizer, PREFIX, SUFFIX)


@pytest.mark.parametrize("stop_piece", ["<|file_separator|>", "<eos>"])
def test_infill_stops_at_file_separator_or_eos(fim_model, tmp_path, stop_piece):
    path, expected, k = _swapped_model(fim_model, tmp_path, stop_piece)
    model, tokenizer = gemmakit.load(path)
    assert gemmakit.infill(model, tokenizer, PREFIX, SUFFIX, max_tokens=10) == expected
    # the stop really is what ended it: without stop tokens the run goes on past step k
    longer = [s.tokens[0] for s in generate_steps(model, [fim_prompt(tokenizer, PREFIX, SUFFIX)], 10)]
    assert len(longer) == 10 and longer[k] == tokenizer.token_to_id(stop_piece)


def test_cli_fim(fim_model, tmp_path):
    path, expected, _ = _swapped_model(fim_model, tmp_path, "<|file_separator|>")
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "generate", "--model", str(path),
                           "--fim-prefix", PREFIX, "--fim-suffix", SUFFIX, "-n", "10"], capture_output=True, text=True,
                          encoding="utf-8", env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_vocab_without_fim_tokens(tmp_path):
    path = write_gguf(tmp_path / "plain.gguf", random_model(tiny_config("gemma", num_layers=2)))
    model, tokenizer = gemmakit.load(path)
    with pytest.raises(TokenizerError, match="fim_prefix"):
        gemmakit.infill(model, tokenizer, "a", "b")
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "generate", "--model", str(path),
                           "--fim-prefix", "a", "--fim-suffix", "b"], capture_output=True, text=True)
    assert proc.returncode == 2 and "CodeGemma" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "generate", "--model", str(path),
                           "--fim-prefix", "a", "some prompt"], capture_output=True, text=True)
    assert proc.returncode == 2 and "not both" in proc.stderr
