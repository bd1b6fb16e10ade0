"""Hugging Face vision-language directories: PaliGemmaForConditionalGeneration (PaliGemma 1 and 2),
Gemma3ForConditionalGeneration (Gemma 3 4B/12B/27B with its SigLIP tower) and
Gemma3nForConditionalGeneration (its MobileNet-v5 tower: checkpoints/gemma3n_vision.py).

The decoder's names come from :mod:`gemmakit.checkpoints.safetensors`; this module adds the vision
tower and the projector, in both the layout transformers >= 4.52 saves (``model.vision_tower...``)
and the one the hub checkpoints were published in (``vision_tower...``, ``language_model.model...``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gemmakit.checkpoints import gemma3n_vision
from gemmakit.checkpoints.base import Checkpoint, TensorLoader, half_precision_matrices
from gemmakit.checkpoints.safetensors import _PREFIXES, _ShardedFiles, config_from_hf, header_of, hf_names
from gemmakit.errors import CheckpointError, UnsupportedModelError
from gemmakit.models.multimodal import (GEMMA3_BOI, GEMMA3_EOI, GEMMA3_IMAGE_TOKEN, PALIGEMMA_IMAGE_TOKEN,
                                        MultimodalConfig)
from gemmakit.models.siglip import SiglipConfig
from gemmakit.tokenizer import Tokenizer

VISION_MODEL_TYPES = ("paligemma", "gemma3")
_VISION_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
                    "vision_tower.")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def is_vision_config(raw: dict[str, Any]) -> bool:
    if gemma3n_vision.is_gemma3n_vision(raw):
        return True
    return raw.get("model_type") in VISION_MODEL_TYPES and isinstance(raw.get("vision_config"), dict)


def siglip_config_from_hf(raw: dict[str, Any], source: str) -> SiglipConfig:
    try:
        return SiglipConfig(
            image_size=int(raw.get("image_size", 224)), patch_size=int(raw.get("patch_size", 16)),
            hidden_size=int(raw.get("hidden_size", 768)), intermediate_size=int(raw.get("intermediate_size", 3072)),
            num_layers=int(raw.get("num_hidden_layers", 12)), num_heads=int(raw.get("num_attention_heads", 12)),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-6)), num_channels=int(raw.get("num_channels", 3)))
    except ValueError as exc:
        raise CheckpointError(f"{source}: invalid vision_config ({exc})") from None


def multimodal_config_from_hf(raw: dict[str, Any], source: str = "config.json") -> MultimodalConfig:
    kind = raw["model_type"]
    vision_raw = raw["vision_config"]
    if vision_raw.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise UnsupportedModelError(f"{source}: vision tower {vision_raw.get('model_type')!r} is not SigLIP")
    # An attention-pooling head, if the file has one, is never used: the decoder takes every patch.
    vision = siglip_config_from_hf(vision_raw, source)
    text_raw = dict(raw.get("text_config") or {})
    name = str(raw.get("_name_or_path") or kind)
    if kind == "paligemma":
        text_raw.setdefault("model_type", "gemma")
        text = config_from_hf(text_raw, source).replace(group_bypasses_window=True, name=name)
        return MultimodalConfig(
            text=text, vision=vision, layout="paligemma", projector="linear", image_attention="prefix",
            tokens_per_image=vision.num_patches, position_offset=1, name=name,
            image_token_id=int(raw.get("image_token_id", raw.get("image_token_index", PALIGEMMA_IMAGE_TOKEN))))
    text_raw["model_type"] = "gemma3_text"
    text = config_from_hf(text_raw, source).replace(name=name)
    return MultimodalConfig(
        text=text, vision=vision, layout="gemma3", projector="pooled_rmsnorm", image_attention="per_image",
        tokens_per_image=int(raw.get("mm_tokens_per_image", 256)), name=name,
        image_token_id=int(raw.get("image_token_id", raw.get("image_token_index", GEMMA3_IMAGE_TOKEN))),
        boi_token_id=int(raw.get("boi_token_id", raw.get("boi_token_index", GEMMA3_BOI))),
        eoi_token_id=int(raw.get("eoi_token_id", raw.get("eoi_token_index", GEMMA3_EOI))))


def vision_names(config: MultimodalConfig, vision_prefix: str, projector_prefix: str) -> dict[str, str]:
    """Our names of the vision tower and projector -> the transformers names."""
    v = vision_prefix
    names = {"vision.patch_embedding.weight": f"{v}embeddings.patch_embedding.weight",
             "vision.patch_embedding.bias": f"{v}embeddings.patch_embedding.bias",
             "vision.position_embedding.weight": f"{v}embeddings.position_embedding.weight",
             "vision.post_layernorm.weight": f"{v}post_layernorm.weight",
             "vision.post_layernorm.bias": f"{v}post_layernorm.bias"}
    for i in range(config.vision.num_layers):
        for part in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            for t in ("weight", "bias"):
                names[f"vision.layers.{i}.{part}.{t}"] = f"{v}encoder.layers.{i}.{part}.{t}"
    p = projector_prefix
    if config.projector == "linear":
        names["projector.linear.weight"] = f"{p}linear.weight"
        names["projector.linear.bias"] = f"{p}linear.bias"
    else:
        names["projector.weight"] = f"{p}mm_input_projection_weight"
        names["projector.norm.weight"] = f"{p}mm_soft_emb_norm.weight"
    return names


def preprocessor_config(directory: Path) -> dict[str, Any] | None:
    """``preprocessor_config.json`` of the directory, or None without one."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return raw


def image_normalisation(directory: Path) -> dict[str, tuple[float, float, float]]:
    """The image processor's ``image_mean`` / ``image_std`` from ``preprocessor_config.json``, if the
    directory has one (the config's defaults, 0.5, otherwise); ``do_normalize: false`` is mean 0, std 1."""
    raw = preprocessor_config(directory)
    path = directory / "preprocessor_config.json"
    if raw is None:
        return {}
    if raw.get("do_normalize") is False:
        return {"image_mean": (0.0, 0.0, 0.0), "image_std": (1.0, 1.0, 1.0)}
    found = {}
    for key in ("image_mean", "image_std"):
        value = raw.get(key)
        if value is None:
            continue
        values = [value] * 3 if isinstance(value, (int, float)) else value
        if not (isinstance(values, list) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values)):
            raise CheckpointError(f"{path}: {key} must be a number or three, got {value!r}")
        found[key] = tuple(float(v) for v in values)
    return found


def open_hf_vision_directory(directory: Path, raw: dict[str, Any]) -> Checkpoint:
    source = str(directory / "config.json")
    files = _ShardedFiles(directory)
    available = files.names()
    with_audio = False
    if gemma3n_vision.is_gemma3n_vision(raw):
        preprocessor = preprocessor_config(directory)
        with_audio = gemma3n_vision.has_audio_tower(available)
        config = gemma3n_vision.multimodal_config_from_hf(raw, source, preprocessor or {}, with_audio)
        if preprocessor is not None:  # a SiglipImageProcessor: its defaults where the file is silent
            defaults = {"image_mean": (0.5,) * 3, "image_std": (0.5,) * 3}
            config = config.replace(**{**defaults, **image_normalisation(directory)})
    else:
        config = multimodal_config_from_hf(raw, source).replace(**image_normalisation(directory))
    find = prefix_finder(directory, available)
    text_prefix = find(_PREFIXES, "embed_tokens.weight")
    text_mapping = hf_names(config.text, text_prefix)
    if config.projector == "embedder":
        vision_mapping = gemma3n_vision.vision_names(available, str(directory), with_audio)
    else:
        vision_mapping = vision_names(config, find(_VISION_PREFIXES, "embeddings.patch_embedding.weight"),
                                      find(_PROJECTOR_PREFIXES, "linear.weight" if config.projector == "linear"
                                           else "mm_input_projection_weight"))
    mapping = {f"decoder.{ours}": theirs for ours, theirs in text_mapping.items()}
    mapping.update(vision_mapping)
    return multimodal_checkpoint(directory, config, files, mapping, text_mapping, available)


def prefix_finder(directory: Path, available):
    """``find(prefixes, probe)``: the first of ``prefixes`` under which the checkpoint has ``probe``."""
    def find(prefixes: tuple[str, ...], probe: str) -> str:
        for p in prefixes:
            if p + probe in available:
                return p
        raise CheckpointError(f"{directory}: no {probe} under any known prefix {prefixes}")
    return find


def multimodal_checkpoint(directory: Path, config, files, mapping: dict[str, str], text_mapping: dict[str, str],
                          available, file_names: dict[str, str] | None = None) -> Checkpoint:
    """The checkpoint of a decoder (``decoder.*`` in ``mapping``, its own names in ``text_mapping``)
    with encoders beside it, every tensor of ``mapping`` (ours -> the file's) present in ``available``."""
    missing = [theirs for theirs in mapping.values() if theirs not in available]
    if missing:
        raise CheckpointError(f"{directory}: missing tensors {', '.join(missing[:3])}"
                              + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    tensors: dict[str, TensorLoader] = {ours: (lambda n=theirs: files.get(n)) for ours, theirs in mapping.items()}
    # the language decoder's 16-bit matrices may stay as stored (see half_precision_matrices); the
    # encoders and projectors keep the float path
    text_tensors = {ours: tensors[f"decoder.{ours}"] for ours in text_mapping}
    packed = {f"decoder.{ours}": load for ours, load in
              half_precision_matrices(config.text, text_tensors, header_of(files, text_mapping)).items()}
    return Checkpoint(config=config, tensors=tensors, source=str(directory),
                      tokenizer=Tokenizer.from_directory(directory), metadata={"format": "safetensors"},
                      packed=packed, file_names=file_names or {})
