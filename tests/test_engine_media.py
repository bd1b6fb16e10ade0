"""Images and audio inside the continuous-batching engine.

Requests carry their prompt's embeddings (the towers run once, before submit); the engine splices
them into prefill chunks beside text requests, never splitting a run of soft tokens that attend
both ways, and its prefix cache tells images apart by their digest. Each batched request must
give the tokens that the one-request-at-a-time generation (``stream_generation``) gives for it.
Tiny random-weight Gemma 3, PaliGemma and Gemma 4 (vision and audio) models saved by transformers.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from test_gemma4_media import pair  # noqa: F401 (a fixture: the tiny Gemma 4 with vision and audio)
from test_vision import SOFT, _hf_model, _sharpen, _tokenizer, picture

import gemmakit
from gemmakit.api import stream_generation
from gemmakit.chat import render_chat
from gemmakit.engine.sampling import SamplingParams
from gemmakit.engine.scheduler import Engine, Request
from gemmakit.vision.generate import prepare_vision

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["gemma3", "gemma3-wide", "paligemma"])
def vlm(request, tmp_path_factory):
    torch.manual_seed(0)
    # "gemma3-wide": a sliding window (64) that holds whole prompts, so that rows keep reusable prefixes
    hf = (_hf_model("gemma3", num_hidden_layers=4, sliding_window=64) if request.param == "gemma3-wide"
          else _hf_model(request.param)).eval()
    _sharpen(hf)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    model, tokenizer = gemmakit.load(path)
    return request.param, model, tokenizer


def _one_at_a_time(model, tokenizer, prompt, images=None, audio=None, max_tokens=6, **sampling) -> list[int]:
    result = None
    for _, result in stream_generation(model, tokenizer, prompt, max_tokens=max_tokens, images=images, audio=audio,
                                       stop_ids=frozenset(), **sampling):
        pass
    return result.token_ids


def _request(model, tokenizer, prompt, images=None, audio=None, max_tokens=6, **params) -> Request:
    """What the server submits: the prompt's ids and, with media, their embeddings."""
    if images or audio:
        bound, ids, _ = prepare_vision(model, tokenizer, prompt, images, False, audio)
        media = bound.prompt_media(ids)
    else:
        ids, media = tokenizer.encode(prompt, add_bos=True), None
    return Request(prompt_ids=tuple(ids), max_tokens=max_tokens, stop_ids=frozenset(), media=media,
                   params=SamplingParams(**params))


def batched(model, tokenizer, requests: list[Request], chunk: int = 256, max_batch: int = 3) -> list[list[int]]:
    """Each request's tokens (its first choice), all run together through one engine."""
    engine = Engine(model, tokenizer, max_batch=max_batch, prefill_chunk=chunk)
    try:
        return [g[0] for g in engine.generate(requests)]
    finally:
        engine.shutdown()


def _cases(kind: str) -> list[tuple[str, list | None, dict]]:
    """(prompt, images, sampling) of requests mixing images and text, greedy and sampled."""
    def chat(k: int, images: int) -> str:
        content = [{"type": "image"}] * images if kind != "paligemma" else []
        return render_chat([{"role": "user", "content": content + [{"type": "text", "text": f"what is {k} here"}]}])

    if kind == "paligemma":  # one image a prompt, before it
        return [(chat(k, 0), [picture(k)], s) for k, s in
                enumerate([{}, {}, {"temperature": 1.0, "seed": 5}, {}])]
    return [(chat(0, 1), [picture(0)], {}), (chat(1, 2), [picture(1), picture(2)], {}), (chat(2, 0), None, {}),
            (chat(3, 1), [picture(3)], {"temperature": 1.0, "seed": 5}), (chat(4, 1), [picture(0)], {})]


@pytest.mark.parametrize("chunk", [256, 3])
def test_batched_media_requests_equal_one_at_a_time(vlm, chunk):
    kind, model, tokenizer = vlm
    cases = _cases(kind)
    expected = [_one_at_a_time(model, tokenizer, p, images, **s) for p, images, s in cases]
    if kind != "paligemma":  # the image matters: the same question about another picture differs
        assert expected[0] != _one_at_a_time(model, tokenizer, cases[0][0], [picture(5)])
    requests = [_request(model, tokenizer, p, images, **s) for p, images, s in cases]
    # (chunks of 3 cut inside every image but for the rule); the second round meets rows holding the first's prompts
    assert batched(model, tokenizer, requests + requests, chunk) == expected + expected


def _first_step_logprobs(engine: Engine, request: Request) -> dict[int, float]:
    """The top logprobs of ``request``'s first generated token, through ``engine``."""
    events = []
    done = threading.Event()

    def on_event(ev):
        events.append(ev)
        if ev.finish_reason is not None:
            done.set()

    engine.start()
    engine.submit(request, on_event)
    assert done.wait(120)
    return dict(events[0].top_logprobs)


def test_prefill_chunks_keep_each_image_whole(vlm):
    """Chunks of 3 tokens would cut every image's run of soft tokens; the engine ends each chunk
    before or after the run, so the first step's logprobs equal those of the prompt read whole
    (tokens alone are too coarse to show a cut run: its logits move, its argmax may not)."""
    kind, model, tokenizer = vlm
    prompt, images, _ = _cases(kind)[1 if kind != "paligemma" else 0]
    request = _request(model, tokenizer, prompt, images, max_tokens=1)
    request = dataclasses.replace(request, logprobs=5)
    got = {}
    for chunk in (256, 3):
        engine = Engine(model, tokenizer, max_batch=2, prefill_chunk=chunk)
        try:
            got[chunk] = _first_step_logprobs(engine, request)
        finally:
            engine.shutdown()
    assert got[3].keys() == got[256].keys()
    for token, logprob in got[256].items():
        assert abs(got[3][token] - logprob) < 1e-4, (token, got[3][token], logprob)


def test_prefix_cache_tells_images_apart(vlm):
    kind, model, tokenizer = vlm
    if kind != "gemma3-wide":
        pytest.skip("a sliding window shorter than the prompt keeps no reusable prefix")
    question = render_chat([{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image"},
                                                         {"type": "text", "text": "what is here"}]}])
    a = _request(model, tokenizer, question, [picture(1)])
    b = _request(model, tokenizer, question, [picture(2)])
    first_soft = a.prompt_ids.index(SOFT)
    assert a.prompt_ids == b.prompt_ids  # the same ids: only the media tell them apart
    engine = Engine(model, tokenizer, max_batch=1)
    try:
        cached = []
        for request in (a, b, b):
            before = engine.stats.cached_tokens_total
            got = engine.generate([request])[0][0]
            cached.append(engine.stats.cached_tokens_total - before)
            image = picture(1) if request is a else picture(2)
            assert got == _one_at_a_time(model, tokenizer, question, [image])
    finally:
        engine.shutdown()
    assert cached[0] == 0
    assert 0 < cached[1] <= first_soft  # the text before the image, not the other image's keys
    assert cached[2] == len(b.prompt_ids) - 1  # all but the last prompt token, the image included


def test_a_sampled_placeholder_is_read_as_text(vlm):
    """A generated image placeholder id has no image behind it: it is embedded as the token it is,
    in the engine and in the one-at-a-time path alike, instead of failing the request."""
    kind, model, tokenizer = vlm
    prompt, images, _ = _cases(kind)[0]
    placeholder = model.config.image_token_id
    request = _request(model, tokenizer, prompt, images, logit_bias=((placeholder, 100.0),))
    engine = Engine(model, tokenizer, max_batch=2)
    try:
        got = engine.generate([request])[0][0]
    finally:
        engine.shutdown()
    assert got == [placeholder] * 6
    bound, ids, _ = prepare_vision(model, tokenizer, prompt, images)
    cache = bound.new_cache(1, len(ids) + 4)
    bound(torch.tensor([ids]), cache=cache, last_only=True)
    step = bound(torch.tensor([[placeholder]]), cache=cache, last_only=True)  # raised before: no pixel values
    assert torch.isfinite(step).all()


def test_media_need_a_media_model(vlm):
    from gemmakit.errors import InvalidRequestError

    kind, model, tokenizer = vlm
    prompt, images, _ = _cases(kind)[0]
    request = _request(model, tokenizer, prompt, images)
    engine = Engine(model.decoder, tokenizer, max_batch=1)
    with pytest.raises(InvalidRequestError, match="no images or audio"):
        engine.submit(request, lambda ev: None)
    short = Request(prompt_ids=request.prompt_ids[:-1], media=request.media)
    with pytest.raises(InvalidRequestError, match="media cover"):
        Engine(model, tokenizer, max_batch=1).submit(short, lambda ev: None)


# --- Gemma 4: images (bidirectional on sliding layers only) and audio (causal) ----------------------

def test_gemma4_images_and_audio_batched_equal_one_at_a_time(pair):
    pytest.importorskip("soundfile")
    from test_audio import clips
    from test_gemma4_media import tokenizer as g4_tokenizer
    from test_gemma4_vision import picture as g4_picture

    _, model, _ = pair
    tok = g4_tokenizer()
    sound = clips()
    cases = [
        ("what is here<|image|>", [g4_picture(0, (64, 48))], None, {}),
        ("what is said<|audio|>", None, [sound[0]], {}),
        ("<|image|> and <|audio|>", [g4_picture(1, (48, 80))], [sound[1]], {}),
        ("plain text", None, None, {}),
        ("what is said<|audio|>", None, [sound[2]], {"temperature": 1.0, "seed": 3}),
    ]
    prompts = [render_chat([{"role": "user", "content": c[0]}]) for c in cases]
    expected = [_one_at_a_time(model, tok, p, images, audio, **s) for p, (_, images, audio, s) in zip(prompts, cases)]
    requests = [_request(model, tok, p, images, audio, **s) for p, (_, images, audio, s) in zip(prompts, cases)]
    for chunk in (256, 5):
        assert batched(model, tok, requests, chunk) == expected, chunk
