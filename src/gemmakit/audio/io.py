"""Reading audio files: WAV, FLAC, OGG/Vorbis and the other formats libsndfile decodes, as 16 kHz mono.

Decoding is libsndfile's (through the ``soundfile`` package) and resampling is libsoxr's (the
``soxr`` package, its "high quality" setting), both well-kept C libraries with wheels for every
platform, so gemmakit carries no codec or filter code of its own. Several channels are averaged
into one. Both packages come with ``pip install 'gemmakit[audio]'``.
"""

from __future__ import annotations

import importlib
import io
from pathlib import Path
from types import ModuleType
from typing import Union

import numpy as np

from gemmakit.errors import InvalidRequestError

AudioSource = Union[str, Path, bytes, np.ndarray]

SAMPLING_RATE = 16_000  # what Gemma 4's and Gemma 3n's feature extractors expect


def _require(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise InvalidRequestError(f"audio input needs the {name!r} package: pip install 'gemmakit[audio]'") from None


def resample(samples: np.ndarray, from_rate: int, to_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Mono ``samples`` ``[T]`` at ``from_rate`` Hz, resampled to ``to_rate`` Hz (float32)."""
    if from_rate <= 0 or to_rate <= 0:
        raise InvalidRequestError(f"sampling rates must be positive, got {from_rate} -> {to_rate}")
    samples = np.asarray(samples, dtype=np.float32)
    if from_rate == to_rate:
        return samples
    return _require("soxr").resample(samples, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def load_audio(source: AudioSource, sampling_rate: int = SAMPLING_RATE, source_rate: int | None = None) -> np.ndarray:
    """One clip as mono float32 samples ``[T]`` at ``sampling_rate``.

    ``source`` is a file path, the bytes of a file, or samples already decoded (``[T]``, or
    ``[T, channels]``) at ``source_rate`` (``sampling_rate`` when not given).
    """
    if isinstance(source, np.ndarray):
        samples, rate = source.astype(np.float32, copy=False), source_rate or sampling_rate
        what = "audio samples"
    else:
        sf = _require("soundfile")
        what = "audio bytes" if isinstance(source, bytes) else f"audio file {str(source)!r}"
        if isinstance(source, (str, Path)) and not Path(source).is_file():
            raise InvalidRequestError(f"cannot read {what}: no such file")
        try:
            samples, rate = sf.read(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                                    dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            # libsndfile's own words ("Format not recognised."), without the file object's repr
            detail = getattr(exc, "error_string", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
            raise InvalidRequestError(f"cannot read {what}: {detail}") from None
    if samples.ndim == 2:
        samples = samples.mean(axis=1)  # [T, channels] -> [T]
    if samples.ndim != 1 or samples.size == 0:
        raise InvalidRequestError(f"cannot read {what}: no samples (shape {tuple(samples.shape)})")
    if not np.isfinite(samples).all():
        raise InvalidRequestError(f"cannot read {what}: samples are not finite")
    return resample(samples, int(rate), sampling_rate)
