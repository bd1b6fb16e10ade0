"""Gemma 4's image preprocessing and prompt layout, equal to transformers' Gemma4ImageProcessor
(its Pillow backend) and Gemma4Processor.

Unlike PaliGemma and Gemma 3 an image is not squashed to a square: it is resized (bicubic),
keeping its aspect ratio, to the largest size whose sides are multiples of ``kernel * patch``
(3 x 16 = 48 px) with at most ``max_soft_tokens * kernel^2`` patches; bytes are scaled by 1/255
and not normalised (the encoder maps [0, 1] to [-1, 1] itself). The image is cut into 16x16 patches
(row-major, each flattened as [row, column, channel]) with their (x, y) grid positions, and padded
to the budget with zero patches at position (-1, -1). Each image becomes ``patches / kernel^2``
soft tokens, placed in the prompt as ``<boi>`` + that many image tokens + ``<eoi>``.

A video is a list of frames (decoded by the caller), of which ``num_frames`` (32) are taken evenly
(frame ``i * total // n``); each is an image of ``max_soft_tokens`` (70) soft tokens, resized by
torch's antialiased bicubic on the uint8 frame (as torchvision does on the CPU) and scaled by
dividing by 255. The prompt writes each frame as ``mm:ss <boi>`` + its video tokens + ``<eoi>``,
the frames joined by spaces, the time being the frame's index over the video's fps (24 if unknown).

Sources: transformers 5.23 ``models/gemma4`` (image_processing_pil_gemma4.py:
get_aspect_ratio_preserving_size, convert_image_to_patches, pad_along_first_dim, _preprocess;
video_processing_gemma4.py; processing_gemma4.py: replace_image_token, replace_video_token),
``video_utils.py`` (default_sample_indices_fn) and torchvision's v2 ``resize_image`` (the native
uint8 bicubic path on the CPU).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gemmakit.errors import InvalidRequestError, TokenizerError
from gemmakit.models.gemma4_vision import SOFT_TOKEN_BUDGETS, Gemma4ImagePrompt, UnifiedAudioConfig, UnifiedVisionConfig
from gemmakit.vision.preprocess import ImageSource, load_image
from gemmakit.vision.video import load_video


def target_size(height: int, width: int, patch_size: int, max_patches: int, kernel: int) -> tuple[int, int]:
    """(height, width) in pixels: the largest multiples of ``kernel * patch_size`` near the image's
    aspect ratio with at most ``max_patches`` patches. A side too thin to keep one cell gets one,
    and the other side its whole-number aspect ratio in cells (capped at the budget's)."""
    cell = kernel * patch_size
    factor = math.sqrt(max_patches * patch_size**2 / (height * width))
    h, w = int(math.floor(factor * height / cell)) * cell, int(math.floor(factor * width / cell)) * cell
    if h == 0 and w == 0:
        raise InvalidRequestError(f"a {width}x{height} image cannot be resized to a whole {cell}-pixel cell")
    longest = (max_patches // kernel**2) * cell
    if h == 0:
        h, w = cell, min(int(math.floor(width / height)) * cell, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * cell, longest), cell
    if h * w > max_patches * patch_size**2:
        raise InvalidRequestError(f"a {width}x{height} image does not fit {max_patches} patches of {patch_size} px")
    return h, w


def image_patches(image: Image.Image, patch_size: int = 16, max_soft_tokens: int = 280,
                  kernel: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """One RGB image -> patches ``[P, patch^2 * 3]`` float32 in [0, 1] and positions ``[P, 2]`` (x, y)."""
    h, w = target_size(image.height, image.width, patch_size, max_soft_tokens * kernel**2, kernel)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), resample=Image.Resampling.BICUBIC)  # uint8, as the reference
    x = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32)  # [H, W, 3]
    rows, cols = h // patch_size, w // patch_size
    patches = x.reshape(rows, patch_size, cols, patch_size, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return patches, np.stack([xs.ravel(), ys.ravel()], axis=-1)


def preprocess(images: list[ImageSource], max_soft_tokens: int = 280, patch_size: int = 16,
               kernel: int = 3, merged: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Images -> ``pixel_values [N, max_soft_tokens * kernel^2, patch^2 * 3]``, their positions
    ``[N, ..., 2]`` (-1 = padding) and each image's number of soft tokens. ``merged`` (the 12B's
    processor): resized as video frames are, one ``kernel * patch``-pixel patch a soft token,
    ``[N, max_soft_tokens, (kernel * patch)^2 * 3]``."""
    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise InvalidRequestError(f"max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {max_soft_tokens}")
    if merged:
        parts = [frame_inputs(np.asarray(load_image(s))[None], [0.0], max_soft_tokens, patch_size, kernel, True)
                 for s in images]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), [p[2] for p in parts]
    budget = max_soft_tokens * kernel**2
    pixels = np.zeros((len(images), budget, 3 * patch_size**2), dtype=np.float32)
    positions = np.full((len(images), budget, 2), -1, dtype=np.int64)
    tokens = []
    for i, source in enumerate(images):
        patches, pos = image_patches(load_image(source), patch_size, max_soft_tokens, kernel)
        pixels[i, : len(patches)], positions[i, : len(pos)] = patches, pos
        tokens.append(len(patches) // kernel**2)
    return torch.from_numpy(pixels), torch.from_numpy(positions), tokens


def spec_for(config) -> dict:
    """``preprocess``'s keyword arguments for a :class:`~gemmakit.models.gemma4_vision.Gemma4MultimodalConfig`."""
    return {"max_soft_tokens": config.max_soft_tokens, "patch_size": config.vision.patch_size,
            "kernel": config.vision.pooling_kernel_size, "merged": isinstance(config.vision, UnifiedVisionConfig)}


def expand_image_tokens(ids: list[int], config, soft_tokens: list[int]) -> list[int]:
    """Replace the i-th ``image_token_id`` in ``ids`` by ``boi``, ``soft_tokens[i]`` image tokens, ``eoi``."""
    marks = [i for i, t in enumerate(ids) if t == config.image_token_id]
    if len(marks) != len(soft_tokens):
        raise InvalidRequestError(f"the prompt marks {len(marks)} image(s) but {len(soft_tokens)} image(s) were given")
    out: list[int] = []
    start = 0
    for mark, n in zip(marks, soft_tokens):
        out += ids[start:mark] + [config.boi_token_id] + [config.image_token_id] * n + [config.eoi_token_id]
        start = mark + 1
    return out + ids[start:]


def build_prompt(config, tokenizer, text: str, soft_tokens: list[int]) -> list[int]:
    """Token ids of ``text`` with each image's soft tokens: the text marks images with the image
    token's piece (as the chat template does); without any marker, one per image goes first."""
    try:
        piece = tokenizer.id_to_piece(config.image_token_id)
    except Exception:
        raise TokenizerError(f"the tokenizer has no token {config.image_token_id} (the model's image token)") from None
    if piece not in text:
        text = piece * len(soft_tokens) + text
    ids = tokenizer.encode(text, add_bos=True)
    if ids.count(config.image_token_id) != text.count(piece):
        raise TokenizerError(f"the tokenizer does not encode {piece!r} as the image token {config.image_token_id}; "
                             "is this the model's own tokenizer?")
    return expand_image_tokens(ids, config, soft_tokens)


def build_media_prompt(config, tokenizer, text: str, image_tokens: list[int], audio_tokens: list[int]) -> list[int]:
    """Token ids of ``text`` with each image's and each clip's soft tokens in place.

    ``config`` is a :class:`~gemmakit.models.gemma4_vision.Gemma4MultimodalConfig`; ``image_tokens`` /
    ``audio_tokens`` are the soft-token counts of the images and clips, in prompt order. A prompt
    without audio markers gets one per clip in front, after the images'.
    """
    if audio_tokens:
        if config.audio_token_id is None:
            raise InvalidRequestError("this model has no audio tower; it cannot take audio")
        try:
            piece = tokenizer.id_to_piece(config.audio_token_id)
        except Exception:
            raise TokenizerError(f"the tokenizer has no token {config.audio_token_id} (the model's audio token)") from None
        if piece not in text:
            text = piece * len(audio_tokens) + text
            if image_tokens:  # images first, as build_prompt would have put them
                image = tokenizer.id_to_piece(config.image_token_id)
                if image not in text:
                    text = image * len(image_tokens) + text
        marks = text.count(piece)
    ids = build_prompt(config, tokenizer, text, image_tokens) if image_tokens else tokenizer.encode(text, add_bos=True)
    if not audio_tokens:
        return ids
    if ids.count(config.audio_token_id) != marks:
        raise TokenizerError(f"the tokenizer does not encode {piece!r} as the audio token {config.audio_token_id}; "
                             "is this the model's own tokenizer?")
    from gemmakit.audio.prompt import expand_audio_tokens

    return expand_audio_tokens(ids, config, audio_tokens)


def prepare(model, tokenizer, prompt, images, pan_and_scan: bool = False, audio=None, videos=None):
    """:func:`gemmakit.vision.generate.prepare_vision` for a Gemma 4 multimodal model: ``(model
    for the engine, prompt, engine kwargs)``, every check made before any model work. ``audio``
    (files, bytes or samples) needs the checkpoint's audio tower; ``videos`` (files, bytes or
    frames, gemmakit.vision.video) give 32 frames each at 70 soft tokens a frame."""
    if pan_and_scan:
        raise InvalidRequestError("pan & scan is a Gemma 3 option; Gemma 4 keeps each image's aspect ratio")
    if audio and model.audio_tower is None:
        raise InvalidRequestError("this Gemma 4 checkpoint has no audio tower; it cannot take audio")
    if not images and not audio and not videos:
        return model.decoder, prompt, {}  # without media, the text decoder alone
    if not isinstance(prompt, str):
        raise InvalidRequestError("a prompt with images or audio must be text (their tokens are placed for you)")
    if tokenizer is None:
        raise TokenizerError("this model has no tokenizer; a prompt with images or audio needs one")
    pixels = positions = features = mask = None
    tokens, counts = [], []
    if images:
        pixels, positions, tokens = preprocess(list(images), **spec_for(model.config))
        pixels = pixels.to(model.dtype)
    if audio:
        from gemmakit.audio.prompt import audio_frames, audio_inputs

        if isinstance(model.config.audio, UnifiedAudioConfig):  # the 12B: raw frames, no features
            features, mask, counts = audio_frames(list(audio), model.config.audio.frame_samples)
        else:
            features, mask, counts = audio_inputs(list(audio), num_mel_bins=model.config.audio.num_mel_bins)
    video_values = video_positions = None
    if videos:
        spec = {**spec_for(model.config), "max_soft_tokens": VIDEO_SOFT_TOKENS}
        inputs = [frame_inputs(*load_video(v), **spec) for v in videos]
        video_values = torch.cat([v[0] for v in inputs]).to(model.dtype)
        video_positions = torch.cat([v[1] for v in inputs])
        layout = [(v[2], v[3]) for v in inputs]
        prompt = expand_video_markers(model.config, tokenizer, prompt, layout)
    ids = build_media_prompt(model.config, tokenizer, prompt, tokens, counts)
    if videos:
        check_video_tokens(model.config, tokenizer, ids, layout)
    context = model.config.max_position_embeddings
    if len(ids) >= context:
        raise InvalidRequestError(f"the prompt with its media is {len(ids)} tokens; the model's context is {context}")
    bound = Gemma4ImagePrompt(model, pixels, positions, features, mask, video_values, video_positions)
    return bound, ids, {"prefill_chunk": len(ids)}


VIDEO_SOFT_TOKENS = 70  # Gemma4VideoProcessor's budget a frame


def video_inputs(frames, fps: float | None = None, num_frames: int | None = 32, max_soft_tokens: int = VIDEO_SOFT_TOKENS,
                 patch_size: int = 16, kernel: int = 3, merged: bool = False) -> tuple[torch.Tensor, torch.Tensor, int, list[float]]:
    """A video (a file, its bytes, frames ``[T, H, W, 3]`` uint8 or a list of RGB images) ->
    ``pixel_values [F, budget, patch^2 * 3]``, positions ``[F, budget, 2]``, soft tokens per frame and
    each frame's time in seconds; ``num_frames`` None keeps every frame."""
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(load_image(f)) for f in frames])
    taken, times = load_video(frames, num_frames, fps)
    return frame_inputs(taken, times, max_soft_tokens, patch_size, kernel, merged)


def frame_inputs(frames: np.ndarray, times: list[float], max_soft_tokens: int = VIDEO_SOFT_TOKENS, patch_size: int = 16,
                 kernel: int = 3, merged: bool = False) -> tuple[torch.Tensor, torch.Tensor, int, list[float]]:
    """:func:`video_inputs` of the frames already taken (``[F, H, W, 3]`` uint8) at ``times``;
    ``merged``: one ``kernel * patch``-pixel patch a soft token (see :func:`preprocess`)."""
    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise InvalidRequestError(f"max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {max_soft_tokens}")
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # [F, 3, H, W] uint8
    budget = max_soft_tokens * kernel**2
    h, w = target_size(video.shape[2], video.shape[3], patch_size, budget, kernel)
    if (h, w) != tuple(video.shape[2:]):
        video = F.interpolate(video, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    x = video.float() / 255  # [F, 3, h, w]
    step, slots = (patch_size * kernel, max_soft_tokens) if merged else (patch_size, budget)
    rows, cols = h // step, w // step
    patches = x.reshape(len(x), 3, rows, step, cols, step).permute(0, 2, 4, 3, 5, 1)
    pixels = torch.zeros(len(x), slots, 3 * step**2)
    pixels[:, : rows * cols] = patches.reshape(len(x), rows * cols, -1)
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    positions = torch.full((len(x), slots, 2), -1, dtype=torch.long)
    positions[:, : rows * cols] = torch.stack([xs.flatten(), ys.flatten()], -1)
    return pixels, positions, rows * cols // (1 if merged else kernel**2), list(times)


def video_text(config, tokenizer, tokens_per_frame: int, timestamps: list[float]) -> str:
    """What replaces a video's marker in the prompt: ``mm:ss <boi><video>...<eoi>`` per frame."""
    boi, eoi, video = (tokenizer.id_to_piece(config.boi_token_id), tokenizer.id_to_piece(config.eoi_token_id),
                       tokenizer.id_to_piece(config.video_token_id))
    return " ".join(f"{int(t // 60):02d}:{int(t % 60):02d} {boi}{video * tokens_per_frame}{eoi}" for t in timestamps)


def build_video_prompt(config, tokenizer, text: str, videos: list[tuple[int, list[float]]],
                       soft_tokens: list[int] = ()) -> list[int]:
    """Token ids of ``text`` whose video markers (the video token's piece) stand for ``videos``
    (``(tokens_per_frame, timestamps)`` each) and whose image markers for images of ``soft_tokens``."""
    text = expand_video_markers(config, tokenizer, text, videos)
    ids = build_prompt(config, tokenizer, text, list(soft_tokens)) if soft_tokens else tokenizer.encode(text, add_bos=True)
    check_video_tokens(config, tokenizer, ids, videos)
    return ids


def expand_video_markers(config, tokenizer, text: str, videos: list[tuple[int, list[float]]]) -> str:
    """``text`` with each video marker (the video token's piece; one per video in front where it
    has none) replaced by its frames' text (:func:`video_text`)."""
    if config.video_token_id is None:
        raise InvalidRequestError("this model's config names no video token; it cannot take video")
    piece = tokenizer.id_to_piece(config.video_token_id)
    if text.count(piece) != len(videos):
        if piece in text:
            raise InvalidRequestError(f"the prompt marks {text.count(piece)} video(s) but {len(videos)} were given")
        text = piece * len(videos) + text
    parts = text.split(piece)
    return parts[0] + "".join(video_text(config, tokenizer, n, times) + rest
                              for (n, times), rest in zip(videos, parts[1:]))


def check_video_tokens(config, tokenizer, ids: list[int], videos: list[tuple[int, list[float]]]) -> None:
    if ids.count(config.video_token_id) != sum(n * len(times) for n, times in videos):
        raise TokenizerError(f"the tokenizer does not encode {tokenizer.id_to_piece(config.video_token_id)!r} "
                             f"as the video token {config.video_token_id}; is this the model's own tokenizer?")
