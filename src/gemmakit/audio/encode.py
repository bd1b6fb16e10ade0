"""Audio clips to the soft tokens a Gemma 4 or Gemma 3n decoder reads in place of audio placeholders.

:func:`audio_soft_tokens` takes files (or bytes, or samples), reads each at 16 kHz
(:mod:`.io`), takes its log-mel features alone (:mod:`.features`), runs the padded batch through
the audio tower (models/gemma4_audio.py, models/gemma3n_audio.py) and returns each clip's tokens:
as many as its audio gives for Gemma 4 (one per 40 ms), always ``soft_tokens`` (188) for Gemma 3n,
whose prompts reserve that many placeholders per clip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from gemmakit.audio.features import GEMMA3N_AUDIO, GEMMA4_AUDIO, MelSpec, log_mel, spec_from_hf, stack_features
from gemmakit.audio.io import AudioSource, load_audio
from gemmakit.errors import CheckpointError
from gemmakit.models.gemma3n_audio import Gemma3nAudioTower
from gemmakit.models.gemma4_audio import Gemma4AudioTower, soft_tokens_per_clip


def default_spec(tower: Gemma4AudioTower | Gemma3nAudioTower) -> MelSpec:
    spec = GEMMA3N_AUDIO if isinstance(tower, Gemma3nAudioTower) else GEMMA4_AUDIO
    return spec.replace(num_mel_bins=tower.config.num_mel_bins)


def spec_for(directory: str | Path, tower: Gemma4AudioTower | Gemma3nAudioTower) -> MelSpec:
    """The feature settings a checkpoint directory's ``preprocessor_config.json`` (or the
    ``feature_extractor`` part of its ``processor_config.json``) gives, else the family's defaults."""
    family = "gemma3n" if isinstance(tower, Gemma3nAudioTower) else "gemma4"
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(directory) / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read ({exc})") from None
        if "feature_size" in raw.get("feature_extractor", raw):
            return spec_from_hf(raw, family)
    return default_spec(tower)


@torch.no_grad()
def audio_soft_tokens(tower: Gemma4AudioTower | Gemma3nAudioTower, sources: Sequence[AudioSource],
                      spec: MelSpec | None = None) -> list[torch.Tensor]:
    """Each clip's soft tokens ``[n_i, text_hidden]``, in the tower's dtype and device."""
    spec = spec or default_spec(tower)
    clips = [log_mel([load_audio(s, spec.sampling_rate)], spec) for s in sources]
    feats, mask = stack_features(clips)
    param = next(tower.parameters())
    feats, mask = feats.to(param.device, param.dtype), mask.to(param.device)
    if isinstance(tower, Gemma3nAudioTower):
        return list(tower.prompt_tokens(feats, mask).unbind(0))
    return soft_tokens_per_clip(*tower(feats, mask))


def gemma4_soft_token_count(num_samples: int, spec: MelSpec = GEMMA4_AUDIO) -> int:
    """How many soft tokens (audio placeholders) Gemma 4 gives a clip of ``num_samples`` samples at
    ``spec.sampling_rate``, without computing them: its whole frames, then two halvings that round
    up. Clips are cut to ``spec.max_samples`` first (30 s: 750 tokens)."""
    if spec.max_samples:
        num_samples = min(num_samples, spec.max_samples)
    pad = spec.frame_length // 2 if spec.semicausal else 0
    frames = (num_samples + pad - spec.frame_length - 1) // spec.hop_length + 1  # frames of real samples only
    if frames <= 0:
        return 0
    for _ in range(2):
        frames = -(-frames // 2)
    return frames
