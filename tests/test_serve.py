"""The OpenAI-compatible server, started for real on a loopback port with a tiny random GGUF model.

Clients are the official ``openai`` package (streaming and not) and raw ``httpx`` for error cases.
Expected texts come from gemmakit's plain generation path, not from the server itself.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from live_server import live_server  # noqa: E402
from tiny import random_model, tiny_config, write_gguf  # noqa: E402

import gemmakit  # noqa: E402
from gemmakit.chat import render_chat  # noqa: E402
from gemmakit.engine.scheduler import Engine  # noqa: E402
from gemmakit.serve.app import create_app  # noqa: E402

KEY = "sk-test-key"
MODEL = "tiny-gemma3"


def tiny_app(directory, **options):
    """``(app, model, tokenizer, engine)``: a tiny random Gemma 3 behind ``create_app(..., **options)``."""
    path = write_gguf(directory / f"{MODEL}.gguf", random_model(tiny_config("gemma3", max_position_embeddings=1024)))
    model, tokenizer = gemmakit.load(path)
    engine = Engine(model, tokenizer, max_batch=6, prefill_chunk=32)
    return create_app(engine, tokenizer, MODEL, api_key=KEY, **options), model, tokenizer, engine


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    app, model, tokenizer, engine = tiny_app(tmp_path_factory.mktemp("serve"))
    with live_server(app) as url:
        yield url, model, tokenizer, engine


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(url: str, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (str, bytes)) or hasattr(body, "__next__") else json.dumps(body)
    return httpx.post(url + path, content=content, headers=headers, timeout=60)


def expected(model, tokenizer, prompt, max_tokens: int) -> str:
    return gemmakit.generate(model, tokenizer, prompt, max_tokens=max_tokens)


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me a tale"}]


def test_chat_completion_matches_plain_generation(served, client):
    url, model, tokenizer, _ = served
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected(model, tokenizer, render_chat(MESSAGES), 12)
    prompt_len = len(tokenizer.encode(render_chat(MESSAGES), add_bos=True))
    assert reply.usage.prompt_tokens == prompt_len
    assert reply.usage.total_tokens == prompt_len + reply.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")


def test_streamed_chat_equals_unstreamed_and_reports_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_completion_with_logprobs(served, client):
    _, model, tokenizer, _ = served
    out = client.completions.create(model=MODEL, prompt="the cat", max_tokens=8, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.text == tokenizer.decode(_greedy_ids(model, tokenizer, "the cat", 8))
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == out.usage.completion_tokens == 8
    assert "".join(lp.tokens) == choice.text
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy picks the most likely token, and the top list is sorted
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob


def _greedy_ids(model, tokenizer, prompt: str, n: int) -> list[int]:
    result = None
    for _, result in gemmakit.api.stream_generation(model, tokenizer, prompt, n, stop_ids=frozenset()):
        pass
    return result.token_ids


def test_eight_concurrent_requests_each_equal_the_request_alone(served):
    url = served[0]
    prompts = [f"story number {i} is about {'abcdefgh'[i] * (i + 1)}" for i in range(8)]

    def ask(prompt: str) -> list:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                "logprobs": 0}
        return post(url, "/v1/completions", body).json()["choices"][0]["logprobs"]["tokens"]

    alone = [ask(p) for p in prompts]
    together: list = [None] * 8
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(prompts[i]))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone
    assert all(len(t) == 16 for t in alone)


def test_seed_n_and_stop_strings(served, client):
    a = client.completions.create(model=MODEL, prompt="once", max_tokens=12, temperature=1.0, seed=7, n=2,
                                  extra_body={"ignore_eos": True})
    b = client.completions.create(model=MODEL, prompt="once", max_tokens=12, temperature=1.0, seed=7, n=2,
                                  extra_body={"ignore_eos": True})
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len(a.choices) == 2 and a.usage.completion_tokens == 24
    full = client.completions.create(model=MODEL, prompt="once", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = client.completions.create(model=MODEL, prompt="once", max_tokens=30, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="once", max_tokens=30, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_prefix_cache_through_the_server(served, client):
    history = MESSAGES + [{"role": "assistant", "content": "once upon a time"}, {"role": "user", "content": "more"}]
    first = client.chat.completions.create(model=MODEL, messages=history, max_tokens=1, temperature=0)
    second = client.chat.completions.create(model=MODEL, messages=history + [
        {"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "again"}],
        max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


def test_errors_are_openai_shaped_400s_and_the_server_keeps_serving(served):
    url, _, _, _ = served
    cases = {
        "malformed": (b"{not json", "JSON"),
        "unknown model": ({"model": "gpt-9", "messages": MESSAGES}, "does not exist"),
        "negative max_tokens": ({"model": MODEL, "messages": MESSAGES, "max_tokens": -1}, "max_tokens"),
        "temperature": ({"model": MODEL, "messages": MESSAGES, "temperature": 3.5}, "temperature"),
        "too long": ({"model": MODEL, "messages": [{"role": "user", "content": "ab " * 2000}]}, "context"),
        "image": ({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, "does not accept images"),
        "no messages": ({"model": MODEL, "messages": []}, "messages"),
    }
    for name, (body, words) in cases.items():
        r = post(url, "/v1/chat/completions", body)
        assert r.status_code == 400, name
        err = r.json()["error"]
        assert words in err["message"] and err["type"] == "invalid_request_error", name
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_api_key_guards_every_route_but_health(served):
    url = served[0]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    r = httpx.get(url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert [m["id"] for m in r.json()["data"]] == [MODEL]
    assert post(url, "/tokenize", {"prompt": "hi"}, key="wrong").status_code == 401


def test_tokenize_detokenize_roundtrip(served):
    url, _, tokenizer, _ = served
    ids = post(url, "/tokenize", {"prompt": "the hat"}).json()["tokens"]
    assert ids == tokenizer.encode("the hat", add_bos=True)
    assert post(url, "/detokenize", {"tokens": ids[1:]}).json()["prompt"] == "the hat"
    assert post(url, "/detokenize", {"tokens": [10**9]}).status_code == 400


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_disconnect_mid_stream_frees_the_slot(served):
    url, _, _, engine = served
    cancelled = metric(url, "gemmakit_requests_cancelled_total")
    body = {"model": MODEL, "prompt": "go", "max_tokens": 1000, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", content=json.dumps(body),
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert metric(url, "gemmakit_running_sequences") == 1
    deadline = time.monotonic() + 30
    while metric(url, "gemmakit_running_sequences") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "gemmakit_running_sequences") == 0
    assert metric(url, "gemmakit_requests_cancelled_total") == cancelled + 1
    assert engine.stats.generated_tokens_total > 0 and metric(url, "gemmakit_queue_depth") == 0


def test_serve_command_rejects_bad_arguments_with_one_line(capsys, tmp_path):
    from gemmakit.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert main(["serve", "--port", "70000"]) == 2
    assert main(["serve", "--max-batch", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("gemmakit: error: ") for line in lines)
