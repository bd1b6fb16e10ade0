"""Gemma 4 vision: the encoder, its preprocessing and whole multimodal models against transformers.

Tiny random-weight configs (16 px patches, 3x3 pooling, 2 encoder layers, widths 32) are built by
transformers; the encoder is compared on its own with patch grids of several aspect ratios padded
to a budget, the preprocessing on Pillow-drawn images, and whole Gemma4ForConditionalGeneration
models saved with save_pretrained and read back through gemmakit.load.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from gemmakit.checkpoints.gemma4_vision import vision_config_from_hf
from gemmakit.models.gemma4_vision import Gemma4VisionModel, MultimodalEmbedder

transformers = pytest.importorskip("transformers")

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, patch_size=16, position_embedding_size=128, pooling_kernel_size=3)


def picture(kind: int, size: tuple[int, int]) -> Image.Image:
    """A colour gradient with shapes and text, ``size`` = (width, height)."""
    w, h = size
    x = np.zeros((h, w, 3))
    x[..., 0] = np.linspace(0, 255, w)[None]
    x[..., 1] = np.linspace(255 * (kind % 2), 255 * ((kind + 1) % 2), h)[:, None]
    x[..., 2] = 40 * kind
    im = Image.fromarray(x.astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse((w // 8, h // 8, w // 2, h // 2), fill=(250, 30 * kind, 10))
    d.rectangle((w // 2, h // 2, w - 1, h - 1), outline=(0, 0, 255), width=max(1, min(w, h) // 10))
    d.text((4, h - 16), f"img {kind}", fill=(255, 255, 255))
    return im


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial norms and position tables (transformers initialises them to ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


def _padded_grids(grids: list[tuple[int, int]], budget_patches: int, seed: int = 1, patch: int = 16):
    """Random pixels in [0, 1] ``[N, P, 3 * patch^2]`` and positions ``[N, P, 2]`` for (width, height)
    patch grids, padded with zeros / (-1, -1) to ``budget_patches``, as the processor lays them out."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(len(grids), budget_patches, 3 * patch * patch)
    positions = torch.full((len(grids), budget_patches, 2), -1, dtype=torch.long)
    for i, (w, h) in enumerate(grids):
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        positions[i, : w * h] = torch.stack([xs.flatten(), ys.flatten()], -1)
        pixels[i, : w * h] = torch.rand(w * h, 3 * patch * patch, generator=g)
    return pixels, positions


@pytest.fixture(scope="module")
def encoders():
    from transformers import Gemma4TextConfig, Gemma4VisionConfig as HFVisionConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4MultimodalEmbedder, Gemma4VisionModel as HFVision

    hf_config = HFVisionConfig(**VISION, standardize=True)
    hf = HFVision(hf_config).eval()
    embed = Gemma4MultimodalEmbedder(hf_config, Gemma4TextConfig(hidden_size=40)).eval()
    _randomise(hf)
    _randomise(embed, 1)
    with torch.no_grad():  # the standardising buffers are not parameters
        hf.std_bias.copy_(torch.randn(32) * 0.5)
        hf.std_scale.copy_(torch.rand(32) + 0.5)
    ours = Gemma4VisionModel(vision_config_from_hf(hf_config.to_dict()))
    assert ours.config.standardize and ours.config.num_kv_heads == 2
    ours_embed = MultimodalEmbedder(32, 40, 1e-6)
    ours.load_state_dict(hf.state_dict(), strict=True)
    ours_embed.load_state_dict(embed.state_dict(), strict=True)
    return hf, embed, ours.eval(), ours_embed.eval()


@pytest.mark.parametrize("grids, budget", [
    ([(6, 9), (12, 3)], 70),   # tall and wide, padded to a 70-token budget (630 patches)
    ([(9, 9), (15, 6), (3, 21)], 140),  # square, wide and very tall in one padded batch
    ([(30, 21)], 70),  # a full budget: no padding at all
])
def test_encoder_features_match_transformers(encoders, grids, budget):
    hf, embed, ours, ours_embed = encoders
    pixels, positions = _padded_grids(grids, budget * 9)
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, pixel_position_ids=positions).last_hidden_state
        theirs_projected = embed(theirs)
        mine = ours(pixels, positions)
        mine_projected = torch.cat([ours_embed(t) for t in mine])
    assert [t.shape[0] for t in mine] == [w * h // 9 for w, h in grids]
    mine = torch.cat(mine)
    assert mine.shape == theirs.shape
    assert (mine - theirs).abs().max() <= 1e-4 * max(1.0, theirs.abs().max())
    assert (mine_projected - theirs_projected).abs().max() <= 1e-4


SIZES = [(80, 60), (200, 50), (40, 300), (1000, 10), (30, 30), (480, 320)]  # (width, height)


@pytest.mark.parametrize("budget", [70, 140, 280])
def test_preprocessing_matches_transformers(budget):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    from gemmakit.vision.gemma4_preprocess import preprocess

    images = [picture(i, size) for i, size in enumerate(SIZES)]
    theirs = Gemma4ImageProcessorPil(max_soft_tokens=budget)(images, return_tensors="pt")
    pixels, positions, tokens = preprocess(images, max_soft_tokens=budget)
    assert tokens == list(theirs["num_soft_tokens_per_image"])
    assert torch.equal(positions, theirs["image_position_ids"].long())
    assert pixels.shape == theirs["pixel_values"].shape
    assert (pixels - theirs["pixel_values"]).abs().max() <= 1e-6


def test_preprocessing_refuses_an_unknown_budget():
    from gemmakit.errors import InvalidRequestError
    from gemmakit.vision.gemma4_preprocess import preprocess

    with pytest.raises(InvalidRequestError, match="one of"):
        preprocess([picture(0, (64, 64))], max_soft_tokens=100)


IMAGE, BOI, EOI, VIDEO = 299, 300, 301, 302  # vision specials appended to the tiny vocabulary
TEXT = dict(vocab_size=303, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, global_head_dim=32, sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
            hidden_size_per_layer_input=8, vocab_size_per_layer_input=303, max_position_embeddings=512)


@pytest.fixture(scope="module", params=["vision", None])
def pair(request, tmp_path_factory):
    """(transformers model, gemmakit model, its directory) from one tiny Gemma4ForConditionalGeneration; with
    ``use_bidirectional_attention`` "vision" (soft tokens attend both ways on sliding layers) or not."""
    import gemmakit
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    config = Gemma4Config(text_config={**TEXT, "use_bidirectional_attention": request.param},
                          vision_config=VISION, audio_config=None, image_token_id=IMAGE, boi_token_id=BOI,
                          eoi_token_id=EOI, video_token_id=VIDEO)
    torch.manual_seed(0)
    hf = Gemma4ForConditionalGeneration(config).eval()
    _randomise(hf.model.vision_tower, 2)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layer_scalar"):
                p.copy_(torch.rand(p.shape) + 0.5)
    path = tmp_path_factory.mktemp("gemma4-vision")
    hf.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    Gemma4ImageProcessorPil(max_soft_tokens=70).save_pretrained(path)  # the budget prompts get
    model, _ = gemmakit.load(path)
    assert model.config.max_soft_tokens == 70
    return hf, model, path


def _tokenizer():
    from tiny import tiny_vocab

    from gemmakit.tokenizer import Tokenizer, build_model_proto

    pieces, scores, types = tiny_vocab()
    pieces += ["<|image|>", "<|image>", "<image|>", "<|video|>"]
    scores += [0.0] * 4
    types += [3] * 4
    proto = build_model_proto(pieces, scores, types, bos=(2, "<bos>"), eos=(1, "<eos>"), pad=(0, "<pad>"),
                              unk=(3, "<unk>"))
    return Tokenizer._from_proto(proto, source="tiny-gemma4-vision", types=types)


def _prompt(soft_tokens: list[int]) -> list[int]:
    from gemmakit.vision.gemma4_preprocess import expand_image_tokens

    class Ids:  # the config fields expand_image_tokens reads
        image_token_id, boi_token_id, eoi_token_id = IMAGE, BOI, EOI

    text = [2, 17, 40, 5]
    for i in range(len(soft_tokens)):
        text += [IMAGE, 60 + i, 61, 62]
    return expand_image_tokens(text + [99, 100], Ids, soft_tokens)


def _transformers_logits(hf, ids: list[int], pixels, positions) -> torch.Tensor:
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        return hf(input_ids=input_ids, pixel_values=pixels, image_position_ids=positions,
                  mm_token_type_ids=(input_ids == IMAGE).long()).logits[0]


@pytest.mark.parametrize("sizes, budget", [
    ([(80, 60)], 70),
    ([(200, 50), (40, 90)], 70),  # wide and tall: different soft-token counts in one prompt
    ([(60, 60), (150, 40)], 140),
])
def test_logits_match_transformers(pair, sizes, budget):
    from gemmakit.vision.gemma4_preprocess import preprocess

    hf, ours, _ = pair
    pixels, positions, tokens = preprocess([picture(i, s) for i, s in enumerate(sizes)], max_soft_tokens=budget)
    assert len(set(tokens)) == len(tokens)  # the images really differ in size
    ids = _prompt(tokens)
    theirs = _transformers_logits(hf, ids, pixels, positions)
    with torch.no_grad():
        mine = ours(torch.tensor([ids]), pixels, positions)[0]
    assert (mine - theirs).abs().max() <= 1e-4


def test_cached_decoding_after_an_image_prompt_equals_transformers(pair):
    from gemmakit.vision.gemma4_preprocess import preprocess

    hf, ours, _ = pair
    pixels, positions, tokens = preprocess([picture(1, (90, 70)), picture(2, (50, 120))], max_soft_tokens=70)
    ids = _prompt(tokens)
    full = ids + [7, 8, 9]
    theirs = _transformers_logits(hf, full, pixels, positions)
    cache = ours.new_cache(1, len(full))
    with torch.no_grad():
        steps = [ours(torch.tensor([ids]), pixels, positions, cache=cache)[0]]
        steps += [ours(torch.tensor([[t]]), cache=cache)[0] for t in full[len(ids):]]
    assert (torch.cat(steps) - theirs).abs().max() <= 1e-4


def test_image_token_count_must_match_the_images(pair):
    from gemmakit.errors import InvalidRequestError
    from gemmakit.vision.gemma4_preprocess import preprocess

    _, ours, _ = pair
    pixels, positions, tokens = preprocess([picture(0, (80, 60))], max_soft_tokens=70)
    with pytest.raises(InvalidRequestError, match="soft tokens"):
        ours(torch.tensor([_prompt([tokens[0] - 1])]), pixels, positions)
    with pytest.raises(InvalidRequestError, match="no image pixel values"):
        ours(torch.tensor([_prompt(tokens)]))


def test_generate_with_images_equals_transformers_greedy(pair):
    from gemmakit.api import stream_generation
    from gemmakit.vision.gemma4_preprocess import build_prompt, preprocess

    hf, ours, _ = pair
    tokenizer = _tokenizer()
    images = [picture(0, (120, 80)), picture(3, (40, 100))]
    text = "look <|image|> and then <|image|> here"
    result = None
    for _, result in stream_generation(ours, tokenizer, text, max_tokens=6, images=images, stop_ids=frozenset()):
        pass
    pixels, positions, tokens = preprocess(images, max_soft_tokens=ours.config.max_soft_tokens)
    ids = build_prompt(ours.config, tokenizer, text, tokens)
    assert result.prompt_ids == ids
    assert ids.count(BOI) == ids.count(EOI) == 2 and ids.count(IMAGE) == sum(tokens)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        theirs = hf.generate(input_ids=input_ids, pixel_values=pixels, image_position_ids=positions,
                             mm_token_type_ids=(input_ids == IMAGE).long(), max_new_tokens=6, do_sample=False)
    assert result.token_ids == theirs[0, len(ids):].tolist()


def test_prompt_without_markers_puts_the_images_first(pair):
    from gemmakit.vision.gemma4_preprocess import build_prompt

    _, ours, _ = pair
    ids = build_prompt(ours.config, _tokenizer(), "hello", [3, 2])
    assert ids[:10] == [2, BOI, IMAGE, IMAGE, IMAGE, EOI, BOI, IMAGE, IMAGE, EOI]


def _video(frames: int = 7, size: tuple[int, int] = (96, 64)) -> np.ndarray:
    """``[T, H, W, 3]`` uint8: a picture whose shapes move a little every frame."""
    out = []
    for t in range(frames):
        im = picture(t % 4, size)
        ImageDraw.Draw(im).rectangle((4 * t, 2 * t, 4 * t + 12, 2 * t + 9), fill=(20 * t, 200, 90))
        out.append(np.asarray(im))
    return np.stack(out)


def test_frame_sampling_matches_transformers():
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    from gemmakit.vision.video import sample_frames

    for total, n in ((100, 32), (33, 32), (7, 3), (32, 32)):
        theirs = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=24), num_frames=n)
        assert sample_frames(total, n) == theirs.tolist()


def test_video_pixel_values_match_transformers():
    pytest.importorskip("torchvision")  # transformers' Gemma4VideoProcessor resizes with torchvision
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor
    from transformers.video_utils import VideoMetadata

    from gemmakit.vision.gemma4_preprocess import video_inputs

    video = _video(9, (100, 60))
    theirs = Gemma4VideoProcessor(num_frames=4)(
        [video], video_metadata=[VideoMetadata(total_num_frames=9, fps=12)], return_tensors="pt")
    pixels, positions, tokens, times = video_inputs(video, fps=12, num_frames=4)
    assert torch.equal(positions, theirs["video_position_ids"].long())
    assert (pixels - theirs["pixel_values_videos"]).abs().max() <= 1e-6
    assert tokens == theirs["num_soft_tokens_per_video"][0]


def test_video_and_image_logits_match_transformers(pair):
    from gemmakit.vision.gemma4_preprocess import build_video_prompt, preprocess, video_inputs

    hf, ours, _ = pair
    tokenizer = _tokenizer()
    frames, frame_positions, per_frame, times = video_inputs(_video(7), fps=2, num_frames=3)
    assert times == [0.0, 1.0, 2.0] and len(frames) == 3
    pixels, positions, tokens = preprocess([picture(2, (70, 90))], max_soft_tokens=70)
    ids = build_video_prompt(ours.config, tokenizer, "<|image|> then <|video|> so", [(per_frame, times)], tokens)
    assert ids.count(VIDEO) == 3 * per_frame and ids.count(BOI) == 4 and ids.count(IMAGE) == tokens[0]
    input_ids = torch.tensor([ids])
    types = (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
    with torch.no_grad():
        theirs = hf(input_ids=input_ids, pixel_values=pixels, image_position_ids=positions,
                    pixel_values_videos=frames, video_position_ids=frame_positions,
                    num_frames_per_video=torch.tensor([3]), mm_token_type_ids=types).logits[0]
        mine = ours(input_ids, pixels, positions, video_values=frames, video_positions=frame_positions)[0]
    assert (mine - theirs).abs().max() <= 1e-4


def test_convert_writes_the_text_decoder(pair, tmp_path):
    import gemmakit
    from gemmakit.convert import convert

    _, ours, source = pair
    out = convert(source, tmp_path / "text")
    text, _ = gemmakit.load(out)
    ids = torch.tensor([[2, 17, 40, 5, 60, 61, 62, 99]])
    with torch.no_grad():
        assert (text(ids) - ours(ids)).abs().max() <= 1e-5


def test_clipped_linears_match_transformers():
    from transformers import Gemma4VisionConfig as HFVisionConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel as HFVision

    hf_config = HFVisionConfig(**{**VISION, "num_hidden_layers": 1}, use_clipped_linears=True)
    hf = HFVision(hf_config).eval()
    _randomise(hf, 3)
    with torch.no_grad():  # finite bounds that bite (transformers starts them at -inf / inf)
        for name, b in hf.named_buffers():
            if name.endswith(("_min", "_max")):
                b.fill_(-0.5 if name.endswith("_min") else 0.4)
    ours = Gemma4VisionModel(vision_config_from_hf(hf_config.to_dict()))
    ours.load_state_dict(hf.state_dict(), strict=True)
    pixels, positions = _padded_grids([(6, 6), (9, 3)], 70 * 9)
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, pixel_position_ids=positions).last_hidden_state
        mine = torch.cat(ours(pixels, positions))
    assert (mine - theirs).abs().max() <= 1e-4 * max(1.0, theirs.abs().max())
    assert ours.config.num_parameters() == sum(t.numel() for t in hf.state_dict().values())


def test_parameter_count_is_transformers(pair):
    hf, ours, _ = pair
    # the saved tensors (layer_scalar is a buffer there), the tied head once
    theirs = sum(t.numel() for name, t in hf.state_dict().items() if name != "lm_head.weight")
    counted = sum(p.numel() for p in ours.parameters())
    assert (ours.config.num_parameters(), counted) == (theirs, theirs)


def test_served_chat_with_an_image_equals_the_plain_api(pair):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    import base64
    import io

    from live_server import live_server

    from gemmakit.api import stream_generation
    from gemmakit.chat import render_chat
    from gemmakit.serve import build_app

    _, ours, _ = pair
    tokenizer = _tokenizer()
    image = picture(1, (90, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    result = None
    prompt = render_chat([{"role": "user", "content": [{"type": "text", "text": "what is it"}]}])
    for _, result in stream_generation(ours, tokenizer, prompt, max_tokens=5, images=[image], stop_ids=frozenset()):
        pass
    with live_server(build_app(ours, tokenizer, "gemma4", max_batch=2)) as base:
        reply = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": "gemma4", "max_tokens": 5, "temperature": 0, "ignore_eos": True, "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what is it"}]}]}).json()
    assert reply["usage"]["prompt_tokens"] == len(result.prompt_ids)
    assert reply["usage"]["completion_tokens"] == 5
    assert reply["choices"][0]["message"]["content"] == result.text


def test_left_padded_batch_equals_one_by_one(pair):
    from gemmakit.vision.gemma4_preprocess import preprocess

    _, ours, _ = pair
    images = [picture(0, (200, 50)), picture(1, (60, 60)), picture(2, (40, 90))]
    pixels, positions, tokens = preprocess(images, max_soft_tokens=70)
    rows = [_prompt(tokens[:1]), _prompt(tokens[1:])]  # one image, then two
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    pos = torch.stack([torch.arange(T) - (T - len(r)) for r in rows]).clamp(min=-1)
    with torch.no_grad():
        batch = ours(ids, pixels, positions, positions=pos)
        alone = [ours(torch.tensor([rows[0]]), pixels[:1], positions[:1])[0],
                 ours(torch.tensor([rows[1]]), pixels[1:], positions[1:])[0]]
    for i, row in enumerate(rows):
        assert (batch[i, T - len(row):] - alone[i]).abs().max() <= 1e-4


def test_info_reports_the_encoder(pair):
    from gemmakit.info import describe, format_report

    hf, _, path = pair
    report = describe(str(path))
    assert report["vision"]["tower"] == "Gemma 4 ViT" and report["vision"]["layers"] == VISION["num_hidden_layers"]
    assert report["vision"]["tokens_per_image"] == 70  # the processor's budget saved beside the model
    assert report["vision"]["parameters"] == sum(p.numel() for p in hf.model.vision_tower.parameters())
    assert "Gemma 4 ViT / 16, 2 layers x 32, up to 70 tokens per image" in format_report(report)
