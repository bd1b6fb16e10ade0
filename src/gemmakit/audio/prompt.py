"""Prompts with audio clips: where each clip's soft tokens go, and the clips' features.

Gemma 4's processor puts ``boa``, one ``audio_token_id`` per soft token, then ``eoa`` where the text
has the audio token's piece (``<|audio|>``, as the chat template writes it). Prompts with images and
clips together are built by gemmakit.vision.gemma4_preprocess.build_media_prompt. Gemma 3n's
(``<audio_soft_token>``, a fixed 188 tokens a clip) are built by gemmakit.vision.prompt.build_prompt.
Sources: transformers 5.23 models/gemma4/processing_gemma4.py and models/gemma3n/processing_gemma3n.py
(replace_audio_token).
"""

from __future__ import annotations

from gemmakit.errors import InvalidRequestError


def expand_audio_tokens(ids: list[int], config, soft_tokens: list[int]) -> list[int]:
    """Replace the i-th ``audio_token_id`` of ``ids`` by ``boa``, ``soft_tokens[i]`` audio tokens, ``eoa``."""
    marks = [i for i, t in enumerate(ids) if t == config.audio_token_id]
    if len(marks) != len(soft_tokens):
        raise InvalidRequestError(f"the prompt marks {len(marks)} audio clip(s) but {len(soft_tokens)} were given")
    out: list[int] = []
    start = 0
    for mark, n in zip(marks, soft_tokens):
        out += ids[start:mark] + [config.boa_token_id] + [config.audio_token_id] * n + [config.eoa_token_id]
        start = mark + 1
    return out + ids[start:]


def audio_inputs(sources, spec=None, num_mel_bins: int = 128, tokens_per_clip: int | None = None):
    """``(features [N, T, mels], mask [N, T], soft-token counts)`` of audio files, bytes or samples,
    each read at 16 kHz and featurised alone; every unreadable clip fails here, before model work.
    ``tokens_per_clip``: Gemma 3n's fixed count (and its features); None: Gemma 4's, from each clip's length."""
    from gemmakit.audio.encode import gemma4_soft_token_count
    from gemmakit.audio.features import GEMMA3N_AUDIO, GEMMA4_AUDIO, log_mel, stack_features
    from gemmakit.audio.io import load_audio

    spec = spec or (GEMMA4_AUDIO if tokens_per_clip is None else GEMMA3N_AUDIO).replace(num_mel_bins=num_mel_bins)
    waves = [load_audio(s, spec.sampling_rate) for s in sources]
    counts = ([gemma4_soft_token_count(len(w), spec) for w in waves] if tokens_per_clip is None
              else [tokens_per_clip if len(w) else 0 for w in waves])
    if not all(counts):
        raise InvalidRequestError("an audio clip is too short to give any soft token (under 40 ms)")
    features, mask = stack_features([log_mel([w], spec) for w in waves])
    return features, mask, counts


def audio_frames(sources, frame_samples: int = 640):
    """Gemma 4 12B's audio input: ``(frames [N, T, frame_samples], mask [N, T], frames per clip)`` of
    files, bytes or samples read at 16 kHz; each clip zero-padded to whole frames (its last partial
    frame is real) and the batch to its longest clip, as Gemma4UnifiedAudioFeatureExtractor does."""
    import torch

    from gemmakit.audio.io import load_audio

    waves = [load_audio(s) for s in sources]
    counts = [-(-len(w) // frame_samples) for w in waves]
    frames = torch.zeros(len(waves), max(counts), frame_samples)
    mask = torch.zeros(len(waves), max(counts), dtype=torch.bool)
    for i, (w, n) in enumerate(zip(waves, counts)):
        frames[i].view(-1)[: len(w)] = torch.from_numpy(w)
        mask[i, :n] = True
    return frames, mask, counts
