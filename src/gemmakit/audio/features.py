"""Log-mel features for Gemma 4's and Gemma 3n's audio encoders, equal to the official extractors.

Both models read 16 kHz mono audio as 128 log-mel bins every 10 ms, computed the way the Universal
Speech Model's front end does: each frame is ``frame_length + 1`` samples (one extra sample feeds
the optional pre-emphasis), Hann-windowed (periodic), zero-padded to a power-of-two FFT, turned into
a magnitude spectrum, projected onto HTK-scale triangular mel filters (no area normalisation), and
logged with a small floor. The two families differ only in numbers and in a few choices:

  ==================  =========================  ===========================
  knob                Gemma 4                    Gemma 3n
  ==================  =========================  ===========================
  frame / FFT         20 ms (320) / 512          32 ms (512) / 1024 (doubled)
  mel band            0 .. 8000 Hz               125 .. 7600 Hz
  pre-emphasis        none                       0.97, HTK flavour
  floor               log(mel + 1e-3)            log(max(mel, 1e-5))
  left padding        frame_length // 2 zeros    none
  frame is valid if   its last sample is audio   its first sample is audio
  padded frames       set to zero                kept as computed
  ==================  =========================  ===========================

A batch is zero-padded to its longest clip rounded up to 128 samples, after each clip is cut to 30 s
(480000 samples); the mask says which frames are real. Everything is computed in float64 and
returned as float32.

Sources:
  [g4]  transformers 5.23, models/gemma4/feature_extraction_gemma4.py (Gemma4AudioFeatureExtractor)
  [g3n] transformers 5.23, models/gemma3n/feature_extraction_gemma3n.py (Gemma3nAudioFeatureExtractor)
  [usm] "Google USM: Scaling Automatic Speech Recognition Beyond 100 Languages" (arXiv 2303.01037)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import torch

from gemmakit.errors import InvalidRequestError

Waveform = Union[np.ndarray, torch.Tensor, Sequence[float]]


@dataclass(frozen=True)
class MelSpec:
    """One model's feature extractor: the numbers of its ``preprocessor_config.json``."""

    sampling_rate: int = 16_000
    num_mel_bins: int = 128
    frame_length_ms: float = 20.0
    hop_length_ms: float = 10.0
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    preemphasis: float = 0.0
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = False
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-3
    floor_by_max: bool = False  # log(max(mel, floor)) instead of log(mel + floor)
    semicausal: bool = True  # frame_length // 2 zeros in front, so the first frame is centred at t = 0
    zero_padded_frames: bool = True  # the features of frames the mask rejects are set to zero
    per_bin_mean: tuple[float, ...] | None = None
    per_bin_stddev: tuple[float, ...] | None = None
    max_samples: int | None = 480_000  # longer clips are cut to this
    pad_to_multiple_of: int = 128

    def replace(self, **changes: Any) -> "MelSpec":
        return dataclasses.replace(self, **changes)

    @property
    def frame_length(self) -> int:
        return int(round(self.sampling_rate * self.frame_length_ms / 1000.0))

    @property
    def hop_length(self) -> int:
        return int(round(self.sampling_rate * self.hop_length_ms / 1000.0))

    @property
    def fft_length(self) -> int:
        n = 2 ** math.ceil(math.log2(self.frame_length))
        return 2 * n if self.fft_overdrive else n


GEMMA4_AUDIO = MelSpec()
GEMMA3N_AUDIO = MelSpec(frame_length_ms=32.0, min_frequency=125.0, max_frequency=7600.0, preemphasis=0.97,
                        fft_overdrive=True, mel_floor=1e-5, floor_by_max=True, semicausal=False,
                        zero_padded_frames=False)

_HF_KEYS = {"sampling_rate": "sampling_rate", "feature_size": "num_mel_bins", "frame_length_ms": "frame_length_ms",
            "hop_length_ms": "hop_length_ms", "min_frequency": "min_frequency", "max_frequency": "max_frequency",
            "preemphasis": "preemphasis", "preemphasis_htk_flavor": "preemphasis_htk_flavor",
            "fft_overdrive": "fft_overdrive", "input_scale_factor": "input_scale_factor", "mel_floor": "mel_floor"}


def spec_from_hf(raw: dict[str, Any], family: str) -> MelSpec:
    """The spec a ``preprocessor_config.json`` (or its ``feature_extractor`` part) describes, on top of
    the defaults of ``family`` ("gemma4" or "gemma3n")."""
    base = {"gemma4": GEMMA4_AUDIO, "gemma3n": GEMMA3N_AUDIO}.get(family)
    if base is None:
        raise ValueError(f"no audio feature extractor for family {family!r}")
    raw = raw.get("feature_extractor", raw)
    if float(raw.get("dither", 0.0)) != 0.0:
        raise InvalidRequestError("audio features with dither are not deterministic; set dither to 0")
    changes: dict[str, Any] = {ours: type(getattr(base, ours))(raw[theirs])
                               for theirs, ours in _HF_KEYS.items() if raw.get(theirs) is not None}
    for key in ("per_bin_mean", "per_bin_stddev"):
        if raw.get(key) is not None:
            changes[key] = tuple(float(v) for v in np.asarray(raw[key], dtype=np.float64).reshape(-1))
    return base.replace(**changes)


def hann_window(length: int) -> torch.Tensor:
    """The periodic Hann window, ``0.5 - 0.5 cos(2 pi n / length)``."""  # [length]
    n = torch.arange(length, dtype=torch.float64)
    return 0.5 - 0.5 * torch.cos(2 * math.pi * n / length)


def mel_filters(spec: MelSpec) -> torch.Tensor:
    """HTK-scale triangular filters on the FFT bins, without area normalisation: ``[bins, mels]``."""
    def to_mel(hz: float | torch.Tensor) -> Any:
        return 2595.0 * (torch.log10(1.0 + hz / 700.0) if torch.is_tensor(hz) else math.log10(1.0 + hz / 700.0))

    bins = spec.fft_length // 2 + 1
    bin_hz = torch.arange(bins, dtype=torch.float64) * (spec.sampling_rate / spec.fft_length)  # [bins]
    mels = torch.linspace(to_mel(spec.min_frequency), to_mel(spec.max_frequency), spec.num_mel_bins + 2,
                          dtype=torch.float64)
    edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)  # [mels + 2], in Hz
    width = edges[1:] - edges[:-1]  # [mels + 1]
    rise = (bin_hz[:, None] - edges[None, :-2]) / width[:-1]  # [bins, mels]
    fall = (edges[None, 2:] - bin_hz[:, None]) / width[1:]
    return torch.clamp(torch.minimum(rise, fall), min=0.0)


def pad_batch(waveforms: Sequence[Waveform], spec: MelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips cut to ``max_samples`` and zero-padded to the longest, rounded up to ``pad_to_multiple_of``:
    samples ``[N, L]`` (float64) and which are real ``[N, L]``."""
    if len(waveforms) == 0:
        raise InvalidRequestError("no audio clips given")
    clips = []
    for i, w in enumerate(waveforms):
        x = torch.as_tensor(np.asarray(w) if not torch.is_tensor(w) else w).to(torch.float64)
        if x.ndim != 1:
            raise InvalidRequestError(f"audio clip {i} has shape {tuple(x.shape)}; expected mono samples [T]")
        if x.numel() == 0:
            raise InvalidRequestError(f"audio clip {i} is empty")
        clips.append(x[: spec.max_samples] if spec.max_samples else x)
    m = spec.pad_to_multiple_of
    length = -(-max(len(c) for c in clips) // m) * m
    samples = torch.zeros(len(clips), length, dtype=torch.float64)
    real = torch.zeros(len(clips), length, dtype=torch.bool)
    for i, c in enumerate(clips):
        samples[i, : len(c)] = c
        real[i, : len(c)] = True
    return samples, real


def log_mel(waveforms: Sequence[Waveform], spec: MelSpec = GEMMA4_AUDIO) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of a batch of mono clips at ``spec.sampling_rate``.

    Returns ``features`` ``[N, frames, num_mel_bins]`` (float32) and ``mask`` ``[N, frames]``
    (True where the frame is real audio), the extractor's ``input_features`` and
    ``input_features_mask``.
    """
    samples, real = pad_batch(waveforms, spec)  # [N, L]
    samples = samples * spec.input_scale_factor
    fl, hop = spec.frame_length, spec.hop_length
    if spec.semicausal:
        samples = torch.nn.functional.pad(samples, (fl // 2, 0))
        real = torch.nn.functional.pad(real, (fl // 2, 0))
    if samples.shape[1] < fl + 1:
        raise InvalidRequestError(f"audio clips of {samples.shape[1]} samples are shorter than one frame ({fl + 1})")
    frames = samples.unfold(1, fl + 1, hop)  # [N, F, fl + 1]
    p = spec.preemphasis
    if p > 0.0 and spec.preemphasis_htk_flavor:
        frames = torch.cat([frames[..., :1] * (1.0 - p), frames[..., 1:-1] - p * frames[..., :-2]], dim=-1)
    elif p > 0.0:
        frames = frames[..., 1:] - p * frames[..., :-1]
    else:
        frames = frames[..., :-1]  # [N, F, fl]
    spectrum = torch.fft.rfft(frames * hann_window(fl), n=spec.fft_length, dim=-1).abs()  # [N, F, bins]
    mel = spectrum @ mel_filters(spec)  # [N, F, mels]
    feats = torch.log(torch.clamp(mel, min=spec.mel_floor) if spec.floor_by_max else mel + spec.mel_floor)
    if spec.per_bin_mean is not None:
        feats = feats - torch.tensor(spec.per_bin_mean, dtype=torch.float64)
    if spec.per_bin_stddev is not None:
        feats = feats / torch.tensor(spec.per_bin_stddev, dtype=torch.float64)
    num_frames = feats.shape[1]
    if spec.semicausal:  # a frame counts when all of its samples are real: look at its last one
        mask = real[:, torch.arange(num_frames) * hop + fl]
    else:  # a frame counts when its first sample is real
        mask = real[:, torch.arange(num_frames) * hop]
    if spec.zero_padded_frames:
        feats = feats * mask[..., None]
    return feats.to(torch.float32), mask


def stack_features(clips: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of clips taken one at a time (each ``log_mel([wave])``: ``[1, T_i, mels]`` and
    ``[1, T_i]``), zero-padded into one batch ``[N, T, mels]`` with its mask ``[N, T]``.

    A batch engine wants this rather than ``log_mel`` of all waveforms at once: Gemma 3n's
    extractor gives a clip in a longer batch a few extra frames (those starting in its last samples
    and running into the padding), so only features taken alone make a clip's tokens independent of
    its batch.
    """
    if not clips:
        raise InvalidRequestError("no audio clips given")
    length = max(f.shape[1] for f, _ in clips)
    feats = torch.zeros(len(clips), length, clips[0][0].shape[-1], dtype=clips[0][0].dtype)
    mask = torch.zeros(len(clips), length, dtype=torch.bool)
    for i, (f, m) in enumerate(clips):
        feats[i, : f.shape[1]] = f[0] * m[0, :, None]
        mask[i, : m.shape[1]] = m[0]
    return feats, mask
