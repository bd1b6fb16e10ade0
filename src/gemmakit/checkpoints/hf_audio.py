"""Audio towers of Hugging Face Gemma 4 and Gemma 3n directories: config and tensor names.

Gemma4ForConditionalGeneration keeps its audio encoder under ``model.audio_tower.`` and the
projection into the decoder under ``model.embed_audio.``; Gemma3nForConditionalGeneration uses the
same two prefixes with its own layer names. :func:`gemma4_audio_name` and :func:`gemma3n_audio_name`
map each of those names to the one in :mod:`gemmakit.models.gemma4_audio` /
:mod:`gemmakit.models.gemma3n_audio` (None for a name outside the audio tower), and
:func:`load_audio_tower` builds the tower from a directory's ``config.json`` and safetensors files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch

from gemmakit.checkpoints.safetensors import _ShardedFiles
from gemmakit.errors import CheckpointError, UnsupportedModelError
from gemmakit.models.gemma3n_audio import Gemma3nAudioConfig, Gemma3nAudioTower
from gemmakit.models.gemma4_audio import ConformerConfig, Gemma4AudioConfig, Gemma4AudioTower

_TOWER = ("model.audio_tower.", "audio_tower.")
_EMBEDDER = ("model.embed_audio.", "embed_audio.")

# Within one Conformer block: transformers' name -> gemmakit's, for each family.
_GEMMA4_BLOCK = {
    "feed_forward1.": "ffn_start.", "feed_forward2.": "ffn_end.",
    "self_attn.q_proj.": "attn.q.", "self_attn.k_proj.": "attn.k.", "self_attn.v_proj.": "attn.v.",
    "self_attn.post.": "attn.out.", "self_attn.relative_k_proj.": "attn.rel_k.",
    "self_attn.per_dim_scale": "attn.per_dim_scale",
    "norm_pre_attn.": "attn_pre_norm.", "norm_post_attn.": "attn_post_norm.", "norm_out.": "out_norm.",
    "lconv1d.": "conv.",
}
_GEMMA3N_BLOCK = {
    "ffw_layer_start.": "ffn_start.", "ffw_layer_end.": "ffn_end.",
    "attention.pre_attn_norm.": "attn_pre_norm.", "attention.post_norm.": "attn_post_norm.",
    "attention.post.": "attn.out.", "attention.attn.q_proj.": "attn.q.", "attention.attn.k_proj.": "attn.k.",
    "attention.attn.v_proj.": "attn.v.", "attention.attn.relative_position_embedding.pos_proj.": "attn.rel_k.",
    "attention.attn.per_dim_scale": "attn.per_dim_scale", "norm.": "out_norm.", "lconv1d.": "conv.",
}
# Inside the feed-forward and light-convolution sublayers (both families).
_SUBLAYER = {"ffw_layer_1.": "up.", "ffw_layer_2.": "down.", "pre_layer_norm.": "pre_norm.",
             "post_layer_norm.": "post_norm.", "linear_start.": "glu_in.", "linear_end.": "out.",
             "depthwise_conv1d.": "depthwise.", "conv_norm.": "conv_norm."}


def _strip(name: str, prefixes: tuple[str, ...]) -> str | None:
    for p in prefixes:
        if name.startswith(p):
            return name[len(p):]
    return None


def _block_name(rest: str, table: dict[str, str]) -> str | None:
    for theirs, ours in table.items():
        if rest.startswith(theirs):
            rest = ours + rest[len(theirs):]
            break
    else:
        return None
    for theirs, ours in _SUBLAYER.items():
        head, _, tail = rest.partition(".")
        if tail.startswith(theirs):
            rest = f"{head}.{ours}{tail[len(theirs):]}"
            break
    return rest.replace(".linear.weight", ".weight")  # a clipped linear's matrix sits one level down


def _subsampler_name(index: str, part: str) -> str:
    # gemmakit keeps the convolutions and the norms' scales in two lists
    return f"encoder.subsample.convs.{index}.weight" if part == "conv" else f"encoder.subsample.norms.{index}"


def gemma4_audio_name(name: str) -> str | None:
    """The :class:`Gemma4AudioTower` parameter a transformers Gemma 4 tensor name fills."""
    if (rest := _strip(name, _EMBEDDER)) is not None:
        return {"embedding_projection.weight": "embedder.proj.weight"}.get(rest)
    if (rest := _strip(name, _TOWER)) is None:
        return None
    if m := re.fullmatch(r"subsample_conv_projection\.layer([01])\.(conv|norm)\.weight", rest):
        return _subsampler_name(m[1], m[2])
    if rest == "subsample_conv_projection.input_proj_linear.weight":
        return "encoder.subsample.proj.weight"
    if rest in ("output_proj.weight", "output_proj.bias"):
        return f"encoder.{rest}"
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", rest):
        inner = _block_name(m[2], _GEMMA4_BLOCK)
        return None if inner is None else f"encoder.layers.{m[1]}.{inner}"
    return None


def gemma3n_audio_name(name: str) -> str | None:
    """The :class:`Gemma3nAudioTower` parameter a transformers Gemma 3n tensor name fills."""
    if (rest := _strip(name, _EMBEDDER)) is not None:
        return {"embedding.weight": "embedder.embedding.weight",
                "hard_embedding_norm.weight": "embedder.hard_norm.weight",
                "soft_embedding_norm.weight": "embedder.soft_norm.weight",
                "embedding_projection.weight": "embedder.proj.weight"}.get(rest)
    if (rest := _strip(name, _TOWER)) is None:
        return None
    if m := re.fullmatch(r"subsample_conv_projection\.conv_([01])\.(conv|norm)\.weight", rest):
        return _subsampler_name(m[1], m[2])
    if rest == "subsample_conv_projection.input_proj_linear.weight":
        return "encoder.subsample.proj.weight"
    if m := re.fullmatch(r"conformer\.(\d+)\.(.+)", rest):
        inner = _block_name(m[2], _GEMMA3N_BLOCK)
        return None if inner is None else f"encoder.layers.{m[1]}.{inner}"
    return None


def _number(raw: dict[str, Any], key: str, default: Any, source: str) -> Any:
    value = raw.get(key, default)
    if value is None:
        return default
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: audio_config.{key} is {value!r}") from None


def gemma4_audio_config_from_hf(raw: dict[str, Any], source: str = "config.json") -> Gemma4AudioConfig:
    """The audio tower a Gemma 4 ``config.json`` (with ``audio_config``) describes."""
    a, text = raw.get("audio_config"), raw.get("text_config") or {}
    if not isinstance(a, dict):
        raise UnsupportedModelError(f"{source}: this Gemma 4 checkpoint has no audio tower (no audio_config)")
    act = a.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"{source}: audio activation {act!r} is not supported (silu only)")
    n = lambda key, default: _number(a, key, default, source)  # noqa: E731
    try:
        conformer = ConformerConfig(
            hidden_size=n("hidden_size", 1024), num_layers=n("num_hidden_layers", 12),
            num_heads=n("num_attention_heads", 8), conv_kernel_size=n("conv_kernel_size", 5),
            residual_weight=n("residual_weight", 0.5), chunk_size=n("attention_chunk_size", 12),
            context_left=n("attention_context_left", 13), context_right=n("attention_context_right", 0),
            logit_cap=n("attention_logit_cap", 50.0), rms_norm_eps=n("rms_norm_eps", 1e-6),
            gradient_clipping=n("gradient_clipping", 1e10), masked_logit=n("attention_invalid_logits_value", -1e9),
            clipped_linears=bool(a.get("use_clipped_linears", True)))
    except ValueError as exc:
        raise CheckpointError(f"{source}: invalid audio_config ({exc})") from None
    channels = tuple(int(c) for c in a.get("subsampling_conv_channels", (128, 32)))
    # transformers sizes the subsampler's projection for as many mel bins as first-layer channels
    return Gemma4AudioConfig(conformer=conformer, num_mel_bins=channels[0], conv_channels=channels,
                             output_size=n("output_proj_dims", 1536),
                             text_hidden_size=int(text.get("hidden_size", 1536)), eps=n("rms_norm_eps", 1e-6))


def gemma3n_audio_config_from_hf(raw: dict[str, Any], source: str = "config.json") -> Gemma3nAudioConfig:
    """The audio tower a Gemma 3n ``config.json`` (with ``audio_config``) describes."""
    a, text = raw.get("audio_config"), raw.get("text_config") or {}
    if not isinstance(a, dict):
        raise UnsupportedModelError(f"{source}: this Gemma 3n checkpoint has no audio tower (no audio_config)")
    n = lambda key, default: _number(a, key, default, source)  # noqa: E731
    try:
        conformer = ConformerConfig(
            hidden_size=n("hidden_size", 1536), num_layers=n("conf_num_hidden_layers", 12),
            num_heads=n("conf_num_attention_heads", 8), conv_kernel_size=n("conf_conv_kernel_size", 5),
            residual_weight=n("conf_residual_weight", 0.5), chunk_size=n("conf_attention_chunk_size", 12),
            context_left=n("conf_attention_context_left", 13), context_right=n("conf_attention_context_right", 0),
            logit_cap=n("conf_attention_logit_cap", 50.0), rms_norm_eps=n("rms_norm_eps", 1e-6),
            gradient_clipping=n("gradient_clipping", 1e10), key_scale=1.0, gemma4_window=False,
            masked_logit=None, mask_conv_input=True, clipped_linears=False)
        vocab, offset = n("vocab_size", 128), n("vocab_offset", 262_144 + 128)
        # Padding takes the embedding of the text vocabulary's last id, the audio vocabulary's last.
        padding = int(text.get("vocab_size", offset + vocab)) - 1 - offset
        if not 0 <= padding < vocab:
            raise CheckpointError(f"{source}: the text vocabulary's last id is not an audio token "
                                  f"(audio ids {offset}..{offset + vocab - 1})")
        pairs = lambda key, default: tuple(tuple(int(v) for v in p) for p in a.get(key, default))  # noqa: E731
        return Gemma3nAudioConfig(
            conformer=conformer, num_mel_bins=n("input_feat_size", 128),
            conv_channels=tuple(int(c) for c in a.get("sscp_conv_channel_size", (128, 32))),
            conv_kernels=pairs("sscp_conv_kernel_size", ((3, 3), (3, 3))),
            conv_strides=pairs("sscp_conv_stride_size", ((2, 2), (2, 2))),
            group_norm_eps=n("sscp_conv_group_norm_eps", 1e-3), reduction_factor=n("conf_reduction_factor", 4),
            vocab_size=vocab, padding_index=padding, text_hidden_size=int(text.get("hidden_size", 2048)),
            eps=n("rms_norm_eps", 1e-6), soft_tokens=int(raw.get("audio_soft_tokens_per_image", 188)))
    except ValueError as exc:
        raise CheckpointError(f"{source}: invalid audio_config ({exc})") from None


_FAMILIES: dict[str, tuple[Callable, type, Callable]] = {
    "gemma4": (gemma4_audio_config_from_hf, Gemma4AudioTower, gemma4_audio_name),
    "gemma3n": (gemma3n_audio_config_from_hf, Gemma3nAudioTower, gemma3n_audio_name),
}


def load_audio_tower(directory: str | Path, dtype: torch.dtype = torch.float32) -> Gemma4AudioTower | Gemma3nAudioTower:
    """The audio encoder and embedder of a Hugging Face Gemma 4 or Gemma 3n directory."""
    directory = Path(directory)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory}: cannot read config.json ({exc})") from None
    family = str(raw.get("model_type", ""))
    if family not in _FAMILIES:
        raise UnsupportedModelError(f"{directory}: model_type {family!r} has no audio tower (gemma4, gemma3n)")
    config_from_hf, tower_class, rename = _FAMILIES[family]
    tower = tower_class(config_from_hf(raw, str(directory / "config.json")))
    files = _ShardedFiles(directory)
    wanted = tower.state_dict()
    found: dict[str, torch.Tensor] = {}
    for name in sorted(files.names()):
        ours = rename(name)
        if ours is None:
            continue
        if ours not in wanted:
            raise CheckpointError(f"{directory}: audio tensor {name} has no place in gemmakit's tower ({ours})")
        tensor = files.get(name)
        if tuple(tensor.shape) != tuple(wanted[ours].shape):
            raise CheckpointError(f"{directory}: {name} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(wanted[ours].shape)}")
        found[ours] = tensor
    # Clip ranges are optional: a checkpoint without them clips nothing.
    missing = sorted(k for k in wanted if k not in found and not k.endswith(("_min", "_max")))
    if missing:
        raise CheckpointError(f"{directory}: audio tower tensors missing: {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    tower.load_state_dict(found, strict=False)
    return tower.to(dtype).eval()
