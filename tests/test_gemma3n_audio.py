"""Gemma 3n's audio tower against transformers' Gemma3nAudioEncoder and Gemma3nMultimodalEmbedder.

Gemma3nForConditionalGeneration needs timm for its vision tower, so the tiny checkpoint is written
from the two audio modules alone, under the names the full model saves them with
(``model.audio_tower.``, ``model.embed_audio.``), next to the full model's config.json. Inputs are
log-mel features of generated waveforms (and of espeak-ng speech where it is installed).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gemmakit.audio.features import GEMMA3N_AUDIO, log_mel, stack_features
from test_audio import clips, randomise, speech_or_clips

transformers = pytest.importorskip("transformers")

G3N_TEXT = dict(vocab_size=304, hidden_size=48)
G3N_AUDIO = dict(hidden_size=32, conf_num_hidden_layers=2, conf_num_attention_heads=4, sscp_conv_channel_size=[8, 4],
                 input_feat_size=128, vocab_size=8, vocab_offset=296)
WINDOWS = {
    "published": dict(conf_attention_chunk_size=4, conf_attention_context_left=5, conf_attention_context_right=0),
    "lookahead": dict(conf_attention_chunk_size=3, conf_attention_context_left=4, conf_attention_context_right=2),
}


@pytest.fixture(scope="module", params=sorted(WINDOWS))
def gemma3n_audio(request, tmp_path_factory):
    from safetensors.torch import save_file
    from transformers.models.gemma3n import configuration_gemma3n as c3n
    from transformers.models.gemma3n import modeling_gemma3n as m3n

    torch.manual_seed(0)
    audio = c3n.Gemma3nAudioConfig(**G3N_AUDIO, **WINDOWS[request.param])
    text = c3n.Gemma3nTextConfig(**G3N_TEXT)
    encoder, embedder = m3n.Gemma3nAudioEncoder(audio).eval(), m3n.Gemma3nMultimodalEmbedder(audio, text).eval()
    randomise(encoder, embedder)
    path = tmp_path_factory.mktemp(f"gemma3n_audio_{request.param}")
    tensors = {f"model.audio_tower.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    tensors.update({f"model.embed_audio.{k}": v.contiguous() for k, v in embedder.state_dict().items()})
    save_file(tensors, path / "model.safetensors")
    config = c3n.Gemma3nConfig(text_config=text.to_dict(), audio_config=audio.to_dict())
    (path / "config.json").write_text(config.to_json_string())
    return encoder, embedder, path, request.param


def reference(encoder, embedder, feats, mask):
    """transformers' encoder (its mask is True for padding) and embedder."""
    out = encoder(feats, ~mask)
    return out.last_hidden_state, ~out.audio_mel_mask, embedder(inputs_embeds=out.last_hidden_state)


def test_gemma3n_audio_tower_matches_transformers_one_at_a_time(gemma3n_audio, tmp_path):
    from gemmakit.checkpoints.hf_audio import load_audio_tower

    encoder, embedder, path, _ = gemma3n_audio
    tower = load_audio_tower(path)
    alone = [log_mel([w], GEMMA3N_AUDIO) for w in speech_or_clips(tmp_path)]
    feats, mask = stack_features(alone)  # padded features of clips taken alone
    with torch.no_grad():
        tokens, valid = tower(feats, mask)
        for i, (f, m) in enumerate(alone):
            hidden, want_valid, want_tokens = reference(encoder, embedder, f, m)
            ours, ours_valid = tower.encoder(f, m)
            assert torch.equal(ours_valid, want_valid)
            assert (ours - hidden).abs().max() <= 1e-4
            n = int(want_valid.sum())
            assert (tower(f, m)[0][0, :n] - want_tokens[0, :n]).abs().max() <= 1e-4
            # the same clip inside the padded batch gives the same tokens
            assert torch.equal(valid[i, :n], want_valid[0, :n]) and not valid[i, n:].any()
            assert (tokens[i, :n] - want_tokens[0, :n]).abs().max() <= 1e-5


def test_gemma3n_audio_tower_matches_transformers_batched(gemma3n_audio):
    """Without look-ahead a clip's last tokens never read the padding, so transformers' padded batch
    agrees too; with it, transformers' last tokens of a shorter clip read padding features."""
    from gemmakit.checkpoints.hf_audio import load_audio_tower

    encoder, embedder, path, window = gemma3n_audio
    tower = load_audio_tower(path)
    feats, mask = log_mel(clips(), GEMMA3N_AUDIO)
    with torch.no_grad():
        hidden, want_valid, want_tokens = reference(encoder, embedder, feats, mask)
        ours, valid = tower.encoder(feats, mask)
        tokens, _ = tower(feats, mask)
    assert torch.equal(valid, want_valid)
    longest = int(valid.sum(1).argmax())
    assert (ours[longest] - hidden[longest]).abs().max() <= 1e-4
    if window == "published":
        assert (ours - hidden).abs().max() <= 1e-4  # padding outputs are zero in both
        assert (tokens - want_tokens)[valid].abs().max() <= 1e-4


def test_gemma3n_audio_prompt_tokens_pad_with_the_last_audio_token(gemma3n_audio):
    from gemmakit.checkpoints.hf_audio import gemma3n_audio_name, load_audio_tower

    encoder, embedder, path, _ = gemma3n_audio
    tower = load_audio_tower(path)
    assert tower.config.soft_tokens == 188
    feats, mask = log_mel(clips(), GEMMA3N_AUDIO)
    with torch.no_grad():
        prompt = tower.prompt_tokens(feats, mask)
        tokens, valid = tower(feats, mask)
        pad = embedder(input_ids=torch.tensor([[G3N_TEXT["vocab_size"] - 1]]))[0, 0]
    assert prompt.shape == (3, 188, G3N_TEXT["hidden_size"])
    T = tokens.shape[1]
    assert torch.equal(prompt[:, :T], tokens)
    assert (prompt[:, T:] - pad).abs().max() <= 1e-5
    assert (prompt[:, :T][~valid] - pad).abs().max() <= 1e-5
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "gemma3n"
    assert gemma3n_audio_name("model.audio_tower.conformer.1.attention.attn.relative_position_embedding"
                              ".pos_proj.weight") == "encoder.layers.1.attn.rel_k.weight"
    assert gemma3n_audio_name("model.language_model.layers.0.mlp.up_proj.weight") is None
    assert np.isfinite(prompt.numpy()).all()


def test_gemma3n_audio_soft_tokens_from_samples(gemma3n_audio):
    from gemmakit.audio.encode import audio_soft_tokens
    from gemmakit.checkpoints.hf_audio import load_audio_tower

    encoder, embedder, path, _ = gemma3n_audio
    tower = load_audio_tower(path)
    waves = clips()
    got = audio_soft_tokens(tower, waves)
    assert [t.shape for t in got] == [(188, G3N_TEXT["hidden_size"])] * 3
    for w, tokens in zip(waves, got):
        f, m = log_mel([w], GEMMA3N_AUDIO)
        with torch.no_grad():
            _, valid, want = reference(encoder, embedder, f, m)
        n = int(valid.sum())
        assert (tokens[:n] - want[0, :n]).abs().max() <= 1e-4


def test_gemma3n_audio_tower_runs_in_bfloat16(gemma3n_audio):
    from gemmakit.checkpoints.hf_audio import load_audio_tower

    _, _, path, _ = gemma3n_audio
    full, half = load_audio_tower(path), load_audio_tower(path, dtype=torch.bfloat16)
    feats, mask = log_mel(clips(), GEMMA3N_AUDIO)
    with torch.no_grad():
        want, valid = full(feats, mask)
        got, got_valid = half(feats.bfloat16(), mask)
    assert got.dtype == torch.bfloat16 and torch.equal(valid, got_valid)
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()
