"""Gemma 3n with its audio tower: whole tiny Gemma3nForConditionalGeneration models (the fixture
of test_gemma3n_vision.py, whose audio tower gemmakit now reads) with clips and images, against
transformers; and the same requests through the CLI, the batching engine and the server.

Features are gemmakit's log-mel (tests/test_audio.py checks them against transformers' extractor)
at the tiny tower's 16 bins; transformers gets the same tensors as ``input_features``.
"""

from __future__ import annotations

import pytest
import torch

from test_gemma3n_vision import AUDIO, BOA, EOA, IMAGE, TOKENS, _pixels, pair  # noqa: F401 (pair: a fixture)
from test_vision import picture

from gemmakit.audio.features import GEMMA3N_AUDIO, log_mel, stack_features

pytest.importorskip("soxr")  # load_audio resamples numpy input through it only when rates differ; files need it
CLIP_TOKENS = 188  # Gemma3nConfig's audio_soft_tokens_per_image


def _features(model, waves):
    spec = GEMMA3N_AUDIO.replace(num_mel_bins=model.config.audio.num_mel_bins)
    return stack_features([log_mel([w], spec) for w in waves])


def _hf_logits(hf, ids, features, mask, pixel_values=None):
    """transformers' logits, its vision tower run an image at a time as in test_gemma3n_vision."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    with torch.no_grad():
        extra = {}
        if pixel_values is not None:
            pooled = torch.cat([hf.model.get_image_features(p[None]).pooler_output for p in pixel_values])
            extra["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
        return hf(input_ids=ids, input_features=features, input_features_mask=mask, **extra).logits


def test_the_config_reads_the_audio_tower(pair):
    _, model, _, _ = pair
    c = model.config
    assert model.audio_tower is not None and model.audio_embedder is None
    assert (c.audio_token_id, c.boa_token_id, c.eoa_token_id, c.audio.soft_tokens) == (AUDIO, BOA, EOA, CLIP_TOKENS)
    assert c.audio.num_mel_bins == 16


@pytest.mark.parametrize("with_image", [False, True])
def test_logits_with_a_clip_match_transformers(pair, with_image):
    from test_audio import clips

    from gemmakit.vision.prompt import build_prompt

    hf, model, tokenizer, _ = pair
    text = "what is said <audio_soft_token>" + (" and shown <start_of_image>" if with_image else "")
    ids = build_prompt(model.config, tokenizer, text, [0] if with_image else [], clips=1)
    assert ids.count(AUDIO) == CLIP_TOKENS and ids.count(BOA) == ids.count(EOA) == 1
    assert ids.count(IMAGE) == (TOKENS if with_image else 0)
    ids = torch.tensor([ids])
    features, mask = _features(model, clips()[:1])
    pixel_values = _pixels(model, 1) if with_image else None
    expected = _hf_logits(hf, ids, features, mask, pixel_values)
    got = model(ids, pixel_values=pixel_values, audio_features=features, audio_mask=mask)
    assert (got - expected).abs().max().item() <= 1e-4
    # the clip matters: another one gives other logits
    other, other_mask = _features(model, clips()[1:2])
    assert (model(ids, pixel_values=pixel_values, audio_features=other, audio_mask=other_mask)
            - expected).abs().max().item() > 1e-3


def test_greedy_with_a_clip_equals_transformers(pair):
    from test_audio import clips

    from gemmakit.api import stream_generation

    hf, model, tokenizer, _ = pair
    wave = clips()[2]
    result = None
    for _, result in stream_generation(model, tokenizer, "hear <audio_soft_token> now", max_tokens=8, audio=[wave],
                                       stop_ids=frozenset()):
        pass
    ids = torch.tensor([result.prompt_ids])
    features, mask = _features(model, [wave])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, input_features=features, input_features_mask=mask, max_new_tokens=8,
                          min_new_tokens=8, do_sample=False)
    assert result.token_ids == out[0, ids.shape[1]:].tolist()


def test_batched_clips_equal_one_at_a_time(pair):
    """Two clips of different lengths in one prompt, and prompts of one clip each batched by the
    engine, against each request alone."""
    from test_audio import clips
    from test_engine_media import _one_at_a_time, _request, batched

    _, model, tokenizer, _ = pair
    sound = clips()
    cases = [("a <audio_soft_token> b <audio_soft_token>", None, [sound[0], sound[1]], {}),
             ("what is said", None, [sound[2]], {}),
             ("look <start_of_image> and hear", [picture(1)], [sound[1]], {}),
             ("plain words", None, None, {}),
             ("sampled", None, [sound[0]], {"temperature": 1.0, "seed": 3})]
    expected = [_one_at_a_time(model, tokenizer, p, images, audio, **s) for p, images, audio, s in cases]
    requests = [_request(model, tokenizer, p, images, audio, **s) for p, images, audio, s in cases]
    for chunk in (256, 7):
        assert batched(model, tokenizer, requests, chunk) == expected, chunk


def test_cli_generate_with_a_clip(pair, capsys, tmp_path):
    import json

    import soundfile
    from test_audio import clips

    from gemmakit.cli import main

    _, _, _, path = pair
    soundfile.write(tmp_path / "clip.wav", clips()[0], 16000)
    assert main(["generate", "--model", str(path), "--audio", str(tmp_path / "clip.wav"), "--json", "-n", "4",
                 "transcribe"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 4 and out["prompt_ids"].count(AUDIO) == CLIP_TOKENS


def test_served_chat_and_transcription_with_a_clip(pair, tmp_path):
    """``input_audio`` parts become Gemma 3n's marker, ``<audio_soft_token>``; the reply and prompt
    length equal the plain API's for the same rendered prompt, as does /v1/audio/transcriptions'."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    import base64

    from live_server import live_server
    from test_gemma4_media import _audio_messages, _wav

    import gemmakit
    from gemmakit.api import stream_generation
    from gemmakit.chat import render_chat
    from gemmakit.serve import build_app
    from gemmakit.serve.routes.audio import instruction

    _, model, tokenizer, _ = pair
    wav = _wav(tmp_path)
    prompt = render_chat([{"role": "user", "content": "what is said<audio_soft_token>"}])
    result = None
    for _, result in stream_generation(model, tokenizer, prompt, max_tokens=5, audio=[wav], stop_ids=frozenset()):
        pass
    heard = render_chat([{"role": "user", "content": instruction(None, None, "<audio_soft_token>")}])
    transcript = gemmakit.generate(model, tokenizer, heard, max_tokens=256, audio=[wav])
    with live_server(build_app(model, tokenizer, "gemma3n", max_batch=2)) as base:
        data = base64.b64encode(wav.read_bytes()).decode()
        reply = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "max_tokens": 5, "temperature": 0, "ignore_eos": True, "messages": _audio_messages(data)}).json()
        assert reply["usage"]["prompt_tokens"] == len(result.prompt_ids)
        assert reply["choices"][0]["message"]["content"] == result.text
        r = httpx.post(f"{base}/v1/audio/transcriptions", timeout=60, data={"model": "gemma3n"},
                       files={"file": ("clip.wav", wav.read_bytes(), "audio/wav")})
        assert r.status_code == 200 and r.json() == {"text": transcript}
