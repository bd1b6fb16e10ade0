"""Video files for Gemma 4: the frames a prompt takes, decoded by PyAV (FFmpeg's libraries).

A video is a file path, the bytes of a file (any container and codec FFmpeg reads: MP4, WebM,
MKV, AVI, ...), or frames already decoded (``[T, H, W, 3]`` uint8, at 24 frames a second unless
told). :func:`load_video` takes ``num_frames`` (32) frames spread evenly over the video's frame
count, as transformers' video processor samples them, keeping only those in memory; each frame's
time is its index over the stream's average frame rate. What happens to the frames next is
gemmakit.vision.gemma4_preprocess's (``frame_inputs``).
"""

from __future__ import annotations

import importlib
import io
from pathlib import Path
from typing import Union

import numpy as np

from gemmakit.errors import InvalidRequestError

VideoSource = Union[str, Path, bytes, np.ndarray]
DEFAULT_FPS = 24.0  # what the reference processor assumes for frames without metadata


def sample_frames(total: int, num_frames: int | None = 32) -> list[int]:
    """Indices of ``num_frames`` frames spread evenly over ``total`` (all of them when fewer, or None)."""
    if total <= 0:
        raise InvalidRequestError("the video has no frames")
    n = total if num_frames is None else min(num_frames, total)
    return [i * total // n for i in range(n)]


def _av():
    try:
        return importlib.import_module("av")
    except ImportError:
        raise InvalidRequestError("video input needs the 'av' package (PyAV): pip install 'gemmakit[video]'") from None


def load_video(source: VideoSource, num_frames: int | None = 32,
               fps: float | None = None) -> tuple[np.ndarray, list[float]]:
    """``(frames [F, H, W, 3] uint8, each frame's time in seconds)`` of the ``num_frames`` frames
    taken evenly from ``source`` (None: every frame). ``fps`` is for decoded frames (default 24)."""
    if isinstance(source, np.ndarray):
        if source.ndim != 4 or source.shape[-1] != 3 or source.dtype != np.uint8:
            raise InvalidRequestError(f"video frames must be [T, H, W, 3] uint8, got {source.shape} {source.dtype}")
        indices = sample_frames(len(source), num_frames)
        return np.ascontiguousarray(source[indices]), [i / (fps or DEFAULT_FPS) for i in indices]
    return _reading(source, lambda av: _decode(av, source, num_frames))


def probe_video(source: VideoSource) -> None:
    """Check that ``source`` opens as a video with a video stream, without decoding it."""
    if not isinstance(source, np.ndarray):
        _reading(source, lambda av: _decode(av, source, 0))


def _reading(source, read):
    av = _av()
    what = "video bytes" if isinstance(source, bytes) else f"video file {str(source)!r}"
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise InvalidRequestError(f"cannot read {what}: no such file")
    try:
        return read(av)
    except av.FFmpegError as exc:
        raise InvalidRequestError(f"cannot read {what}: {exc.strerror or type(exc).__name__}") from None
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"cannot read {what}: {exc}") from None


def _decode(av, source, num_frames: int | None) -> tuple[np.ndarray, list[float]] | None:
    """The sampled frames and times; with ``num_frames`` 0, only the checks."""
    def opened():
        return av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))

    with opened() as container:
        if not container.streams.video:
            raise InvalidRequestError("the file has no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate) if stream.average_rate else DEFAULT_FPS
        total = stream.frames  # from the container; 0 where it does not say
    if num_frames == 0:
        return None
    if not total:
        total = _pick(opened, [])[1]
    indices = sample_frames(total, num_frames)
    frames, count = _pick(opened, indices)
    if len(frames) < len(indices):  # the container's count was wrong: sample the frames it holds
        indices = sample_frames(count, num_frames)
        frames, _ = _pick(opened, indices)
    return np.stack([frames[i] for i in indices]), [i / rate for i in indices]


def _pick(opened, indices: list[int]) -> tuple[dict[int, np.ndarray], int]:
    """The frames at ``indices`` (RGB), decoding the stream once; and how many frames it has."""
    wanted, frames, count = set(indices), {}, 0
    with opened() as container:
        for count, frame in enumerate(container.decode(video=0), start=1):
            if count - 1 in wanted:
                frames[count - 1] = frame.to_ndarray(format="rgb24")
    return frames, count
