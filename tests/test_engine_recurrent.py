"""RecurrentGemma through the continuous-batching engine, against the plain generation loop.

Griffin layers keep a per-row recurrent and Conv1D state instead of keys and values. The engine
left-pads chunks of different lengths into one forward pass, and rows that have nothing to do in
a step ride along as pure padding, so a padding step must leave a row's state exactly as it was.
A state cannot be cut back to a prefix either: a cached row is reused only when the new prompt
continues exactly what it read. The model is a tiny random one built from transformers'
RecurrentGemmaConfig (attention window 8, shorter than most prompts).
"""

from __future__ import annotations

import pytest
import torch
from tiny import VOCAB_SIZE, random_model

from gemmakit.checkpoints.safetensors import config_from_hf
from gemmakit.engine.generate import generate_steps
from gemmakit.engine.scheduler import Engine, Request

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention

transformers = pytest.importorskip("transformers")

PROMPT_LENGTHS = (3, 12, 20, 5, 30, 1, 9, 17)


@pytest.fixture(scope="module")
def model():
    from transformers import RecurrentGemmaConfig

    hf = RecurrentGemmaConfig(vocab_size=VOCAB_SIZE, hidden_size=80, intermediate_size=192, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=1, lru_width=48, attention_window_size=8,
                              conv1d_width=4, logits_soft_cap=30.0)
    config = config_from_hf(hf.to_dict()).replace(max_position_embeddings=128)
    assert "recurrent" in config.layer_kinds and "local" in config.layer_kinds
    model = random_model(config)
    # Slow decays (a ~ 0.97-0.99, as trained models have) and a strong recurrent branch: with the
    # defaults of random_model a lost or corrupted state would hardly change the greedy tokens.
    with torch.no_grad():
        for layer in model.layers:
            if layer.kind == "recurrent":
                layer.recurrent.rg_lru.a_param.uniform_(-6.0, -3.0)
                for linear in (layer.recurrent.linear_x, layer.recurrent.linear_y, layer.recurrent.linear_out):
                    linear.weight.normal_(0.0, 0.3)
    return model


def reference(model, prompt: list[int], max_new: int) -> list[int]:
    return [step.tokens[0] for step in generate_steps(model, [prompt], max_new)]


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(10, 250, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@torch.inference_mode()
def test_padding_leaves_a_continuing_state_unchanged(model):
    """A second chunk left-padded by 3 (and a row that is all padding) gives the unpadded logits."""
    ids = torch.tensor([prompts()[4][:20]] * 2)  # [2, 20]
    plain = model.new_cache(2, 32)
    model(ids[:, :12], cache=plain)
    want = model(ids[:, 12:], cache=plain)[0]
    padded = model.new_cache(2, 32)
    model(ids[:, :12], cache=padded)
    tail = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids[:, 12:]], dim=1)  # [2, 11]
    positions = torch.cat([torch.full((2, 3), -1), torch.arange(12, 20).expand(2, 8)], dim=1)
    positions[1] = -1  # row 1 only pads: its state must not move
    state = [(s.rg_lru.clone(), s.conv.clone()) for s in padded.layers if hasattr(s, "rg_lru")]
    got = model(tail, cache=padded, positions=positions)[0, 3:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for (h, conv), s in zip(state, [s for s in padded.layers if hasattr(s, "rg_lru")]):
        assert torch.equal(s.rg_lru[1], h[1]) and torch.equal(s.conv[1], conv[1])


def test_batched_engine_equals_one_request_alone(model):
    """8 requests on 3 rows (5 queue), prompts prefilled in chunks of 7: each equals its solo run."""
    engine = Engine(model, max_batch=3, prefill_chunk=7)
    try:
        got = engine.generate([Request(tuple(p), max_tokens=10, stop_ids=frozenset()) for p in prompts()])
    finally:
        engine.shutdown()
    for p, out in zip(prompts(), got):
        assert out[0] == reference(model, p, 10)
    assert engine.stats.requests_finished == 8 and engine.running == 0


def test_chat_follow_up_continues_the_state_and_other_prompts_recompute(model):
    """Old prompt + old answer + new turn reuses the row; a prompt that diverges recomputes all."""
    engine = Engine(model, max_batch=2, prefill_chunk=16)
    first = prompts()[4]
    try:
        answer = engine.generate([Request(tuple(first), max_tokens=12, stop_ids=frozenset())])[0][0]
        # Differs only in the last token the row read: the local ring still holds everything the
        # shared part needs, but the recurrent state has read the differing token and cannot drop it.
        held = first + answer[:11]
        other = held[:-1] + [held[-1] % 200 + 20, 78, 79]
        before = engine.stats.prefilled_tokens_total
        diverged = engine.generate([Request(tuple(other), max_tokens=6, stop_ids=frozenset())])[0][0]
        computed_other = engine.stats.prefilled_tokens_total - before
        follow_up = first + answer + [40, 41, 42]  # the first row is still free and untouched
        before = engine.stats.prefilled_tokens_total
        again = engine.generate([Request(tuple(follow_up), max_tokens=10, stop_ids=frozenset())])[0][0]
        computed = engine.stats.prefilled_tokens_total - before
        before = engine.stats.prefilled_tokens_total
        twice = engine.generate([Request(tuple(follow_up), max_tokens=10, stop_ids=frozenset())])[0][0]
        computed_twice = engine.stats.prefilled_tokens_total - before
    finally:
        engine.shutdown()
    assert computed_other == len(other)
    assert diverged == reference(model, other, 6)
    assert again == reference(model, follow_up, 10) == twice
    assert computed == 4  # the row held prompt + 11 fed answer tokens: the 12th and the new turn remain
    # The same prompt again: the row moved on past it while answering, so it is all recomputed.
    assert computed_twice == len(follow_up)


def test_server_smoke_with_a_recurrent_model(model, tmp_path):
    """The OpenAI-compatible server on RecurrentGemma: a chat reply and concurrent completions
    equal gemmakit's plain generation of each prompt alone."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    import threading

    from live_server import live_server
    from tiny import tiny_config, write_gguf

    import gemmakit
    from gemmakit.chat import render_chat
    from gemmakit.serve.app import create_app

    tokenizer = gemmakit.load(write_gguf(tmp_path / "t.gguf", random_model(tiny_config("gemma"))))[1]
    messages = [{"role": "user", "content": "tell me a tale"}]
    want_chat = gemmakit.generate(model, tokenizer, render_chat(messages), max_tokens=8)
    prompts_text = [f"story {i} about {'abc'[i] * (3 * i + 1)}" for i in range(3)]
    want = []
    for text in prompts_text:
        result = None
        for _, result in gemmakit.api.stream_generation(model, tokenizer, text, 8, stop_ids=frozenset()):
            pass
        want.append(tokenizer.decode(result.token_ids))

    engine = Engine(model, tokenizer, max_batch=2, prefill_chunk=5)
    with live_server(create_app(engine, tokenizer, "tiny-recurrentgemma")) as url:
        reply = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny-recurrentgemma", "messages": messages, "max_tokens": 8, "temperature": 0}).json()
        got: list = [None] * 3

        def ask(i: int) -> None:
            body = {"model": "tiny-recurrentgemma", "prompt": prompts_text[i], "max_tokens": 8, "temperature": 0,
                    "ignore_eos": True}
            got[i] = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert reply["choices"][0]["message"]["content"] == want_chat
    assert got == want
