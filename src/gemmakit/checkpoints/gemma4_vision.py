"""Gemma 4 multimodal directories (``model_type: gemma4`` with a ``vision_config``): the text decoder
of checkpoints/gemma4.py, the vision encoder and the multimodal embedder (models/gemma4_vision.py).

Names as transformers 5.23's Gemma4ForConditionalGeneration saves them: ``model.language_model.*``
(the decoder), ``model.vision_tower.*`` (whose module tree ours mirrors) and
``model.embed_vision.embedding_projection.weight``. An audio tower (``audio_config``,
``model.audio_tower.*`` and ``model.embed_audio.*``) is read with checkpoints/hf_audio.py's names;
its clip ranges are optional (a range the file lacks clips nothing). The soft-token budget comes from ``processor_config.json`` / ``preprocessor_config.json``
(``max_soft_tokens``, else ``image_seq_length``) when the directory has them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from gemmakit.checkpoints import gemma4
from gemmakit.checkpoints.base import Checkpoint
from gemmakit.checkpoints.hf_audio import gemma4_audio_config_from_hf, gemma4_audio_name
from gemmakit.checkpoints.hf_vision import multimodal_checkpoint, prefix_finder
from gemmakit.checkpoints.safetensors import _PREFIXES, _ShardedFiles
from gemmakit.errors import CheckpointError, UnsupportedModelError
from gemmakit.models.gemma4_vision import (Gemma4MultimodalConfig, Gemma4VisionConfig, UnifiedAudioConfig,
                                           UnifiedVisionConfig)

_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.")
_EMBED_PREFIXES = ("model.embed_vision.", "embed_vision.")
# transformers' Gemma4Config defaults
IMAGE_TOKEN, BOI, EOI, VIDEO_TOKEN = 258_880, 255_999, 258_882, 258_884
AUDIO_TOKEN, BOA, EOA = 258_881, 256_000, 258_883


def is_gemma4_vision(raw: dict[str, Any]) -> bool:
    return raw.get("model_type") in ("gemma4", "gemma4_unified") and isinstance(raw.get("vision_config"), dict)


def unified_vision_config_from_hf(raw: dict[str, Any], source: str = "config.json") -> UnifiedVisionConfig:
    """The 12B's encoder-free image embedding from a Gemma4UnifiedVisionConfig dict."""
    try:
        config = UnifiedVisionConfig(
            mm_embed_dim=int(raw.get("mm_embed_dim", 3840)), mm_posemb_size=int(raw.get("mm_posemb_size", 1120)),
            patch_size=int(raw.get("patch_size", 16)), pooling_kernel_size=int(raw.get("pooling_kernel_size", 3)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)))
        projected = int(raw.get("output_proj_dims", config.mm_embed_dim))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: invalid vision_config ({exc})") from None
    if projected != config.mm_embed_dim:  # the embedder projects what the patch projection gives
        raise CheckpointError(f"{source}: vision_config.output_proj_dims {projected} differs from mm_embed_dim "
                              f"{config.mm_embed_dim}")
    return config


def vision_config_from_hf(raw: dict[str, Any], source: str = "config.json") -> Gemma4VisionConfig:
    """Our encoder config from a transformers Gemma4VisionConfig dict."""
    rope = raw.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise UnsupportedModelError(f"{source}: vision RoPE {rope['rope_type']!r} is not supported (only axial)")
    if raw.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh" or raw.get("attention_bias"):
        raise UnsupportedModelError(f"{source}: the vision encoder must use gelu_pytorch_tanh without attention biases")
    try:
        heads = int(raw.get("num_attention_heads", 12))
        return Gemma4VisionConfig(
            hidden_size=int(raw.get("hidden_size", 768)), intermediate_size=int(raw.get("intermediate_size", 3072)),
            num_layers=int(raw.get("num_hidden_layers", 16)), num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=int(raw.get("head_dim", 64)),
            patch_size=int(raw.get("patch_size", 16)),
            position_embedding_size=int(raw.get("position_embedding_size", 10 * 1024)),
            pooling_kernel_size=int(raw.get("pooling_kernel_size", 3)),
            rope_theta=float(rope.get("rope_theta", 100.0)), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            use_clipped_linears=bool(raw.get("use_clipped_linears", False)),
            standardize=bool(raw.get("standardize", False)))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: invalid vision_config ({exc})") from None


def multimodal_config_from_hf(raw: dict[str, Any], source: str = "config.json",
                              max_soft_tokens: int | None = None) -> Gemma4MultimodalConfig:
    text_raw = gemma4.text_config(raw)
    name = str(raw.get("_name_or_path") or "gemma4")
    unified = raw.get("model_type") == "gemma4_unified"
    text = gemma4.config_from_hf(text_raw, source).replace(name=name)
    if unified:  # each image's (or frame's) run attends both ways on every layer, past the window too
        # (transformers' Gemma4UnifiedModel.forward: block_sequence_ids OR-ed into both masks)
        text = text.replace(group_layer_kinds=("global", "local"), group_bypasses_window=True)
        vision = unified_vision_config_from_hf(raw["vision_config"], source)
    else:  # on sliding-window layers only (create_masks_for_vision_model); global layers stay causal
        text = text.replace(group_layer_kinds=("local",))
        vision = vision_config_from_hf(raw["vision_config"], source)
    video = raw.get("video_token_id", VIDEO_TOKEN)
    audio = None
    if isinstance(raw.get("audio_config"), dict):
        audio = (UnifiedAudioConfig(frame_samples=int(raw["audio_config"].get("audio_embed_dim", 640)),
                                    text_hidden_size=text.hidden_size,
                                    rms_norm_eps=float(raw["audio_config"].get("rms_norm_eps", 1e-6)))
                 if unified else gemma4_audio_config_from_hf(raw, source))
    try:
        return Gemma4MultimodalConfig(
            text=text, vision=vision,
            image_token_id=int(raw.get("image_token_id", IMAGE_TOKEN)), boi_token_id=int(raw.get("boi_token_id", BOI)),
            eoi_token_id=int(raw.get("eoi_token_id", EOI)), video_token_id=None if video is None else int(video),
            pad_token_id=int(text_raw.get("pad_token_id") or 0),
            bidirectional_images=text_raw.get("use_bidirectional_attention", "vision" if unified else None) == "vision",
            max_soft_tokens=int(max_soft_tokens or 280), name=name, audio=audio,
            audio_token_id=None if audio is None else int(raw.get("audio_token_id") or AUDIO_TOKEN),
            boa_token_id=None if audio is None else int(raw.get("boa_token_id") or BOA),
            # transformers' config spells this one eoa_token_index
            eoa_token_id=None if audio is None else int(raw.get("eoa_token_id") or raw.get("eoa_token_index") or EOA))
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def processor_budget(directory: Path) -> int | None:
    """The image processor's ``max_soft_tokens`` saved beside the model, if any."""
    for file in ("processor_config.json", "preprocessor_config.json"):
        path = directory / file
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read it ({exc})") from None
        if not isinstance(raw, dict):
            continue
        image = raw.get("image_processor") if isinstance(raw.get("image_processor"), dict) else raw
        value = image.get("max_soft_tokens", raw.get("image_seq_length"))
        if value is not None:
            return int(value)
    return None


_UNIFIED_VISION = ("patch_ln1.weight", "patch_ln1.bias", "patch_dense.weight", "patch_dense.bias", "patch_ln2.weight",
                   "patch_ln2.bias", "pos_embedding", "pos_norm.weight", "pos_norm.bias")


def unified_names(config: Gemma4MultimodalConfig, available) -> dict[str, str]:
    """Our names of the 12B's image (and audio) embedders -> the file's. Saved files hold them as
    ``model.vision_embedder.*`` and ``model.embed_vision.embedding_projection``; the model in memory
    as ``model.embed_vision.*`` with the projection under ``multimodal_embedder.``: both are read."""
    saved = "model.vision_embedder.patch_dense.weight" in available
    vision, projection = (("model.vision_embedder.", "model.embed_vision.") if saved else
                          ("model.embed_vision.", "model.embed_vision.multimodal_embedder."))
    out = {f"vision.{n}": vision + n for n in _UNIFIED_VISION}
    out["embed_vision.embedding_projection.weight"] = projection + "embedding_projection.weight"
    if config.audio is not None:
        out["audio_tower.embedding_projection.weight"] = "model.embed_audio.embedding_projection.weight"
    return out


def vision_names(config: Gemma4MultimodalConfig, vision_prefix: str, embed_prefix: str) -> dict[str, str]:
    """Our names of the encoder and embedder -> the transformers names (the module trees match)."""
    v = config.vision
    names = {"vision.patch_embedder.input_proj.weight": "patch_embedder.input_proj.weight",
             "vision.patch_embedder.position_embedding_table": "patch_embedder.position_embedding_table"}
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    for i in range(v.num_layers):
        layer = f"encoder.layers.{i}."
        for part in projections:
            names[f"vision.{layer}{part}.linear.weight"] = f"{layer}{part}.linear.weight"
            if v.use_clipped_linears:
                for bound in ("input_min", "input_max", "output_min", "output_max"):
                    names[f"vision.{layer}{part}.{bound}"] = f"{layer}{part}.{bound}"
        for norm in ("self_attn.q_norm", "self_attn.k_norm", "input_layernorm", "post_attention_layernorm",
                     "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            names[f"vision.{layer}{norm}.weight"] = f"{layer}{norm}.weight"
    if v.standardize:
        names["vision.std_bias"], names["vision.std_scale"] = "std_bias", "std_scale"
    out = {ours: vision_prefix + theirs for ours, theirs in names.items()}
    out["embed_vision.embedding_projection.weight"] = embed_prefix + "embedding_projection.weight"
    return out


def open_gemma4_vision_directory(directory: Path, raw: dict[str, Any]) -> Checkpoint:
    config = multimodal_config_from_hf(raw, str(directory / "config.json"), processor_budget(directory))
    files = _ShardedFiles(directory)
    available = files.names()
    find = prefix_finder(directory, available)

    text_mapping = gemma4.hf_names(config.text, find(_PREFIXES, "embed_tokens.weight"))
    mapping = {f"decoder.{ours}": theirs for ours, theirs in text_mapping.items()}
    if isinstance(config.vision, UnifiedVisionConfig):
        mapping.update(unified_names(config, available))
    else:
        mapping.update(vision_names(config, find(_VISION_PREFIXES, "patch_embedder.input_proj.weight"),
                                    find(_EMBED_PREFIXES, "embedding_projection.weight")))
    if config.audio is not None and not isinstance(config.audio, UnifiedAudioConfig):  # (the 12B's: unified_names)
        mapping.update({f"audio_tower.{ours}": name for name in sorted(available)
                        if (ours := gemma4_audio_name(name)) is not None})
    return multimodal_checkpoint(directory, config, files, mapping, text_mapping, available, file_names=mapping)


def text_decoder_checkpoint(checkpoint: Checkpoint) -> Checkpoint:
    """A Gemma 4 multimodal checkpoint's text decoder alone (what ``convert`` writes); any other as it is."""
    if not isinstance(checkpoint.config, Gemma4MultimodalConfig):
        return checkpoint

    def text(names):
        return {ours.removeprefix("decoder."): v for ours, v in names.items() if ours.startswith("decoder.")}

    config = checkpoint.config.text.replace(group_layer_kinds=("global", "local"))  # no images: no groups
    return dataclasses.replace(checkpoint, config=config, tensors=text(checkpoint.tensors),
                               file_names=text(checkpoint.file_names), packed=text(checkpoint.packed))
