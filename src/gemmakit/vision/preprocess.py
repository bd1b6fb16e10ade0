"""Image loading and preprocessing with Pillow, equal to the official processors' output.

PaliGemma uses SiglipImageProcessor (bicubic resize), Gemma 3 uses Gemma3ImageProcessor (bilinear
resize, optional pan & scan); both squash the image to a square ``size`` x ``size`` (no crop, no
padding), scale bytes by 1/255 and normalise with the processor's mean and std per channel (0.5 and
0.5 on every published model, giving [-1, 1]). Transparency is
composited onto white, and the EXIF orientation tag is applied when a file is opened, so a phone
photo is seen the right way up.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gemmakit.errors import InvalidRequestError

ImageSource = Union[str, Path, bytes, Image.Image]


@dataclass(frozen=True)
class ImageSpec:
    """How one model wants its images: the processor's numbers."""

    size: int
    resample: Image.Resampling
    mean: float | tuple[float, ...] = 0.5  # one for all channels, or one per RGB channel
    std: float | tuple[float, ...] = 0.5
    rescale: float = 1 / 255


def spec_for(config) -> ImageSpec:
    """The processor settings of a :class:`~gemmakit.models.multimodal.MultimodalConfig`."""
    resample = Image.Resampling.BICUBIC if config.layout == "paligemma" else Image.Resampling.BILINEAR
    if config.image_resample is not None:
        resample = Image.Resampling(config.image_resample)
    return ImageSpec(size=config.vision.image_size, resample=resample, mean=tuple(config.image_mean),
                     std=tuple(config.image_std))


def load_image(source: ImageSource) -> Image.Image:
    """Open a path, raw bytes or a PIL image as RGB, honouring EXIF orientation.

    Every failure is an :class:`InvalidRequestError` naming the image, raised before any model work.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    name = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        if isinstance(source, bytes):
            image = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.exists():
                raise InvalidRequestError(f"image not found: {path}")
            if not path.is_file():
                raise InvalidRequestError(f"{path}: not a file")
            image = Image.open(path)
        image.load()  # decode now, so a truncated file fails here and not in the middle of a run
        image = ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise InvalidRequestError(f"{name}: not an image file Pillow can read (PNG, JPEG, WebP, GIF, BMP, TIFF...)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequestError(f"{name}: cannot read image ({exc})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as the reference processors do)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def pixel_values(image: Image.Image, spec: ImageSpec) -> torch.Tensor:
    """One RGB image -> normalised ``[3, size, size]`` float32."""
    resized = image.resize((spec.size, spec.size), resample=spec.resample)  # uint8, as the reference
    x = (np.asarray(resized, dtype=np.float64) * spec.rescale).astype(np.float32)  # [H, W, 3]
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def pan_and_scan(image: Image.Image, min_crop_size: int = 256, max_crops: int = 4,
                 min_ratio: float = 1.2) -> list[Image.Image]:
    """Gemma 3's pan & scan: split a wide or tall image into 2..max_crops equal crops along its long side.

    Returns no crops for near-square images (aspect ratio below ``min_ratio``) or when a crop would
    be smaller than ``min_crop_size``. The numbers are the Gemma 3 processor's defaults [g3, sec. 2.1].
    """
    width, height = image.size
    long, short = (width, height) if width >= height else (height, width)
    if long / short < min_ratio:
        return []
    n = int(math.floor(long / short + 0.5))  # round half up
    n = max(2, min(int(math.floor(long / min_crop_size)), n))
    n = min(max_crops, n)
    crops_w, crops_h = (n, 1) if width >= height else (1, n)
    crop_w, crop_h = int(math.ceil(width / crops_w)), int(math.ceil(height / crops_h))
    if min(crop_w, crop_h) < min_crop_size:
        return []
    return [image.crop((x, y, min(x + crop_w, width), min(y + crop_h, height)))
            for y in range(0, crop_h * crops_h, crop_h) for x in range(0, crop_w * crops_w, crop_w)]


def preprocess(images: list[ImageSource], spec: ImageSpec, do_pan_and_scan: bool = False,
               ) -> tuple[torch.Tensor, list[int]]:
    """Images -> ``pixel_values [N, 3, size, size]`` and the number of crops added after each image.

    With pan & scan each image is followed by its crops, which the prompt gives their own image
    tokens (see gemmakit.vision.prompt).
    """
    tensors: list[torch.Tensor] = []
    crops: list[int] = []
    for source in images:
        image = load_image(source)
        extra = pan_and_scan(image) if do_pan_and_scan else []
        tensors += [pixel_values(im, spec) for im in [image, *extra]]
        crops.append(len(extra))
    return torch.stack(tensors), crops
