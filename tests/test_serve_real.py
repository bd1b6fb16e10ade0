"""Smoke test: the real default model (Gemma 3 270M) behind the server, called with the openai client."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from live_server import live_server  # noqa: E402

import gemmakit  # noqa: E402
from gemmakit.chat import render_chat  # noqa: E402
from gemmakit.engine.scheduler import Engine  # noqa: E402
from gemmakit.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test


def test_real_model_through_the_server(real_model, golden):
    model, tokenizer = real_model
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    cases = golden["cases"][:3]
    engine = Engine(model, tokenizer, max_batch=2, max_seq_len=256)
    with live_server(create_app(engine, tokenizer, "gemma-3-270m")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="gemma-3-270m", messages=messages, max_tokens=16,
                                               temperature=0)
        streamed = client.chat.completions.create(model="gemma-3-270m", messages=messages, max_tokens=16,
                                                  temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        # three golden prompts at once (batched): each continues exactly as the reference did
        import threading

        got = [None] * len(cases)

        def ask(i: int) -> None:
            got[i] = client.completions.create(model="gemma-3-270m", prompt=cases[i]["prompt_ids"], max_tokens=12,
                                               temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    for case, out in zip(cases, got):
        assert out == tokenizer.decode(case["greedy_ids"][:12]), case["prompt"]
    want = gemmakit.generate(model, tokenizer, render_chat(messages), max_tokens=16)
    assert reply.choices[0].message.content == want == text
    assert reply.usage.prompt_tokens == len(tokenizer.encode(render_chat(messages), add_bos=True))
