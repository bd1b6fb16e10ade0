"""Gemma 3n's vision in Hugging Face layout (``Gemma3nForConditionalGeneration``): the config of the
MobileNet-v5 tower and the embedders, and their tensor names. The directory is opened by
:mod:`gemmakit.checkpoints.hf_vision`; the decoder is :mod:`gemmakit.checkpoints.gemma3n`'s.

Facts from transformers 5.23's ``models/gemma3n`` (configuration_gemma3n.py, modeling_gemma3n.py,
processing_gemma3n.py) and ``models/auto/image_processing_auto.py``:
  - ``vision_config`` is a timm architecture name plus ``model_args`` for ``timm.create_model``; its
    tensors sit under ``model.vision_tower.timm_model.`` with timm's own names;
  - ``model.embed_vision`` and ``model.embed_audio`` are the embedders (the RMSNorm after the
    projection has no weight); the audio tower (``model.audio_tower.``, names in
    checkpoints/hf_audio.py) is read with ``model.embed_audio`` when the file holds it;
  - a clip enters as ``\\n\\n<start_of_audio>`` + ``audio_soft_tokens_per_image`` x ``audio_token_id`` +
    ``<end_of_audio>\\n\\n`` where the text has the audio token's piece;
  - images enter as ``\\n\\n<start_of_image>`` + ``vision_soft_tokens_per_image`` x ``image_token_id`` +
    ``<end_of_image>\\n\\n`` (Gemma 3's layout) and attend causally (the decoder builds plain causal
    and sliding masks; token_type_ids are unused);
  - the image processor is SiglipImageProcessor; Gemma 3n's tower wants [0, 1] pixels (timm's
    ``mobilenetv5_300m_enc`` config: mean 0, std 1, 768 px), so without a ``preprocessor_config.json``
    saying otherwise nothing is normalised.
"""

from __future__ import annotations

from typing import Any

from gemmakit.checkpoints import gemma3n
from gemmakit.checkpoints.hf_audio import gemma3n_audio_config_from_hf, gemma3n_audio_name
from gemmakit.errors import CheckpointError, UnsupportedModelError
from gemmakit.models.mobilenet import EmbedderConfig, MobileNetConfig, timm_module
from gemmakit.models.multimodal import MultimodalConfig

TOWER_PREFIX = "model.vision_tower.timm_model."
_EMBEDDER_NAMES = ("embedding.weight", "hard_embedding_norm.weight", "soft_embedding_norm.weight",
                   "embedding_projection.weight")
_DEFAULTS = {"image_token_id": 262_145, "boi_token_id": 255_999, "eoi_token_id": 262_144}  # Gemma3nConfig's
_AUDIO_DEFAULTS = {"audio_token_id": 262_273, "boa_token_id": 256_000, "eoa_token_id": 262_272}
AUDIO_PREFIX = "model.audio_tower."


def is_gemma3n_vision(raw: dict[str, Any]) -> bool:
    """A Gemma 3n checkpoint with its vision tower, and timm to build it. Without timm the directory
    opens as its text decoder alone (checkpoints/safetensors.py), as before vision was supported."""
    return raw.get("model_type") == "gemma3n" and isinstance(raw.get("vision_config"), dict) and timm_available()


def timm_available() -> bool:
    try:
        timm_module()
    except UnsupportedModelError:
        return False
    return True


def multimodal_config_from_hf(raw: dict[str, Any], source: str, preprocessor: dict[str, Any],
                              with_audio: bool = False) -> MultimodalConfig:
    """Our config of a ``gemma3n`` config.json; ``preprocessor`` is its preprocessor_config.json (or {});
    ``with_audio``: the file holds the audio tower, which the config then describes."""
    v, a = raw["vision_config"], raw.get("audio_config") or {}
    try:
        size = preprocessor.get("size") or {}
        image_size = int(size.get("height", 768)) if isinstance(size, dict) else int(size)
        if isinstance(size, dict) and int(size.get("width", image_size)) != image_size:
            raise CheckpointError(f"{source}: the image processor's size must be square, got {size}")
        args = v.get("model_args") or {}
        if not isinstance(args, dict):
            raise CheckpointError(f"{source}: vision_config.model_args must be an object, got {args!r}")
        vision = MobileNetConfig(
            architecture=str(v.get("architecture", "mobilenetv5_300m_enc")), model_args=tuple(sorted(args.items())),
            hidden_size=int(v.get("hidden_size", 2048)), image_size=image_size,
            vocab_size=int(v.get("vocab_size", 128)), vocab_offset=int(v.get("vocab_offset", 262_144)),
            rms_norm_eps=float(v.get("rms_norm_eps", 1e-6)))
        # Gemma3nAudioConfig's defaults: width 1536, 128 ids from 262272
        audio = EmbedderConfig(hidden_size=int(a.get("hidden_size", 1536)), vocab_size=int(a.get("vocab_size", 128)),
                               vocab_offset=int(a.get("vocab_offset", 262_272)),
                               rms_norm_eps=float(a.get("rms_norm_eps", 1e-6)))
        resample = preprocessor.get("resample", 3 if preprocessor else None)  # SiglipImageProcessor's: bicubic
        if resample not in (None, 0, 1, 2, 3, 4, 5):  # PIL's filters
            raise CheckpointError(f"{source}: the image processor's resample must be one of PIL's filters 0-5, "
                                  f"got {resample!r}")
        tokens = int(raw.get("vision_soft_tokens_per_image", 256))
        defaults = {**_DEFAULTS, **(_AUDIO_DEFAULTS if with_audio else {})}
        ids = {key: int(raw.get(key) if raw.get(key) is not None else default) for key, default in defaults.items()}
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    text = gemma3n.config_from_hf(gemma3n.text_config(raw), source)
    name = str(raw.get("_name_or_path") or "gemma3n")
    return MultimodalConfig(
        text=text.replace(name=name), vision=vision, layout="gemma3", projector="embedder",
        image_attention="causal", tokens_per_image=tokens, name=name, image_mean=(0.0, 0.0, 0.0),
        image_std=(1.0, 1.0, 1.0), image_resample=resample, audio_embedder=audio,
        audio=gemma3n_audio_config_from_hf(raw, source) if with_audio else None, **ids)


def has_audio_tower(available: set[str] | frozenset[str]) -> bool:
    return any(n.startswith(AUDIO_PREFIX) for n in available)


def vision_names(available: set[str] | frozenset[str], source: str, with_audio: bool = False) -> dict[str, str]:
    """Our names of the tower and both embedders -> the file's: every tensor under the tower's
    prefix keeps timm's name (the model built from the config says which it needs); ``with_audio``
    adds the audio tower, whose embedder is ``model.embed_audio``."""
    names = {f"vision.timm_model.{n[len(TOWER_PREFIX):]}": n for n in available if n.startswith(TOWER_PREFIX)}
    if not names:
        raise CheckpointError(f"{source}: no vision tower tensors under {TOWER_PREFIX}")
    names.update({f"projector.{n}": f"model.embed_vision.{n}" for n in _EMBEDDER_NAMES})
    if with_audio:
        names.update({f"audio_tower.{ours}": n for n in sorted(available) if (ours := gemma3n_audio_name(n))})
    else:
        names.update({f"audio_embedder.{n}": f"model.embed_audio.{n}" for n in _EMBEDDER_NAMES})
    return names
