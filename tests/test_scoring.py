"""Prompt scoring: ``echo`` + ``logprobs`` (+ ``max_tokens: 0``) on /v1/completions returns each
prompt token's logprob (the first null), as lm-eval's ``local-completions`` loglikelihood asks.

The engine's scores are checked against a plain forward pass over the whole prompt, for a
prompt longer than one scoring chunk, beside a free request in the same batch.
"""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from live_server import live_server  # noqa: E402
from test_serve import KEY, MODEL, post, tiny_app  # noqa: E402
from test_serve_errors import error_of  # noqa: E402

from gemmakit.engine.scheduler import SCORE_CHUNK, Request  # noqa: E402

pytestmark = pytest.mark.slow  # CLI subprocesses, the real model, servers, compiling or training: seconds a test


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    app, model, tokenizer, engine = tiny_app(tmp_path_factory.mktemp("scoring"))
    with live_server(app) as url:
        yield url, model, tokenizer, engine


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def reference(model, ids: list[int]) -> tuple[list[float], list[int]]:
    """Each token's logprob after the ones before it, and the argmax at each position, from one forward pass."""
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)  # [T, V]
    return [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))], logp[:-1].argmax(-1).tolist()


def test_the_engine_scores_a_long_prompt_beside_a_free_request(served):
    _, model, tokenizer, engine = served
    text = "the thin hat sat in the water with the white whale " * 8
    ids = tokenizer.encode(text, add_bos=True)
    assert len(ids) > 2 * SCORE_CHUNK  # several scoring chunks
    want, best = reference(model, ids)
    free = Request(tuple(tokenizer.encode("a hat", add_bos=True)), max_tokens=20, stop_ids=frozenset())
    alone = engine.generate([free])[0]
    handles = []
    submit = engine.submit

    def keep(request, on_event):
        handle = submit(request, on_event)
        handles.append(handle)
        return handle

    engine.submit = keep
    try:
        out = engine.generate([Request(tuple(ids), max_tokens=0, prompt_logprobs=2), free,
                               Request(tuple(ids), max_tokens=3, prompt_logprobs=0, stop_ids=frozenset())])
    finally:
        del engine.submit
    assert out[1] == alone and out[0] == [[]] and len(out[2][0]) == 3
    for handle in (handles[0], handles[2]):
        scores = handle.prompt_scores
        assert [t for t, _, _ in scores] == ids and scores[0][1] is None and scores[0][2] is None
        assert [lp for _, lp, _ in scores[1:]] == pytest.approx(want, abs=2e-4)
        assert handle.cached_tokens == 0  # the prompt was computed whole, though a row held it
    top = [t for _, _, t in handles[0].prompt_scores[1:]]
    assert all(len(t) == 2 and t[0][1] >= t[1][1] for t in top)
    assert [t[0][0] for t in top] == best


def test_echo_logprobs_and_max_tokens_zero(served, client):
    _, model, tokenizer, _ = served
    prompt = "the white whale sat"
    ids = tokenizer.encode(prompt, add_bos=True)
    want, best = reference(model, ids)
    out = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0, temperature=0)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text == prompt and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    assert lp.tokens == [tokenizer.decode([i]) for i in ids] and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=2e-4)
    assert lp.top_logprobs[0] is None and all(len(t) == 1 for t in lp.top_logprobs[1:])
    assert [max(t, key=t.get) for t in lp.top_logprobs[1:]] == [tokenizer.decode([b]) for b in best]
    assert lp.text_offset[:2] == [0, 0] and lp.text_offset[-1] == len(prompt) - len(lp.tokens[-1])
    # what lm-eval's local-completions computes from it: the continuation's summed logprob
    context = len(tokenizer.encode("the white", add_bos=True))
    assert sum(lp.token_logprobs[context:]) == pytest.approx(sum(want[context - 1:]), abs=1e-3)

    # with tokens to generate: the prompt's entries first, then the completion's
    more = client.completions.create(model=MODEL, prompt=ids[1:], echo=True, logprobs=0, max_tokens=4,
                                     temperature=0, extra_body={"ignore_eos": True}).choices[0]
    assert more.text.startswith(tokenizer.decode(ids[1:])) and len(more.logprobs.tokens) == len(ids) - 1 + 4
    assert more.logprobs.token_logprobs[0] is None
    plain = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=2, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0]
    assert plain.text.startswith(prompt) and plain.logprobs is None
    empty = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0).choices[0]
    assert empty.text == "" and empty.finish_reason == "length"


def test_scoring_requests_run_concurrently(served, client):
    _, model, tokenizer, _ = served
    prompts = [f"the {w} hat sat in the water" for w in ("thin", "white", "wet", "tin")]
    got: dict[int, list] = {}

    def ask(i: int) -> None:
        got[i] = client.completions.create(model=MODEL, prompt=prompts[i], echo=True, logprobs=0,
                                           max_tokens=0).choices[0].logprobs.token_logprobs

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, p in enumerate(prompts):
        assert got[i][1:] == pytest.approx(reference(model, tokenizer.encode(p, add_bos=True))[0], abs=2e-4)


def test_tokenizer_info(served):
    """vLLM's route, which lm-eval's remote tokenizer reads before it tokenises through /tokenize."""
    url, _, tokenizer, _ = served
    import httpx

    info = httpx.get(url + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["eos_token"] == "<eos>" and info["bos_token"] == "<bos>" and info["pad_token"] == "<pad>"
    ids = post(url, "/tokenize", {"prompt": info["bos_token"], "add_special_tokens": False}).json()["tokens"]
    assert ids == [tokenizer.bos_id]


def test_echo_errors(served):
    url = served[0]
    err = error_of(post(url, "/v1/completions", {"prompt": "x", "echo": True, "stream": True}), 400)
    assert err["param"] == "echo"
    assert error_of(post(url, "/v1/completions", {"prompt": "x", "max_tokens": -1}), 400)["param"] == "max_tokens"
    assert error_of(post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 0}), 400)["param"] == "max_tokens"
    err = error_of(post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                      "echo": True}), 400)
    assert err["code"] == "unsupported_field"


def test_real_model_scores_equal_a_forward_pass(real_model):
    """The real 270M through the server: echo + logprobs + max_tokens 0 gives each prompt token's
    logprob as one plain forward pass over the prompt does."""
    from gemmakit.engine.scheduler import Engine
    from gemmakit.serve.app import create_app

    model, tokenizer = real_model
    prompt = "The capital of France is Paris, and the capital of Italy is Rome."
    want, best = reference(model, tokenizer.encode(prompt, add_bos=True))
    engine = Engine(model, tokenizer, max_batch=2, max_seq_len=256)
    with live_server(create_app(engine, tokenizer, "gemma-3-270m")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        out = client.completions.create(model="gemma-3-270m", prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == prompt and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-3)
    assert [max(t, key=t.get) for t in lp.top_logprobs[1:]] == [tokenizer.decode([b]) for b in best]
