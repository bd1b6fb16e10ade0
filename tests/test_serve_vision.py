"""Images in the OpenAI server: ``image_url`` data URIs for PaliGemma and Gemma 3 vision models.

Tiny random vision models are built by transformers (as in test_vision.py), saved, loaded by
gemmakit and served by ``build_app`` (what ``gemmakit serve`` runs) on a loopback port. The
official ``openai`` client sends a PNG/JPEG as a data URI; the expected text and token count come
from gemmakit's plain ``stream_generation(..., images=[...])`` for the same rendered prompt.
"""

from __future__ import annotations

import base64
import io
import json
import threading

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from live_server import live_server  # noqa: E402
from test_vision import _hf_model, _sharpen, _tokenizer, picture  # noqa: E402
from tiny import random_model, tiny_config, write_gguf  # noqa: E402

import gemmakit  # noqa: E402
from gemmakit.api import stream_generation  # noqa: E402
from gemmakit.chat import render_chat  # noqa: E402
from gemmakit.serve import build_app  # noqa: E402

QUESTION = "what is in the picture"


def data_uri(image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_messages(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module", params=["paligemma", "gemma3"])
def served(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = _hf_model(request.param).eval()
    _sharpen(hf)  # so that Gemma 3's samples depend on the image
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    model, tokenizer = gemmakit.load(path)
    with live_server(build_app(model, tokenizer, request.param, max_batch=2)) as url:
        yield request.param, url, model, tokenizer


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="none", max_retries=0, timeout=60)


def reference(kind, model, tokenizer, image, max_tokens: int, **sampling):
    """Text and token count of the plain API for the prompt the server should render."""
    content = ([{"type": "image"}] if kind == "gemma3" else []) + [{"type": "text", "text": QUESTION}]
    prompt = render_chat([{"role": "user", "content": content}])
    result = None
    for _, result in stream_generation(model, tokenizer, prompt, max_tokens=max_tokens, images=[image],
                                       stop_ids=frozenset(), **sampling):
        pass
    return result


def test_image_chat_matches_plain_generation(served, client):
    kind, _, model, tokenizer = served
    image = Image.new("RGB", (80, 60), (255, 255, 255))
    expected = reference(kind, model, tokenizer, image, 10)
    if kind == "gemma3":  # the image matters to this model: a black one gives other tokens
        black = reference(kind, model, tokenizer, Image.new("RGB", (80, 60), (0, 0, 0)), 10)
        assert black.token_ids != expected.token_ids
    reply = client.chat.completions.create(model=kind, messages=image_messages(data_uri(image)), max_tokens=10,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids) == 10
    assert reply.usage.prompt_tokens == len(expected.prompt_ids)
    assert expected.prompt_ids.count(model.config.image_token_id) == model.config.tokens_per_image
    assert reply.choices[0].finish_reason == "length"


def test_image_chat_logprobs(served, client):
    """``logprobs`` apply to image chats as to text ones (they were dropped without a word when
    image chats ran beside the engine): each generated token's logprob and its top alternatives."""
    kind, _, model, tokenizer = served
    image = picture(2)
    expected = reference(kind, model, tokenizer, image, 6)
    reply = client.chat.completions.create(model=kind, messages=image_messages(data_uri(image)), max_tokens=6,
                                           temperature=0, logprobs=True, top_logprobs=3,
                                           extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == expected.text and len(content) == 6
    for t in content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.logprob == max(a.logprob for a in t.top_logprobs) <= 0


def test_streamed_image_chat_and_sampling_seed(served, client):
    kind, _, model, tokenizer = served
    image = picture(1)
    expected = reference(kind, model, tokenizer, image, 12, temperature=1.0, top_k=20, seed=7)
    chunks = list(client.chat.completions.create(
        model=kind, messages=image_messages(data_uri(image, "JPEG")), max_tokens=12, temperature=1.0, seed=7,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "top_k": 20}))
    # JPEG is lossy: the expectation must see the decoded JPEG, as the server does
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    decoded = reference(kind, model, tokenizer, Image.open(io.BytesIO(buffer.getvalue())), 12, temperature=1.0,
                        top_k=20, seed=7)
    assert text == decoded.text
    assert chunks[-1].usage.prompt_tokens == len(expected.prompt_ids)


def test_bad_images_are_400_and_the_server_keeps_serving(served, client):
    kind, url, model, tokenizer = served
    bad = {"undecodable base64": "data:image/png;base64,@@not*base64@@",
           "not an image": "data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode(),
           "remote url": "https://example.com/cat.png"}
    for why, uri in bad.items():
        r = httpx.post(url + "/v1/chat/completions", json={"messages": image_messages(uri), "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 400, why
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], why
        if why == "remote url":
            assert "data:" in error["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=kind, messages=image_messages(bad["not an image"]), max_tokens=4)
    reply = client.chat.completions.create(model=kind, messages=image_messages(data_uri(picture(0))), max_tokens=3,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].message.content == reference(kind, model, tokenizer, picture(0), 3).text


def test_stop_string_and_text_only_requests(served, client):
    kind, url, model, tokenizer = served
    image = picture(1)
    full = reference(kind, model, tokenizer, image, 10).text
    stop = full[3:6]
    assert stop
    if True:
        reply = client.chat.completions.create(model=kind, messages=image_messages(data_uri(image)), max_tokens=10,
                                               temperature=0, stop=[stop], extra_body={"ignore_eos": True})
        assert reply.choices[0].message.content == full[:full.index(stop)]
        assert reply.choices[0].finish_reason == "stop"
    text_only = [{"role": "user", "content": "hello"}]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": text_only, "max_tokens": 4, "temperature": 0,
                                                        "ignore_eos": True}, timeout=60)
    if kind == "paligemma":  # PaliGemma answers about an image: a clear 400, as the CLI's error
        assert r.status_code == 400 and "image" in r.json()["error"]["message"]
    else:  # Gemma 3 without images is its text decoder
        assert r.status_code == 200
        expected = gemmakit.generate(model, tokenizer, render_chat(text_only), max_tokens=4, stop_ids=frozenset())
        assert r.json()["choices"][0]["message"]["content"] == expected


def test_image_to_a_text_only_model_is_400(tmp_path):
    path = write_gguf(tmp_path / "text.gguf", random_model(tiny_config("gemma3", max_position_embeddings=256)))
    model, tokenizer = gemmakit.load(path)
    with live_server(build_app(model, tokenizer, "text", max_batch=1)) as url:
        body = {"messages": image_messages(data_uri(picture(0))), "max_tokens": 4}
        r = httpx.post(url + "/v1/chat/completions", content=json.dumps(body), timeout=60)
        assert r.status_code == 400
        assert "does not accept images" in r.json()["error"]["message"]
        ok = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                            "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200


def test_tokenize_places_images_where_the_parts_are(served):
    kind, url, model, tokenizer = served
    from gemmakit.vision.generate import prepare_vision

    uri = data_uri(picture(0))
    content = [{"type": "text", "text": "left"}, {"type": "image_url", "image_url": {"url": uri}},
               {"type": "text", "text": "right"}, {"type": "image_url", "image_url": {"url": uri}}]
    r = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": content}]}, timeout=60)
    assert r.status_code == 200
    marked = [{"type": "image"} if p["type"] == "image_url" else p for p in content]
    if kind == "paligemma":  # PaliGemma's images go before the whole prompt: no markers in the text
        marked = [p for p in marked if p["type"] == "text"]
    prompt = render_chat([{"role": "user", "content": marked}])
    _, ids, _ = prepare_vision(model, tokenizer, prompt, [picture(0), picture(0)])
    assert r.json()["tokens"] == ids
    assert ids.count(model.config.image_token_id) == 2 * model.config.tokens_per_image
    if kind == "gemma3":  # the first image sits between "left" and "right", not at the start
        before = tokenizer.decode(ids[:ids.index(model.config.boi_token_id)])
        assert before.endswith("<start_of_turn>user\nleft\n\n")


def test_concurrent_image_requests_take_turns(served, client):
    kind, _, model, tokenizer = served
    images = [Image.new("RGB", (80, 60), (255, 255, 255)), Image.new("RGB", (80, 60), (0, 0, 0)), picture(2)]
    replies: dict[int, str] = {}

    def ask(i: int) -> None:
        replies[i] = client.chat.completions.create(
            model=kind, messages=image_messages(data_uri(images[i])), max_tokens=6, temperature=0,
            extra_body={"ignore_eos": True}).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert replies == {i: reference(kind, model, tokenizer, im, 6).text for i, im in enumerate(images)}
