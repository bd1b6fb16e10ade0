"""`gemmakit serve --draft-model`: greedy requests go through speculative decoding, same tokens.

The target is a tiny random Gemma 3; the draft a different random model of the same vocabulary
(so drafts are mostly rejected and the rollback path is exercised) and, as a second server, the
target itself (so drafts are always accepted). A real uvicorn server with the official client.
"""

from __future__ import annotations

import openai
import pytest

import gemmakit
from gemmakit.serve import build_app
from live_server import live_server
from tiny import random_model, tiny_config, write_gguf

MESSAGES = [{"role": "user", "content": "tell me a tale"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    config = tiny_config("gemma3", max_position_embeddings=512)
    target, tokenizer = gemmakit.load(write_gguf(d / "target.gguf", random_model(config, seed=1)))
    draft, _ = gemmakit.load(write_gguf(d / "draft.gguf", random_model(tiny_config("gemma3", num_layers=2), seed=2)))
    return target, draft, tokenizer


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_greedy_requests_equal_the_server_without_a_draft(models):
    target, draft, tokenizer = models
    plain = build_app(target, tokenizer, "m", max_batch=2)
    with live_server(plain) as url:
        c = _client(url)
        want_chat = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=24, temperature=0)
        want_text = c.completions.create(model="m", prompt="Once upon", max_tokens=20, temperature=0, stop=["zz"])
    for drafter in (draft, target):  # rejections and rollbacks / every draft accepted
        app = build_app(target, tokenizer, "m", max_batch=2, draft=drafter, draft_tokens=3)
        with live_server(app) as url:
            c = _client(url)
            chat = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=24, temperature=0)
            assert chat.choices[0].message.content == want_chat.choices[0].message.content
            assert chat.choices[0].finish_reason == want_chat.choices[0].finish_reason
            assert chat.usage.completion_tokens == want_chat.usage.completion_tokens
            text = c.completions.create(model="m", prompt="Once upon", max_tokens=20, temperature=0, stop=["zz"])
            assert text.choices[0].text == want_text.choices[0].text
            pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model="m", messages=MESSAGES, max_tokens=24, temperature=0, stream=True)]
            assert "".join(pieces) == want_chat.choices[0].message.content
            # sampling still goes to the batching engine and works
            sampled = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0.8, seed=3)
            assert sampled.usage.completion_tokens > 0
            import httpx

            metrics = httpx.get(url + "/metrics").text
            rounds = next(float(line.split()[-1]) for line in metrics.splitlines()
                          if line.startswith("gemmakit_speculative_rounds_total"))
            assert rounds > 0


def test_draft_with_another_vocabulary_is_refused(models, tmp_path):
    target, _, tokenizer = models
    other, _ = gemmakit.load(write_gguf(tmp_path / "other.gguf",
                                        random_model(tiny_config("gemma3", vocab_size=300), seed=3),
                                        with_tokenizer=False))
    with pytest.raises(gemmakit.errors.InvalidRequestError, match="vocabulary"):
        build_app(target, tokenizer, "m", draft=other)
