"""Gemma 3n's vision against transformers: timm's MobileNet-v5 tower, the multimodal embedder, the
image processor, and whole tiny Gemma3nForConditionalGeneration models read by gemmakit.load.

The tower is timm's ``mobilenetv5_300m_enc`` at channel multiplier 0.05 with a 4 x 4 output grid
(16 soft tokens, 5.8M parameters, most in the 2048-wide fusion adapter) on 64 px images; the decoder
is a 5-layer Gemma 3n with AltUp, LAuReL, per-layer embeddings and K/V sharing; the audio tower is
there because the class needs one (gemmakit reads only its embedder).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import gemmakit

try:  # through gemmakit, which lets timm import beside a torchvision build whose C++ operators do not load
    from gemmakit.models.mobilenet import timm_module

    timm_module()
except gemmakit.errors.UnsupportedModelError as exc:
    pytest.skip(str(exc), allow_module_level=True)
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma3nForConditionalGeneration"):
    pytest.skip("this transformers has no Gemma 3n", allow_module_level=True)

from test_vision import picture  # noqa: E402

from gemmakit.vision.preprocess import ImageSpec, preprocess, spec_for  # noqa: E402
from gemmakit.vision.prompt import build_prompt  # noqa: E402

BOI, BOA = 299, 300  # <start_of_image>, <start_of_audio>: text-vocabulary ids, as in Gemma 3n
TEXT = 301  # the text vocabulary; the per-layer table covers it alone
EOI, IMAGE = TEXT, TEXT + 1  # the vision vocabulary's first two ids, as in Gemma 3n
EOA, AUDIO = TEXT + 4, TEXT + 5
VOCAB = TEXT + 8  # 4 vision ids, 4 audio ids
SIZE, TOKENS = 64, 16
TOWER_ARGS = {"channel_multiplier": 0.05, "msfa_output_resolution": 4}


def _tokenizer():
    from tiny import tiny_vocab

    from gemmakit.tokenizer import Tokenizer, build_model_proto

    pieces, scores, types = tiny_vocab()
    assert len(pieces) == BOI
    pieces += ["<start_of_image>", "<start_of_audio>", "<end_of_image>", "<image_soft_token>", "<unused_v0>",
               "<unused_v1>", "<end_of_audio>", "<audio_soft_token>", "<unused_a0>", "<unused_a1>"]
    scores += [0.0] * 10
    types += [3] * 10
    proto = build_model_proto(pieces, scores, types, bos=(2, "<bos>"), eos=(1, "<eos>"), pad=(0, "<pad>"),
                              unk=(3, "<unk>"))
    return Tokenizer._from_proto(proto, source="tiny-gemma3n", types=types)


def _hf_model(sliding_window: int = 6):
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nTextConfig, Gemma3nVisionConfig

    text = Gemma3nTextConfig(
        vocab_size=VOCAB, vocab_size_per_layer_input=TEXT, hidden_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=sliding_window, max_position_embeddings=512,
        hidden_size_per_layer_input=8, laurel_rank=8, num_hidden_layers=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_kv_shared_layers=2, intermediate_size=96,
        activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0, 0.0])
    vision = Gemma3nVisionConfig(model_args=TOWER_ARGS, vocab_size=4, vocab_offset=TEXT)
    audio = Gemma3nAudioConfig(vocab_size=4, vocab_offset=TEXT + 4, input_feat_size=16, hidden_size=32,
                               conf_num_attention_heads=2, conf_num_hidden_layers=1, sscp_conv_channel_size=[8, 4])
    config = Gemma3nConfig(text_config=text, vision_config=vision, audio_config=audio,
                           vision_soft_tokens_per_image=TOKENS, boi_token_id=BOI, eoi_token_id=EOI,
                           image_token_id=IMAGE, boa_token_id=BOA, eoa_token_id=EOA, audio_token_id=AUDIO)
    return transformers.Gemma3nForConditionalGeneration(config)


def _randomise(hf) -> None:
    """Weights far from their initial values (ones, zeros, timm's 1e-5 layer scales), so that a
    mapping mistake shows; the decoder's as in tests/test_gemma3n.py."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".vision_tower." in name:
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)


def _preprocessor():
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    # Gemma 3n's processor settings (bilinear, no normalisation: the tower takes [0, 1]) at the tiny size
    return SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE}, resample=Image.Resampling.BILINEAR,
                                   do_normalize=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    hf = _hf_model().eval()
    _randomise(hf)
    path = tmp_path_factory.mktemp("gemma3n_vision")
    hf.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    _preprocessor().save_pretrained(path)
    model, tokenizer = gemmakit.load(path)
    return hf, model, tokenizer, path


def _pixels(model, n: int) -> torch.Tensor:
    return preprocess([picture(k) for k in range(n)], spec_for(model.config))[0]


def _hf_logits(hf, ids, pixel_values):
    """transformers' logits, its tower run on one image at a time as gemmakit's is (models/mobilenet.py:
    the convolutions' float32 sums depend on the batch, by ~3e-5 on features and ~2e-4 on logits here)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    with torch.no_grad():
        features = torch.cat([hf.model.get_image_features(image[None]).pooler_output for image in pixel_values])
        images = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        return hf(input_ids=ids, mm_encoder_outputs=images).logits


def test_the_config_reads_the_tower_and_the_prompt_layout(pair):
    _, model, _, _ = pair
    c = model.config
    assert (c.projector, c.image_attention, c.layout, c.tokens_per_image) == ("embedder", "causal", "gemma3", TOKENS)
    assert (c.image_token_id, c.boi_token_id, c.eoi_token_id) == (IMAGE, BOI, EOI)
    assert c.vision.architecture == "mobilenetv5_300m_enc" and dict(c.vision.model_args) == TOWER_ARGS
    assert (c.vision.image_size, c.image_mean, c.image_std, c.image_resample) == (SIZE, (0.0,) * 3, (1.0,) * 3, 2)
    assert (c.vision.vocab_offset, c.audio_embedder.vocab_offset, c.text.per_layer_vocab_size) == (TEXT, TEXT + 4, TEXT)


def test_tower_and_image_features_match_transformers(pair):
    hf, model, _, _ = pair
    pixel_values = _pixels(model, 3)
    with torch.no_grad():
        expected = hf.model.vision_tower(pixel_values=pixel_values, do_pooling=False).last_hidden_state
        assert (model.vision(pixel_values) - expected.flatten(2).transpose(1, 2)).abs().max().item() <= 1e-4
        features = hf.model.get_image_features(pixel_values).pooler_output
    ours = model.image_features(pixel_values)
    assert ours.shape == (3, TOKENS, 64)
    assert (ours - features).abs().max().item() <= 1e-4
    assert (ours[0] - ours[1]).abs().max().item() > 0.1  # the images differ, so do their tokens


def test_hard_tokens_embed_as_in_transformers(pair):
    """Ids of the vision and audio vocabularies (<end_of_image> among them) come from the towers' embedders."""
    hf, model, _, _ = pair
    ids = torch.tensor([[2, 40, EOI, TEXT + 2, TEXT + 3, 50, EOA, TEXT + 6, TEXT + 7, BOI, BOA]])
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    assert (model(ids) - expected).abs().max().item() <= 1e-4
    # the decoder's own table for those ids gives other logits
    assert (model.decoder(ids) - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_match_transformers(pair, n_images):
    hf, model, tokenizer, _ = pair
    text = "<start_of_turn>user\nwhat is this" if n_images == 1 else "a <start_of_image> then b <start_of_image> which?"
    ids = torch.tensor([build_prompt(model.config, tokenizer, text, [0] * n_images)])
    row = ids[0].tolist()
    assert row.count(IMAGE) == TOKENS * n_images and row.count(BOI) == row.count(EOI) == n_images
    pixel_values = _pixels(model, n_images)
    expected = _hf_logits(hf, ids, pixel_values)
    got = model(ids, pixel_values=pixel_values)
    assert (got - expected).abs().max().item() <= 1e-4
    # Gemma 3n's image tokens are causal: Gemma 3's per-image groups would give other logits
    is_image = ids == IMAGE
    groups = torch.where(is_image, torch.cumsum(is_image & ~torch.roll(is_image, 1, 1), 1), -1)
    assert (model(ids, pixel_values=pixel_values, groups=groups) - expected).abs().max().item() > 1e-3


def test_batched_rows_with_an_image_each(pair):
    hf, model, tokenizer, _ = pair
    ids = torch.tensor([build_prompt(model.config, tokenizer, t, [0]) for t in ("look here", "what see")])
    pixel_values = _pixels(model, 2)
    batched = model(ids, pixel_values=pixel_values)
    assert (batched - _hf_logits(hf, ids, pixel_values)).abs().max().item() <= 1e-4
    for row in range(2):  # equal to one request at a time
        alone = model(ids[row:row + 1], pixel_values=pixel_values[row:row + 1])
        assert (batched[row:row + 1] - alone).abs().max().item() <= 1e-4


def test_cli_generate_with_an_image(pair, capsys, tmp_path):
    import json

    from gemmakit.cli import main

    _, _, _, path = pair
    picture(3).save(tmp_path / "p.png")
    assert main(["generate", "--model", str(path), "--image", str(tmp_path / "p.png"), "--json", "-n", "4",
                 "caption"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 4 and out["prompt_ids"].count(IMAGE) == TOKENS


def test_greedy_with_cache_equals_transformers(pair):
    hf, model, tokenizer, _ = pair
    from gemmakit.api import stream_generation

    images = [picture(0), picture(1)]
    result = None
    for _, result in stream_generation(model, tokenizer, "tell me", max_tokens=8, images=images,
                                       stop_ids=frozenset()):
        pass
    ids = torch.tensor([result.prompt_ids])
    assert ids[0].tolist() == build_prompt(model.config, tokenizer, "tell me", [0, 0])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, pixel_values=_pixels(model, 2), max_new_tokens=8, min_new_tokens=8,
                          do_sample=False)
    assert result.token_ids == out[0, ids.shape[1]:].tolist()


def test_pan_and_scan_is_refused(pair):
    from gemmakit.errors import InvalidRequestError

    _, model, tokenizer, _ = pair
    with pytest.raises(InvalidRequestError, match="pan & scan"):
        gemmakit.generate(model, tokenizer, "x", images=[picture(0)], pan_and_scan=True)


def test_info_reports_the_tower(pair):
    from gemmakit.info import describe

    hf, _, _, path = pair
    report = describe(str(path))
    assert report["vision"]["tokens_per_image"] == TOKENS
    tower = sum(p.numel() for p in hf.model.vision_tower.parameters())
    assert report["vision"]["parameters"] == tower
    skipped = ("lm_head", ".audio_tower.", ".embed_audio.")  # the head is tied; the audio tower has its own line
    assert report["parameters"] == sum(p.numel() for n, p in hf.named_parameters() if not any(s in n for s in skipped))
    audio = [p.numel() for n, p in hf.named_parameters() if ".audio_tower." in n or ".embed_audio." in n]
    assert report["audio"]["parameters"] == sum(audio) and report["audio"]["tokens_per_clip"] == 188


# --- preprocessing equals transformers' processor --------------------------------------------------

def test_preprocess_equals_the_gemma3n_processor():
    images = [picture(0, (500, 300)), picture(1, (64, 200)), picture(2, (768, 768))]
    for size in (64, 768):
        proc = _preprocessor()
        ref = proc(images, size={"height": size, "width": size}, return_tensors="pt")["pixel_values"]
        ours, crops = preprocess(images, ImageSpec(size, Image.Resampling.BILINEAR, mean=0.0, std=1.0))
        assert crops == [0, 0, 0] and ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-6
        assert ours.min() >= 0.0 and ours.max() <= 1.0


def test_directory_without_preprocessor_uses_the_towers_defaults(pair, tmp_path):
    """No preprocessor_config.json: timm's numbers for the tower (768 px, [0, 1] pixels), bilinear."""
    import shutil

    _, _, _, path = pair
    for f in path.iterdir():
        if f.name != "preprocessor_config.json":
            shutil.copy(f, tmp_path / f.name)
    model, _ = gemmakit.load(tmp_path)
    spec = spec_for(model.config)
    assert (spec.size, spec.mean, spec.std, spec.resample) == (768, (0.0,) * 3, (1.0,) * 3, Image.Resampling.BILINEAR)


def test_without_timm_the_directory_is_its_text_decoder(pair, monkeypatch):
    from gemmakit.checkpoints import gemma3n_vision
    from gemmakit.models.decoder import GemmaModel

    hf, _, _, path = pair
    monkeypatch.setattr(gemma3n_vision, "timm_available", lambda: False)
    model, _ = gemmakit.load(path)
    assert isinstance(model, GemmaModel) and model.config.family == "gemma3n"
    ids = torch.tensor([[2, 40, 50, 60, 70, 80, 90, 100, 110, BOI]])
    with torch.no_grad():
        assert (model(ids) - hf(input_ids=ids).logits).abs().max().item() <= 1e-4
