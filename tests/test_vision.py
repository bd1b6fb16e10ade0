"""Vision: SigLIP, PaliGemma 1, PaliGemma 2 and Gemma 3 multimodal against transformers.

Tiny random-weight models (56 px images, 14 px patches, 2 SigLIP layers) are built by transformers,
saved with a tokenizer that knows the image tokens, and read back through gemmakit.load; inputs are
images drawn with Pillow (gradients, shapes, text), preprocessed by gemmakit and compared with the
transformers processors separately.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import gemmakit
from gemmakit.errors import InvalidRequestError
from gemmakit.vision.preprocess import ImageSpec, load_image, preprocess, spec_for
from gemmakit.vision.prompt import build_prompt

transformers = pytest.importorskip("transformers")

IMAGE, SOI, EOI, SOFT = 299, 300, 301, 302  # ids of the vision specials appended to the tiny vocabulary
VIS = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=56,
           patch_size=14)
TXT = dict(vocab_size=303, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, head_dim=24, max_position_embeddings=256)


def picture(kind: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
    """Photograph-like test images: a colour gradient with shapes and rendered text."""
    w, h = size
    x = np.zeros((h, w, 3))
    x[..., 0] = np.linspace(0, 255, w)[None]
    x[..., 1] = np.linspace(255 * (kind % 2), 255 * ((kind + 1) % 2), h)[:, None]
    x[..., 2] = 40 * kind
    im = Image.fromarray(x.astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse((5 + 3 * kind, 5, w // 2, h // 2), fill=(250, 30 * kind, 10))
    d.rectangle((w // 2, h // 2, w - 4, h - 4), outline=(0, 0, 255), width=3)
    d.text((4, h - 16), f"img {kind}", fill=(255, 255, 255))
    return im


def _tokenizer():
    from tiny import tiny_vocab

    from gemmakit.tokenizer import Tokenizer, build_model_proto

    pieces, scores, types = tiny_vocab()
    pieces += ["<image>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    scores += [0.0] * 4
    types += [3] * 4
    proto = build_model_proto(pieces, scores, types, bos=(2, "<bos>"), eos=(1, "<eos>"), pad=(0, "<pad>"),
                              unk=(3, "<unk>"))
    return Tokenizer._from_proto(proto, source="tiny-vision", types=types)


def _sharpen(hf) -> None:
    """A strong projector and sharp logits, so that the tokens depend on the image."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
            if "multi_modal_projector" in name:
                p.normal_(0.0, 1.0)
            if name.endswith("language_model.norm.weight"):
                p.fill_(20.0)


def _hf_model(kind: str, **gemma3_text):
    """A tiny transformers model of ``kind``; ``gemma3_text`` overrides Gemma 3's decoder settings."""
    from transformers import (Gemma2Config, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig,
                              GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig)

    if kind == "paligemma":
        return PaliGemmaForConditionalGeneration(PaliGemmaConfig(
            vision_config=SiglipVisionConfig(**VIS, projection_dim=64).to_dict(), projection_dim=64,
            text_config=GemmaConfig(**TXT, hidden_act="gelu_pytorch_tanh").to_dict(), image_token_index=IMAGE))
    if kind == "paligemma2":  # window 8 < prompt length: the prefix-LM group must reach past it
        return PaliGemmaForConditionalGeneration(PaliGemmaConfig(
            vision_config=SiglipVisionConfig(**VIS, projection_dim=64).to_dict(), projection_dim=64,
            text_config=Gemma2Config(**TXT, hidden_activation="gelu_pytorch_tanh", sliding_window=8,
                                     query_pre_attn_scalar=20, attn_logit_softcapping=5.0,
                                     final_logit_softcapping=3.0).to_dict(), image_token_index=IMAGE))
    return Gemma3ForConditionalGeneration(Gemma3Config(  # 4 soft tokens per image: a 4x4 grid pooled 2x2
        vision_config=SiglipVisionConfig(**VIS).to_dict(), mm_tokens_per_image=4, image_token_index=SOFT,
        boi_token_index=SOI, eoi_token_index=EOI,
        text_config=Gemma3TextConfig(**{**TXT, "num_hidden_layers": 7, "sliding_window": 8, **gemma3_text},
                                     hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=20).to_dict()))


@pytest.fixture(scope="module", params=["paligemma", "paligemma2", "gemma3"])
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = _hf_model(request.param).eval()
    with torch.no_grad():  # random norms and projector, so a mapping mistake shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
            elif "mm_input_projection" in name:
                p.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    model, tokenizer = gemmakit.load(path)
    return request.param, hf, model, tokenizer, path


def _inputs(model, tokenizer, prompt: str, n_images: int):
    pixel_values, crops = preprocess([picture(k) for k in range(n_images)], spec_for(model.config))
    ids = torch.tensor([build_prompt(model.config, tokenizer, prompt, crops)])
    return ids, pixel_values


def _hf_logits(kind, hf, ids, pixel_values):
    # transformers' processors: PaliGemma token_type_ids 0 over the prompt (prefix), Gemma 3 1 on image tokens
    token_type_ids = torch.zeros_like(ids) if kind.startswith("paligemma") else (ids == SOFT).long()
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pixel_values, token_type_ids=token_type_ids).logits


def test_siglip_and_image_features_match_transformers(pair):
    _, hf, model, _, _ = pair
    pixel_values = torch.stack([preprocess([picture(k)], spec_for(model.config))[0][0] for k in range(3)])
    with torch.no_grad():
        expected = hf.model.vision_tower(pixel_values=pixel_values).last_hidden_state
        assert (model.vision(pixel_values) - expected).abs().max().item() <= 1e-4
        features = hf.model.get_image_features(pixel_values).pooler_output
        assert features.shape == (3, model.config.tokens_per_image, 64)
        assert (model.image_features(pixel_values) - features).abs().max().item() <= 1e-4


@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_match_transformers(pair, n_images):
    kind, hf, model, tokenizer, _ = pair
    prompt = "where is the cat" if kind.startswith("paligemma") else "<start_of_turn>user\nwhat is this"
    ids, pixel_values = _inputs(model, tokenizer, prompt, n_images)
    expected = _hf_logits(kind, hf, ids, pixel_values)
    got = model(ids, pixel_values=pixel_values)
    assert (got - expected).abs().max().item() <= 1e-4
    # The bidirectional groups matter: an all-causal mask gives other logits.
    causal = model(ids, pixel_values=pixel_values, groups=torch.full_like(ids, -1))
    assert (causal - expected).abs().max().item() > 1e-3
    if kind == "paligemma2":  # the prompt is longer than the window: the prefix group must pass it
        config = model.decoder.config
        model.decoder.config = config.replace(group_bypasses_window=False)
        try:
            assert (model(ids, pixel_values=pixel_values) - expected).abs().max().item() > 1e-3
        finally:
            model.decoder.config = config


def test_gemma3_images_between_text(pair):
    kind, hf, model, tokenizer, _ = pair
    if kind != "gemma3":
        pytest.skip("Gemma 3 places images where the text marks them")
    ids, pixel_values = _inputs(model, tokenizer, "a <start_of_image> then b <start_of_image> which?", 2)
    assert ids[0].tolist().count(SOFT) == 8 and ids[0].tolist().count(SOI) == 2
    assert (model(ids, pixel_values=pixel_values) - _hf_logits(kind, hf, ids, pixel_values)).abs().max() <= 1e-4


def test_greedy_with_cache_equals_full_forward(pair):
    kind, _, model, tokenizer, _ = pair
    from gemmakit.api import stream_generation

    images = [picture(0), picture(1)]
    result = None
    for _, result in stream_generation(model, tokenizer, "tell me", max_tokens=8, images=images,
                                                stop_ids=frozenset()):
        pass
    ids, pixel_values = _inputs(model, tokenizer, "tell me", 2)
    assert result.prompt_ids == ids[0].tolist()
    seq = ids[0].tolist()
    for _ in range(8):
        x = torch.tensor([seq])
        groups = None
        if kind.startswith("paligemma"):  # prefix bidirectional, generated suffix causal
            groups = torch.full_like(x, -1)
            groups[:, :ids.shape[1]] = 0
        seq.append(int(model(x, pixel_values=pixel_values, groups=groups)[0, -1].argmax()))
    assert result.token_ids == seq[ids.shape[1]:]


def test_cli_generate_with_images(pair, capsys, tmp_path):
    from gemmakit.cli import main

    _, _, _, _, path = pair
    files = []
    for k, ext in enumerate(["png", "jpg"]):
        files += ["--image", str(tmp_path / f"p{k}.{ext}")]
        picture(k).save(files[-1])
    assert main(["generate", "--model", str(path), *files, "--json", "-n", "4", "caption"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] and out["stats"]["prompt_tokens"] == len(out["prompt_ids"])


# --- preprocessing equals transformers' processors --------------------------------------------------

def test_preprocess_equals_siglip_processor():
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    images = [picture(0, (500, 300)), picture(1, (64, 200)), picture(2, (224, 224))]
    for size in (224, 448):
        ref = SiglipImageProcessorPil(size={"height": size, "width": size})(images, return_tensors="pt")
        ours, _ = preprocess(images, ImageSpec(size, Image.Resampling.BICUBIC))
        assert ours.shape == ref["pixel_values"].shape
        assert (ours - ref["pixel_values"]).abs().max().item() <= 1e-6


def test_preprocess_equals_gemma3_processor_with_pan_and_scan():
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    images = [picture(0, (1200, 400)), picture(1, (300, 900)), picture(2, (500, 450))]  # wide, tall, square-ish
    proc = Gemma3ImageProcessorPil(size={"height": 112, "width": 112})
    ref = proc(images, do_pan_and_scan=True, pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
               pan_and_scan_min_ratio_to_activate=1.2, return_tensors="pt")
    ours, crops = preprocess(images, ImageSpec(112, Image.Resampling.BILINEAR), do_pan_and_scan=True)
    assert crops == ref["num_crops"].tolist() == [3, 3, 0]
    assert (ours - ref["pixel_values"]).abs().max().item() <= 1e-6


def test_transparency_and_exif_orientation(tmp_path):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    rgba = picture(3).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    ref = SiglipImageProcessorPil(size={"height": 56, "width": 56})(rgba, return_tensors="pt")["pixel_values"]
    assert (preprocess([rgba], ImageSpec(56, Image.Resampling.BICUBIC))[0] - ref).abs().max() <= 1e-6
    # A JPEG whose EXIF says "rotate 90° clockwise to view" (orientation 6) loads upright.
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    picture(1, (80, 40)).save(path, exif=exif, quality=95)
    assert load_image(path).size == (40, 80)


# --- bad input: clear errors before any generation -----------------------------------------------

def test_bad_images_are_clear_errors(pair, tmp_path, capsys):
    from gemmakit.cli import main

    kind, _, model, tokenizer, path = pair
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    truncated = tmp_path / "cut.png"
    picture(0).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    for bad, message in [(tmp_path / "missing.png", "image not found"), (not_image, "not an image file"),
                         (truncated, "cannot read image")]:
        with pytest.raises(InvalidRequestError, match=message):
            gemmakit.generate(model, tokenizer, "x", images=[bad])
        assert main(["generate", "--model", str(path), "--image", str(bad), "x"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gemmakit: error:") and message in err and len(err.strip().splitlines()) == 1
    if kind == "gemma3":
        with pytest.raises(InvalidRequestError, match="marks 1 image"):
            gemmakit.generate(model, tokenizer, "<start_of_image> x", images=[picture(0), picture(1)])
    else:
        with pytest.raises(InvalidRequestError, match="needs an image|pass one"):
            gemmakit.generate(model, tokenizer, "x")
        with pytest.raises(InvalidRequestError, match="pan & scan"):
            gemmakit.generate(model, tokenizer, "x", images=[picture(0)], pan_and_scan=True)
    ids, pixel_values = _inputs(model, tokenizer, "x", 1)
    with pytest.raises(InvalidRequestError, match="image tokens"):  # more images than placeholders
        model(ids, pixel_values=torch.cat([pixel_values, pixel_values]))


def test_images_to_a_text_model_are_refused(tmp_path, capsys):
    from tiny import random_model, tiny_config, write_gguf

    from gemmakit.cli import main

    path = write_gguf(tmp_path / "text.gguf", random_model(tiny_config()))
    image = tmp_path / "a.png"
    picture(0).save(image)
    model, tokenizer = gemmakit.load(path)
    with pytest.raises(InvalidRequestError, match="text-only model"):
        gemmakit.generate(model, tokenizer, "x", images=[image])
    assert main(["generate", "--model", str(path), "--image", str(image), "x"]) == 2
    assert "text-only model" in capsys.readouterr().err


def test_chat_image_command(pair, tmp_path, capsys, monkeypatch):
    import io

    from gemmakit.cli import main

    kind, _, _, _, path = pair
    image = tmp_path / "a.png"
    picture(2).save(image)
    script = f"/image {tmp_path / 'missing.png'}\n/image {image}\nwhat is it\nand now\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", "--model", str(path), "-n", "3"]) == 0
    err = capsys.readouterr().err
    assert "gemmakit: error: image not found" in err and f"(image attached: {image})" in err
    assert "Traceback" not in err


def test_info_reports_the_vision_tower(pair):
    from gemmakit.info import describe

    _, hf, _, _, path = pair
    report = describe(str(path))
    assert report["vision"]["tokens_per_image"] == (16 if "pali" in str(path) else 4)
    assert report["parameters"] == sum(p.numel() for n, p in hf.named_parameters()
                                       if ".head." not in n and "lm_head" not in n)


def test_gemma3_window_bounds_an_image_longer_than_it(tmp_path):
    """16 soft tokens per image, window 8: transformers applies the window on top of the image group."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(3)
    hf = Gemma3ForConditionalGeneration(Gemma3Config(
        vision_config=SiglipVisionConfig(**VIS).to_dict(), mm_tokens_per_image=16, image_token_index=SOFT,
        boi_token_index=SOI, eoi_token_index=EOI,
        text_config=Gemma3TextConfig(**{**TXT, "num_hidden_layers": 2}, hidden_activation="gelu_pytorch_tanh",
                                     sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                     query_pre_attn_scalar=20).to_dict())).eval()
    with torch.no_grad():  # the projector starts at zero: random, or every image would be the same zeros
        for name, p in hf.named_parameters():
            if "norm" in name or "mm_input_projection" in name:
                p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path)
    _tokenizer().save_pretrained(tmp_path)
    model, tokenizer = gemmakit.load(tmp_path)
    ids, pixel_values = _inputs(model, tokenizer, "<start_of_image> and <start_of_image> compare", 2)
    expected = _hf_logits("gemma3", hf, ids, pixel_values)
    assert (model(ids, pixel_values=pixel_values) - expected).abs().max().item() <= 1e-4
    # PaliGemma 2's rule (the group passes the window) would give other logits here.
    model.decoder.config = model.decoder.config.replace(group_bypasses_window=True)
    assert (model(ids, pixel_values=pixel_values) - expected).abs().max().item() > 1e-3
