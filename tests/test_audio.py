"""Audio: log-mel features, audio files, and Gemma 4's audio encoder against transformers.

Inputs are generated waveforms (sines, chirps, noise bursts, silence gaps) and, where espeak-ng is
installed, a short synthesised sentence written as a WAV file in the test's directory. The oracle
for the features is transformers' own extractors: their public call rounds samples to float32 and
takes its FFT in float32, so the spectra are also compared with the extractors' spectrogram step fed
float64 samples, which is the same algorithm without that rounding noise.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gemmakit.audio.features import GEMMA3N_AUDIO, GEMMA4_AUDIO, log_mel, spec_from_hf
from gemmakit.errors import InvalidRequestError

transformers = pytest.importorskip("transformers")

SR = 16_000


def clips(floor: float = 3e-3, seed: int = 0) -> list[np.ndarray]:
    """A sine, a chirp and a noise burst between silences, of three lengths, with a faint noise floor
    (real recordings have one; without it the quietest bins are all float32 round-off)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.73 * SR)) / SR
    sine = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 2500 * t)
    t = np.arange(int(1.31 * SR)) / SR
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 3000 * t) * t)
    burst = np.zeros(9001)
    burst[3000:5000] = rng.normal(0, 0.2, 2000)
    return [(x + floor * rng.normal(size=x.shape)).astype(np.float32) for x in (sine, chirp, burst)]


def extractor(family: str):
    if family == "gemma4":
        return transformers.Gemma4AudioFeatureExtractor(), GEMMA4_AUDIO
    return transformers.Gemma3nAudioFeatureExtractor(), GEMMA3N_AUDIO


def float64_spectrogram(ext, wave: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The extractor's spectrogram step on ``wave`` zero-padded to ``length``, in float64 throughout
    (its Hann window is stored in float32, whose rounding alone moves quiet bins by ~2e-4)."""
    ext.window = transformers.audio_utils.window_function(ext.frame_length)  # periodic Hann, float64
    padded = np.zeros(length)
    padded[: len(wave)] = wave.astype(np.float64)
    real = (np.arange(length) < len(wave)).astype(np.int64)
    return ext._extract_spectrogram(padded, real)


@pytest.mark.parametrize("family", ["gemma4", "gemma3n"])
def test_features_equal_the_extractors_spectrogram(family):
    ext, spec = extractor(family)
    waves = clips(floor=0.0)  # no noise floor needed in float64
    feats, mask = log_mel(waves, spec)
    length = -(-max(len(w) for w in waves) // 128) * 128
    for i, w in enumerate(waves):
        want, want_mask = float64_spectrogram(ext, w, length)
        if family == "gemma4":
            want = want * want_mask[:, None]
        assert feats.shape[1:] == want.shape
        assert np.array_equal(mask[i].numpy(), want_mask)
        assert np.abs(feats[i].numpy() - want).max() <= 1e-4


@pytest.mark.parametrize("family", ["gemma4", "gemma3n"])
def test_features_equal_the_extractor_batched_and_alone(family):
    ext, spec = extractor(family)
    waves = clips()
    want = ext(waves, return_tensors="np")
    feats, mask = log_mel(waves, spec)
    assert feats.shape == want["input_features"].shape and feats.dtype == torch.float32
    assert np.array_equal(mask.numpy(), want["input_features_mask"])
    # Gemma 3n's pre-emphasis cancels most of the low bins' energy, where the extractor's float32
    # arithmetic then leaves ~1e-3 of round-off; the float64 test above holds both to 1e-4.
    assert np.abs(feats.numpy() - want["input_features"]).max() <= (1e-4 if family == "gemma4" else 2e-3)
    for i, w in enumerate(waves):  # one at a time: padded to 128 samples only
        alone, alone_mask = log_mel([w], spec)
        n = alone.shape[1]
        assert torch.equal(alone_mask[0], mask[i, :n])
        # Gemma 3n counts a frame when its first sample is audio, so in a longer batch a clip gains
        # the frames that run from its last samples into the padding; Gemma 4 wants whole frames.
        assert not mask[i, n:].any() or family == "gemma3n"
        assert torch.allclose(alone[0], feats[i, :n], atol=1e-5)


def test_features_cut_at_thirty_seconds_and_reject_bad_clips():
    long = np.random.default_rng(1).normal(0, 0.1, 31 * SR).astype(np.float32)
    feats, mask = log_mel([long], GEMMA4_AUDIO)
    want = transformers.Gemma4AudioFeatureExtractor()([long], return_tensors="np")
    assert feats.shape == want["input_features"].shape
    assert np.array_equal(mask.numpy(), want["input_features_mask"])
    with pytest.raises(InvalidRequestError, match="mono"):
        log_mel([np.zeros((100, 2))])
    with pytest.raises(InvalidRequestError, match="empty"):
        log_mel([np.zeros(0)])


def test_spec_from_preprocessor_config():
    ext = transformers.Gemma3nAudioFeatureExtractor(feature_size=64, per_bin_mean=[0.5] * 64,
                                                    per_bin_stddev=[2.0] * 64)
    spec = spec_from_hf(ext.to_dict(), "gemma3n")
    assert spec.num_mel_bins == 64 and spec.per_bin_mean == (0.5,) * 64
    waves = clips(floor=1e-2)
    feats, mask = log_mel(waves, spec)
    want = ext(waves, return_tensors="np")
    assert np.abs(feats.numpy() - want["input_features"]).max() <= 2e-3
    assert spec_from_hf(transformers.Gemma4AudioFeatureExtractor().to_dict(), "gemma4") == GEMMA4_AUDIO


# --- audio files ---------------------------------------------------------------------------------

def test_audio_files_are_read_downmixed_and_resampled(tmp_path):
    sf = pytest.importorskip("soundfile")
    pytest.importorskip("soxr")
    from gemmakit.audio.io import load_audio

    rate = 44_100
    t = np.arange(int(0.5 * rate)) / rate
    stereo = np.stack([0.4 * np.sin(2 * np.pi * 1000 * t), 0.2 * np.sin(2 * np.pi * 1000 * t)], axis=1)
    mp3 = ("tone.mp3",) if "MP3" in sf.available_formats() else ()  # libsndfile 1.1+ (lossy: same checks)
    for name in ("tone.wav", "tone.flac", *mp3):
        sf.write(tmp_path / name, stereo, rate)
        x = load_audio(tmp_path / name)
        assert x.dtype == np.float32 and abs(len(x) - 8000) <= 1
        spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
        assert abs(np.argmax(spectrum) * SR / len(x) - 1000) < 5  # the tone stays at 1 kHz
        assert abs(np.sqrt(2) * x[2000:6000].std() - 0.3) < 0.01  # the mean of the two channels
        assert np.array_equal(load_audio((tmp_path / name).read_bytes()), x)
    same = load_audio(stereo[:, 0].astype(np.float32), source_rate=SR)
    assert np.array_equal(same, stereo[:, 0].astype(np.float32))


def test_unreadable_audio_files_give_one_line_errors(tmp_path):
    pytest.importorskip("soundfile")
    from gemmakit.audio.io import load_audio

    (tmp_path / "notes.wav").write_text("not audio at all")
    for source in (tmp_path / "missing.wav", tmp_path / "notes.wav", b"\x00\x01garbage"):
        with pytest.raises(InvalidRequestError) as info:
            load_audio(source)
        assert "cannot read audio" in str(info.value) and "\n" not in str(info.value)


def speech_wav(tmp_path: Path) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Gemma listens to a short sentence."], check=True,
                   capture_output=True, timeout=60)
    return path


@pytest.mark.parametrize("family", ["gemma4", "gemma3n"])
def test_generated_speech_features(tmp_path, family):
    pytest.importorskip("soundfile")
    pytest.importorskip("soxr")
    from gemmakit.audio.io import load_audio

    speech = load_audio(speech_wav(tmp_path))  # espeak-ng writes 22050 Hz
    assert 0.5 * SR < len(speech) < 10 * SR
    ext, spec = extractor(family)
    feats, mask = log_mel([speech], spec)
    want = ext([speech.astype(np.float64)], return_tensors="np")
    assert np.array_equal(mask.numpy(), want["input_features_mask"])
    exact, _ = float64_spectrogram(ext, speech, -(-len(speech) // 128) * 128)
    exact = exact * mask[0].numpy()[:, None] if family == "gemma4" else exact
    assert exact.shape == feats.shape[1:] and np.abs(feats[0].numpy() - exact).max() <= 1e-4


# --- Gemma 4's audio tower -----------------------------------------------------------------------

G4_TEXT = dict(vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=24, hidden_size_per_layer_input=8, vocab_size_per_layer_input=300,
               layer_types=["sliding_attention", "full_attention"], sliding_window=16, max_position_embeddings=128)
# 128 first-layer channels: transformers sizes the subsampler for as many mel bins, so real features fit.
G4_AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[128, 4],
                conv_kernel_size=5, output_proj_dims=24)
WINDOWS = {"published": dict(attention_chunk_size=4, attention_context_left=5, attention_context_right=0),
           "lookahead": dict(attention_chunk_size=3, attention_context_left=4, attention_context_right=2)}


def randomise(*modules: torch.nn.Module, clip: float | None = None) -> None:
    """Move every weight off its initial value (norm scales of one, zero per-dim scales) and give the
    clipped linears finite ranges, so that each of them matters."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            for name, b in module.named_buffers():
                if clip is not None and name.endswith(("input_min", "output_min")):
                    b.fill_(-clip)
                elif clip is not None and name.endswith(("input_max", "output_max")):
                    b.fill_(clip)


@pytest.fixture(scope="module", params=sorted(WINDOWS))
def gemma4_audio(request, tmp_path_factory):
    from transformers.models.gemma4 import configuration_gemma4 as c4

    torch.manual_seed(0)
    audio = c4.Gemma4AudioConfig(**G4_AUDIO, **WINDOWS[request.param])
    model = transformers.Gemma4ForConditionalGeneration(
        c4.Gemma4Config(text_config=G4_TEXT, audio_config=audio.to_dict(), vision_config=None)).eval()
    randomise(model.model.audio_tower, model.model.embed_audio, clip=1.5)
    path = tmp_path_factory.mktemp(f"gemma4_audio_{request.param}")
    model.save_pretrained(path)
    return model, path


def speech_or_clips(tmp_path) -> list[np.ndarray]:
    """Two generated clips, and a spoken sentence where espeak-ng and the audio packages are there."""
    waves = clips()[:2]
    if shutil.which("espeak-ng") and all(importlib.util.find_spec(m) for m in ("soundfile", "soxr")):
        from gemmakit.audio.io import load_audio
        waves.append(load_audio(speech_wav(tmp_path)))
    return waves


def test_gemma4_audio_tower_matches_transformers(gemma4_audio, tmp_path):
    from gemmakit.checkpoints.hf_audio import load_audio_tower
    from gemmakit.models.gemma4_audio import soft_tokens_per_clip

    model, path = gemma4_audio
    tower = load_audio_tower(path)
    feats, mask = log_mel(speech_or_clips(tmp_path), GEMMA4_AUDIO)  # three lengths, padded
    with torch.no_grad():
        want = model.model.get_audio_features(feats, mask, return_dict=True)
        tokens, valid = tower(feats, mask)
        hidden, _ = tower.encoder(feats, mask)
    assert torch.equal(valid, want.attention_mask)
    assert (hidden - want.last_hidden_state).abs().max() <= 1e-4  # padding positions too
    assert (tokens - want.pooler_output).abs().max() <= 1e-4
    assert tokens.shape[-1] == G4_TEXT["hidden_size"]
    per_clip = soft_tokens_per_clip(tokens, valid)
    assert [len(t) for t in per_clip] == valid.sum(1).tolist()
    assert (torch.cat(per_clip) - want.pooler_output[want.attention_mask]).abs().max() <= 1e-4


def test_gemma4_audio_batched_equals_one_at_a_time(gemma4_audio, tmp_path):
    from gemmakit.checkpoints.hf_audio import load_audio_tower

    model, path = gemma4_audio
    tower = load_audio_tower(path)
    waves = speech_or_clips(tmp_path)
    feats, mask = log_mel(waves, GEMMA4_AUDIO)
    with torch.no_grad():
        tokens, valid = tower(feats, mask)
        for i, w in enumerate(waves):
            f, m = log_mel([w], GEMMA4_AUDIO)
            alone, alone_valid = tower(f, m)
            want = model.model.get_audio_features(f, m, return_dict=True).pooler_output
            n = int(alone_valid.sum())
            assert n == int(valid[i].sum())
            assert (alone[0][alone_valid[0]] - tokens[i][valid[i]]).abs().max() <= 1e-5
            assert (alone[0][alone_valid[0]] - want[0][alone_valid[0]]).abs().max() <= 1e-4


def test_gemma4_audio_checkpoint_errors(gemma4_audio, tmp_path):
    from safetensors.torch import load_file, save_file

    from gemmakit.checkpoints.hf_audio import gemma4_audio_name, load_audio_tower
    from gemmakit.errors import CheckpointError, UnsupportedModelError

    _, path = gemma4_audio
    names = load_file(path / "model.safetensors")
    audio = [n for n in names if gemma4_audio_name(n)]
    assert audio and all(n.startswith(("model.audio_tower.", "model.embed_audio.")) for n in audio)
    assert not any(gemma4_audio_name(n) for n in names if n.startswith("model.language_model."))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    save_file({n: t for n, t in names.items() if "layers.1.lconv1d.linear_end" not in n}, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing: encoder.layers.1.conv.out.weight"):
        load_audio_tower(broken)
    raw = json.loads((path / "config.json").read_text())
    raw.pop("audio_config")
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError, match="no audio tower"):
        load_audio_tower(broken)
    with pytest.raises(InvalidRequestError, match="expected"):
        load_audio_tower(path)(torch.zeros(1, 20, 64))


def test_stacked_features_of_single_clips_equal_the_gemma4_batch():
    from gemmakit.audio.features import stack_features

    waves = clips()
    feats, mask = stack_features([log_mel([w], GEMMA4_AUDIO) for w in waves])
    batch, batch_mask = log_mel(waves, GEMMA4_AUDIO)
    assert torch.equal(mask, batch_mask) and torch.allclose(feats, batch, atol=1e-5)
    with pytest.raises(InvalidRequestError):
        stack_features([])


def test_audio_files_to_soft_tokens(gemma4_audio, tmp_path):
    sf = pytest.importorskip("soundfile")
    pytest.importorskip("soxr")
    from gemmakit.audio.encode import audio_soft_tokens
    from gemmakit.audio.io import load_audio
    from gemmakit.checkpoints.hf_audio import load_audio_tower

    model, path = gemma4_audio
    tower = load_audio_tower(path)
    waves = clips()[:2]
    sf.write(tmp_path / "a.wav", waves[0], SR)
    sf.write(tmp_path / "b.flac", np.repeat(waves[1][::2, None], 2, axis=1), SR // 2)  # 8 kHz stereo
    sources = [tmp_path / "a.wav", (tmp_path / "b.flac").read_bytes()]
    tokens = audio_soft_tokens(tower, sources)
    for source, got in zip(sources, tokens):
        f, m = log_mel([load_audio(source)], GEMMA4_AUDIO)
        with torch.no_grad():
            want = model.model.get_audio_features(f, m, return_dict=True)
        assert got.shape == (int(want.attention_mask.sum()), G4_TEXT["hidden_size"])
        assert (got - want.pooler_output[want.attention_mask]).abs().max() <= 1e-4


def test_gemma4_audio_tower_runs_in_bfloat16(gemma4_audio):
    from gemmakit.checkpoints.hf_audio import load_audio_tower

    _, path = gemma4_audio
    full, half = load_audio_tower(path), load_audio_tower(path, dtype=torch.bfloat16)
    feats, mask = log_mel(clips(), GEMMA4_AUDIO)
    with torch.no_grad():
        want, valid = full(feats, mask)
        got, got_valid = half(feats.bfloat16(), mask)
    assert got.dtype == torch.bfloat16 and torch.equal(valid, got_valid)
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()


def test_feature_settings_from_a_checkpoint_directory(gemma4_audio, tmp_path):
    from gemmakit.audio.encode import spec_for
    from gemmakit.checkpoints.hf_audio import load_audio_tower

    _, path = gemma4_audio
    tower = load_audio_tower(path)
    assert spec_for(tmp_path, tower) == GEMMA4_AUDIO  # nothing there: the defaults
    transformers.Gemma4AudioFeatureExtractor(mel_floor=1e-4, per_bin_mean=[0.1] * 128).save_pretrained(tmp_path)
    spec = spec_for(tmp_path, tower)
    assert spec.mel_floor == 1e-4 and spec.per_bin_mean == (0.1,) * 128
    assert spec.replace(mel_floor=1e-3, per_bin_mean=None) == GEMMA4_AUDIO


def test_gemma4_soft_token_count_equals_the_masks():
    from gemmakit.audio.encode import gemma4_soft_token_count

    ext = transformers.Gemma4AudioFeatureExtractor()
    lengths = [161, 480, 1000, 12_345, 16_000, 16_001, 160 * 77 + 5, 480_000, 500_000]
    for n in lengths:
        mask = ext([np.zeros(n, dtype=np.float32)], return_tensors="np")["input_features_mask"][0]
        assert gemma4_soft_token_count(n) == int(mask[::2][::2].sum()), n
    assert gemma4_soft_token_count(480_000) == 750
