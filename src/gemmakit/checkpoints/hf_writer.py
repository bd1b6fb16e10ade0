"""Hugging Face checkpoint directories, written: config.json, safetensors shards (+ index), tokenizer.

The one writer behind ``gemmakit convert``, the training exports (``finetune --merge``, ``distill``)
and RecurrentGemma's export. The output is what transformers itself would save for
GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3nForCausalLM, Gemma4ForCausalLM or
RecurrentGemmaForCausalLM:
``config.json`` (older-style keys that transformers 4.x and 5.x both read, checked to read back as
the same model), ``model.safetensors`` (or numbered shards plus an index) under transformers'
tensor names, and the tokenizer files. Tensors are taken one at a time into shards of bounded
size, so peak memory is one shard, not the model; the directory appears only when complete
(:func:`gemmakit.io.atomic_directory`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gemmakit.checkpoints import gemma3n, gemma4, recurrent_gemma
from gemmakit.checkpoints.safetensors import config_from_hf
from gemmakit.errors import InvalidRequestError, UnsupportedModelError
from gemmakit.io import atomic_directory
from gemmakit.models.config import ModelConfig, alternating

ARCHITECTURES = {"gemma": ("gemma", "GemmaForCausalLM"), "gemma2": ("gemma2", "Gemma2ForCausalLM"),
                 "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
DEFAULT_SHARD_BYTES = 5 * 1024**3  # transformers' own default max_shard_size ("5GB")


def write_hf_directory(destination: str | Path, config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                       tokenizer=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``tensors`` ((transformers name, tensor) pairs, consumed one at a time), the config.json of
    ``config`` and ``tokenizer``'s files as the directory ``destination``, replacing it if it exists
    (callers that must not replace anything check first); returns its path."""
    destination = Path(destination)
    with atomic_directory(destination) as tmp:
        written_dtype = _write_shards(tmp, tensors, max_shard_bytes)
        special = ({"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                    "pad_token_id": tokenizer.pad_id} if tokenizer is not None else None)
        raw = hf_config(config, written_dtype, special)
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return destination


def save_recurrent_gemma(model, out_dir: str | Path, tokenizer=None) -> Path:
    """Write a recurrent ``model`` as a transformers RecurrentGemmaForCausalLM directory (never over an
    existing one), atomically: a failure never leaves a half-written model behind."""
    config: ModelConfig = model.config
    if config.family != "recurrentgemma":
        raise UnsupportedModelError(f"save_recurrent_gemma writes RecurrentGemma models, not {config.family!r}")
    out = Path(out_dir)
    if out.exists():
        raise InvalidRequestError(f"{out} already exists; choose a new output directory")
    params = dict(model.named_parameters())
    tensors = ((theirs, recurrent_gemma.to_hf_tensor(ours, params[ours].detach().cpu()))
               for ours, theirs in recurrent_gemma.hf_names(config).items())
    return write_hf_directory(out, config, tensors, tokenizer)


def hf_config(config: ModelConfig, dtype: torch.dtype, special_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """The transformers ``config.json`` dict of ``config``; checked to read back as the same model."""
    ids = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, **(special_ids or {})}
    if config.family == "recurrentgemma":
        out = {**recurrent_gemma.to_hf_config(config), **ids, "torch_dtype": str(dtype).removeprefix("torch.")}
        _check_round_trip(config, out)
        return out
    adapter = {"gemma4": gemma4, "gemma3n": gemma3n}.get(config.family)
    if adapter is not None:
        out = {**adapter.to_hf_config(config), **ids, "dtype": str(dtype).removeprefix("torch.")}
        _check_round_trip(config, out)
        return out
    model_type, architecture = ARCHITECTURES[config.family]
    out = {
        "architectures": [architecture], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "tie_word_embeddings": True, "use_cache": True, **ids,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config.family == "gemma":
        out["hidden_act"] = "gelu_pytorch_tanh"
    else:
        kinds = {"local": "sliding_attention", "global": "full_attention"}
        out.update(query_pre_attn_scalar=config.query_pre_attn_scalar, sliding_window=config.sliding_window,
                   layer_types=[kinds[k] for k in config.layer_kinds],
                   attn_logit_softcapping=config.attn_logit_softcap,
                   final_logit_softcapping=config.final_logit_softcap)
        if config.query_pre_attn_scalar == int(config.query_pre_attn_scalar):
            out["query_pre_attn_scalar"] = int(config.query_pre_attn_scalar)
    if config.family == "gemma2":
        out["cache_implementation"] = "hybrid"
    if config.family == "gemma3":
        out["rope_local_base_freq"] = config.rope_local_theta
        out["rope_scaling"] = ({"rope_type": "linear", "factor": config.rope_scaling_factor}
                               if config.rope_scaling_factor != 1.0 else None)
        period = next((p for p in range(2, config.num_layers + 2)
                       if alternating(config.num_layers, p) == config.layer_kinds), None)
        if period is not None:  # for transformers versions that predate layer_types
            out["sliding_window_pattern"] = period
    if config.sliding_window is None:
        out.pop("sliding_window", None)
    _check_round_trip(config, out)
    return out


def _check_round_trip(config: ModelConfig, raw: dict[str, Any]) -> None:
    """Refuse to write a config.json that transformers would read as a different model."""
    back = config_from_hf(raw)
    ignore = ("name", "extra")
    mismatched = [f for f in config.__dataclass_fields__ if f not in ignore
                  and getattr(back, f) != getattr(config, f)]
    if mismatched:
        raise UnsupportedModelError(
            f"this {config.family} model cannot be written as a transformers {raw['model_type']} config "
            f"without changing it ({', '.join(mismatched)} would differ)")


def _write_shards(directory: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> torch.dtype:
    """Stream tensors into safetensors shards; returns the dtype most bytes were written in."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes, total, by_dtype = 0, 0, {}
    files: list[tuple[Path, list[str]]] = []

    def flush() -> None:
        file = directory / f"shard-{len(files)}.tmp"
        save_file(shards[-1], str(file), metadata={"format": "pt"})
        files.append((file, list(shards[-1])))
        shards[-1] = {}

    for name, tensor in tensors:
        tensor = tensor.contiguous()
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            flush()
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
        total += size
        by_dtype[tensor.dtype] = by_dtype.get(tensor.dtype, 0) + size
    flush()
    if len(files) == 1:
        files[0][0].rename(directory / "model.safetensors")
    else:
        weight_map = {}
        for i, (file, keys) in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            file.rename(directory / final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return max(by_dtype, key=by_dtype.get)
