"""Gemma 4 12B (``gemma4_unified``) with images, video frames and audio, against transformers'
Gemma4UnifiedForConditionalGeneration: no vision or audio encoder, each 48-pixel patch and each
640-sample audio frame is projected into one soft token, and each image's run of soft tokens
attends both ways on every layer, past the sliding window.

A tiny random-weight model (4 layers, width 32, the 12B's K=V global layers) is saved by
transformers and read back through gemmakit.load; its LayerNorms and RMSNorms get random scales
and biases so that a mapping mistake shows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma4UnifiedForConditionalGeneration"):
    pytest.skip("this transformers has no gemma4_unified", allow_module_level=True)

from test_gemma4_media import tokenizer  # noqa: E402 (the same specials at the same ids)
from test_gemma4_vision import _padded_grids, picture  # noqa: E402

import gemmakit  # noqa: E402

IMAGE, BOI, EOI, VIDEO = 299, 300, 301, 302
AUDIO, BOA, EOA = 303, 304, 305
TEXT = dict(vocab_size=306, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
            attention_k_eq_v=True, sliding_window=8, final_logit_softcapping=30.0, max_position_embeddings=512,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
            pad_token_id=0, use_bidirectional_attention="vision")
VISION = dict(patch_size=16, pooling_kernel_size=3, mm_embed_dim=24, output_proj_dims=24, mm_posemb_size=80)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    config = Gemma4UnifiedConfig(text_config=TEXT, vision_config=VISION, audio_config={"audio_embed_dim": 640},
                                 image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI, video_token_id=VIDEO,
                                 audio_token_id=AUDIO, boa_token_id=BOA, eoa_token_index=EOA)
    torch.manual_seed(0)
    hf = Gemma4UnifiedForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1 or name.endswith("pos_embedding"):  # norms' scales and biases, the position table
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
        for name, b in hf.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.rand(b.shape) + 0.5)
    path = tmp_path_factory.mktemp("gemma4-unified")
    hf.save_pretrained(path)
    tokenizer().save_pretrained(path)
    model, _ = gemmakit.load(path)
    return hf, model, path


def _image_inputs(grids: list[tuple[int, int]], budget: int = 70, seed: int = 1):
    """Random merged patches ``[N, budget, 6912]`` and positions for (columns, rows) grids of 48-px cells."""
    return _padded_grids(grids, budget, seed, patch=48)


def _types(ids: torch.Tensor) -> torch.Tensor:
    return (ids == IMAGE).long() + 2 * (ids == VIDEO).long() + 3 * (ids == AUDIO).long()


def test_the_config_reads_the_embedders(pair):
    hf, model, _ = pair
    c = model.config
    assert c.vision.mm_embed_dim == 24 and c.vision.mm_posemb_size == 80 and c.audio.frame_samples == 640
    assert c.text.group_layer_kinds == ("global", "local") and c.text.group_bypasses_window
    assert c.text.per_layer_input_dim == 0
    ours = sum(p.numel() for p in model.parameters())
    scalars = sum(b.numel() for n, b in hf.named_buffers() if n.endswith("layer_scalar"))  # a parameter here
    assert ours == sum(p.numel() for n, p in hf.named_parameters() if "lm_head" not in n) + scalars


def test_image_features_match_transformers(pair):
    hf, model, _ = pair
    pixels, positions = _image_inputs([(4, 3), (2, 5)])
    with torch.no_grad():
        theirs = hf.model.get_image_features(pixels, positions).pooler_output
        ours = model.image_features(pixels, positions)
    assert [t.shape[0] for t in ours] == [12, 10]
    assert (torch.cat(ours) - torch.cat(list(theirs) if isinstance(theirs, (list, tuple)) else [theirs])).abs().max() <= 1e-5


def test_logits_with_images_and_audio_match_transformers(pair):
    """Two images (12 tokens each: longer than the window of 8, which their runs ignore) and a clip."""
    hf, model, _ = pair
    pixels, positions = _image_inputs([(4, 3), (3, 4)])
    frames = torch.randn(1, 5, 640) * 0.2
    mask = torch.ones(1, 5, dtype=torch.bool)
    ids = ([2, 40, BOI] + [IMAGE] * 12 + [EOI, 50, BOI] + [IMAGE] * 12 + [EOI, 60, BOA] + [AUDIO] * 5
           + [EOA, 70, 71, 72])
    ids = torch.tensor([ids])
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, image_position_ids=positions, input_features=frames,
                      input_features_mask=mask, mm_token_type_ids=_types(ids)).logits
        got = model(ids, pixels, positions, audio_features=frames, audio_mask=mask)
    assert (got - expected).abs().max() <= 1e-4
    # causal images (Gemma 3n's way) or Gemma 4's sliding-only groups would give other logits
    assert (model.decoder(ids, inputs_embeds=model.embed_media(ids, pixels, positions, audio_features=frames,
                                                               audio_mask=mask)[1]) - expected).abs().max() > 1e-3


def test_logits_with_video_frames_match_transformers(pair):
    hf, model, _ = pair
    frames, positions = _image_inputs([(3, 2), (3, 2)], seed=4)
    ids = torch.tensor([[2, 30, BOI] + [VIDEO] * 6 + [EOI, 31, BOI] + [VIDEO] * 6 + [EOI, 32, 33]])
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values_videos=frames, video_position_ids=positions,
                      num_frames_per_video=torch.tensor([2]), mm_token_type_ids=_types(ids)).logits
        got = model(ids, video_values=frames, video_positions=positions)
    assert (got - expected).abs().max() <= 1e-4


def test_greedy_with_an_image_equals_transformers(pair):
    hf, model, _ = pair
    pixels, positions = _image_inputs([(4, 3)], seed=7)
    ids = torch.tensor([[2, 40, BOI] + [IMAGE] * 12 + [EOI, 50, 51]])
    from gemmakit.engine.generate import generate_steps
    from gemmakit.engine.sampling import SamplingParams
    from gemmakit.models.gemma4_vision import Gemma4ImagePrompt

    bound = Gemma4ImagePrompt(model, pixels, positions)
    got = [s.tokens[0] for s in generate_steps(bound, [ids[0].tolist()], 8, SamplingParams(), frozenset(),
                                               prefill_chunk=ids.shape[1])]
    with torch.no_grad():
        out = hf.generate(input_ids=ids, pixel_values=pixels, image_position_ids=positions,
                          mm_token_type_ids=_types(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert got == out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("budget", [70, 280])
def test_preprocess_equals_the_unified_image_processor(budget):
    pytest.importorskip("torchvision")  # the processor has only a torchvision backend
    from transformers.models.gemma4_unified.image_processing_gemma4_unified import Gemma4UnifiedImageProcessor

    from gemmakit.vision.gemma4_preprocess import preprocess

    images = [picture(0, (200, 120)), picture(1, (64, 300)), picture(2, (40, 40))]
    theirs = Gemma4UnifiedImageProcessor(max_soft_tokens=budget)(images, return_tensors="pt")
    pixels, positions, tokens = preprocess(images, max_soft_tokens=budget, merged=True)
    assert tokens == theirs["num_soft_tokens_per_image"].tolist()
    assert torch.equal(positions, theirs["image_position_ids"].long())
    assert (pixels - theirs["pixel_values"]).abs().max() <= 1e-6


def test_audio_frames_equal_the_unified_feature_extractor():
    from test_audio import clips
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor)

    from gemmakit.audio.prompt import audio_frames

    waves = clips()
    theirs = Gemma4UnifiedAudioFeatureExtractor()(waves, sampling_rate=16000, return_tensors="pt")
    frames, mask, counts = audio_frames(waves)
    assert torch.equal(mask, theirs["input_features_mask"].bool())
    assert torch.equal(frames, theirs["input_features"].float())
    assert counts == [-(-len(w) // 640) for w in waves]


def test_generate_with_an_image_and_a_clip(pair):
    """``generate(images=, audio=)`` places both (the image's cells and the clip's frames in tokens)
    and equals the model run on the prompt it built."""
    from test_audio import clips

    from gemmakit.api import stream_generation
    from gemmakit.vision.generate import prepare_vision

    _, model, _ = pair
    tok = tokenizer()
    image, clip = picture(3, (100, 60)), clips()[0]
    bound, ids, _ = prepare_vision(model, tok, "look <|image|> hear <|audio|> say", [image], audio=[clip])
    assert ids.count(AUDIO) == -(-len(clip) // 640) and ids.count(BOI) == 1 == ids.count(BOA)
    result = None
    for _, result in stream_generation(model, tok, "look <|image|> hear <|audio|> say", max_tokens=4,
                                       images=[image], audio=[clip], stop_ids=frozenset()):
        pass
    assert result.prompt_ids == ids
    with torch.no_grad():
        first = bound(torch.tensor([ids]))[0, -1].argmax().item()
    assert result.token_ids[0] == first


def test_info_reports_the_embedders(pair):
    from gemmakit.info import describe, format_report

    hf, _, path = pair
    report = describe(str(path))
    assert report["vision"]["tower"] == "patch projection (no encoder)" and report["vision"]["patch_size"] == 48
    assert report["vision"]["parameters"] == sum(p.numel() for p in hf.model.embed_vision.parameters()) - 24 * 32
    assert report["audio"]["parameters"] == 640 * 32
    assert "patch projection" in format_report(report)
