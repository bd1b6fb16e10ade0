"""Speculative decoding returns exactly the target's greedy tokens, whatever the draft proposes."""

from __future__ import annotations

import pytest

from gemmakit.engine.generate import generate_steps
from gemmakit.engine.speculative import speculative_greedy
from gemmakit.errors import InvalidRequestError
from tiny import random_model, tiny_config

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test


def plain_greedy(model, prompt, n):
    return [s.tokens[0] for s in generate_steps(model, [prompt], n) if s.tokens[0] is not None]


@pytest.fixture(scope="module")
def models():
    # sliding_window 8 with 40 new tokens: the rings wrap many times, so rollback is exercised
    target = random_model(tiny_config("gemma3", num_layers=4), seed=3).eval()
    draft = random_model(tiny_config("gemma3", num_layers=2, hidden_size=32, intermediate_size=48), seed=4).eval()
    return target, draft


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_equals_target_greedy_with_a_different_draft(models, k):
    target, draft = models
    prompt = [2, 40, 41, 42, 290, 17, 9]
    expected = plain_greedy(target, prompt, 40)
    got, stats = speculative_greedy(target, draft, prompt, 40, k=k)
    assert got == expected
    assert stats["rounds"] > 0


def test_draft_equal_to_target_accepts_everything(models):
    target, _ = models
    prompt = [2, 50, 51, 52]
    got, stats = speculative_greedy(target, target, prompt, 31, k=4)
    assert got == plain_greedy(target, prompt, 31)
    assert stats["accepted"] == 4 * stats["rounds"]  # every proposal is the target's own choice
    assert stats["rounds"] == 6  # 1 token from prefill + 6 rounds x 5 tokens = 31


def test_stop_token_ends_generation(models):
    target, draft = models
    prompt = [2, 40, 41]
    expected = plain_greedy(target, prompt, 20)
    stop = expected[5]
    got, _ = speculative_greedy(target, draft, prompt, 20, k=3, stop_ids=frozenset({stop}))
    assert got == expected[:expected.index(stop) + 1]


def test_vocabulary_mismatch_is_a_typed_error(models):
    target, _ = models
    other = random_model(tiny_config("gemma3", num_layers=1, vocab_size=400))
    with pytest.raises(InvalidRequestError):
        speculative_greedy(target, other, [2, 3], 5)


def test_cli_draft_keeps_its_blocks_for_a_float_target(tmp_path):
    """``generate --quant none --draft-model F`` with a quantised GGUF F: the target is F expanded to
    float32, the draft F's own blocks (its default), and the tokens are the float32 target's alone."""
    import json
    import os
    import subprocess
    import sys

    from tiny import write_gguf

    path = write_gguf(tmp_path / "q8.gguf", random_model(tiny_config("gemma3", num_layers=3), seed=5), quant="Q8_0")

    def generate(*extra: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "gemmakit.cli", "generate", "-m", str(path), "--quant", "none",
                              "--json", "-n", "24", *extra, "the"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONIOENCODING": "utf-8"})
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    alone, speculative = generate(), generate("--draft-model", str(path), "--draft-tokens", "3")
    assert alone["stats"]["weights"] == "float32"
    assert speculative["speculative"]["draft_weights"] == "gguf"
    assert speculative["token_ids"] == alone["token_ids"]
    assert speculative["speculative"]["tokens_per_s"] > 0
