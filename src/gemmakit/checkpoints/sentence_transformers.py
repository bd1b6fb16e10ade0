"""sentence-transformers directories (EmbeddingGemma as its model card ships it).

``modules.json`` lists the pipeline: a ``Transformer`` (a Hugging Face Gemma 3 text model run
bidirectionally, or an EmbeddingGemma 2 text model with its projection, checkpoints/embedding_gemma2.py,
in the directory itself or a sub-folder), then ``Pooling``, any ``Dense``
layers and ``Normalize``, each with its own folder of config (and weights). This adapter reads
that list into an :class:`~gemmakit.models.encoder.EmbeddingConfig` and hands the Transformer's
tensors (under ``decoder.``) and the dense layers' (``dense.N.linear.*``) to the loader; the
prompts come from ``config_sentence_transformers.json``, the longest input from
``sentence_bert_config.json`` (older saves) or the tokenizer's ``model_max_length``, and what
the tokenizer wraps around a text (``<bos>``, ``<eos>``) from its files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gemmakit.checkpoints.base import Checkpoint
from gemmakit.checkpoints.embedding_gemma2 import is_embedding_gemma2, open_embedding_gemma2_directory
from gemmakit.checkpoints.safetensors import (NO_LIMIT, open_hf_directory, read_config_json, special_tokens_added,
                                             tokenizer_max_length)
from gemmakit.errors import CheckpointError, UnsupportedModelError
from gemmakit.models.encoder import ACTIVATIONS, POOLING_MODES, DenseLayer, EmbeddingConfig

# sentence-transformers' older Pooling configs: one boolean per mode (the order it concatenates them)
_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def is_sentence_transformers_directory(path: Path) -> bool:
    return (path / "modules.json").is_file()


def _json(path: Path, default: Any = None) -> Any:
    if not path.is_file():
        if default is not None:
            return default
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None


def open_sentence_transformers_directory(directory: Path) -> Checkpoint:
    modules = _json(directory / "modules.json")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, dict) for m in modules):
        raise CheckpointError(f"{directory / 'modules.json'}: expected a list of modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    folders = [directory / str(m.get("path", "")) for m in modules]
    if kinds[0] != "Transformer":
        raise UnsupportedModelError(f"{directory}: the first sentence-transformers module is {kinds[0]!r}; gemmakit "
                                    "reads pipelines that start with a Transformer (EmbeddingGemma's)")
    raw = read_config_json(folders[0])
    if is_embedding_gemma2(raw):  # its projection is part of the Transformer module: already our names
        inner = open_embedding_gemma2_directory(folders[0], raw)
        decoder, projection = inner.config.decoder, inner.config.projection
        tensors, file_names, packed = dict(inner.tensors), dict(inner.file_names), dict(inner.packed)
    else:
        inner = open_hf_directory(folders[0], raw)
        if not inner.config.bidirectional:
            raise UnsupportedModelError(f"{directory}: the Transformer module is a causal decoder (config.json has "
                                        "no use_bidirectional_attention); gemmakit's embedding models are "
                                        "EmbeddingGemma's bidirectional Gemma 3 and EmbeddingGemma 2")
        decoder, projection = inner.config, None
        tensors = {f"decoder.{ours}": load for ours, load in inner.tensors.items()}
        file_names = {f"decoder.{ours}": theirs for ours, theirs in inner.file_names.items()}
        packed = {f"decoder.{ours}": load for ours, load in inner.packed.items()}
    pooling, include_prompt, normalize = None, True, False
    dense: list[DenseLayer] = []
    for kind, folder in zip(kinds[1:], folders[1:]):
        if normalize:
            raise UnsupportedModelError(f"{directory}: a {kind} module after Normalize is not supported")
        if kind == "Pooling":
            if pooling is not None or dense:
                raise UnsupportedModelError(f"{directory}: one Pooling module, before any Dense, is supported")
            pooling, include_prompt = _pooling(folder)
        elif kind == "Dense":
            if pooling is None:
                raise UnsupportedModelError(f"{directory}: a Dense module before Pooling is not supported")
            layer, weights = _dense(folder, len(dense))
            dense.append(layer)
            tensors.update({f"dense.{len(dense) - 1}.linear.{name}": load for name, load in weights.items()})
            file_names.update({f"dense.{len(dense) - 1}.linear.{name}": f"{folder.name}/linear.{name}"
                               for name in weights})
        elif kind == "Normalize":
            normalize = True
        else:
            raise UnsupportedModelError(f"{directory}: sentence-transformers module {kind!r} is not supported "
                                        "(gemmakit reads Transformer, Pooling, Dense and Normalize)")
    if pooling is None:
        raise UnsupportedModelError(f"{directory}: modules.json has no Pooling module")
    settings = _json(directory / "config_sentence_transformers.json", {})
    prompts = settings.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise CheckpointError(f"{directory / 'config_sentence_transformers.json'}: prompts must map names to text")
    tokenizer_dir = folders[0] if (folders[0] / "tokenizer_config.json").is_file() else directory
    add_bos, add_eos = special_tokens_added(tokenizer_dir)
    try:
        config = EmbeddingConfig(
            decoder=decoder, projection=projection, pooling=pooling, include_prompt=include_prompt, dense=tuple(dense),
            normalize=normalize, max_seq_length=_max_seq_length(folders[0], tokenizer_dir),
            add_bos=add_bos, add_eos=add_eos, prompts=tuple(prompts.items()),
            default_prompt=settings.get("default_prompt_name") or None, name=directory.name)
    except ValueError as exc:
        raise CheckpointError(f"{directory}: {exc}") from None
    if config.default_prompt is not None and config.default_prompt not in prompts:
        raise CheckpointError(f"{directory}: default_prompt_name {config.default_prompt!r} is not one of the prompts")
    return Checkpoint(config=config, tensors=tensors, source=str(directory), tokenizer=inner.tokenizer,
                      native_dtype=inner.native_dtype, metadata={"format": "sentence-transformers"},
                      file_names=file_names, packed=packed)


def _pooling(folder: Path) -> tuple[tuple[str, ...], bool]:
    raw = _json(folder / "config.json")
    mode = raw.get("pooling_mode")
    if mode is None:
        modes = tuple(name for key, name in _LEGACY_POOLING.items() if raw.get(key)) or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    for m in modes:
        if m not in POOLING_MODES:
            raise UnsupportedModelError(f"{folder / 'config.json'}: pooling mode {m!r} is not one of "
                                        f"{', '.join(POOLING_MODES)}")
    return modes, bool(raw.get("include_prompt", True))


def _dense(folder: Path, index: int) -> tuple[DenseLayer, dict]:
    raw = _json(folder / "config.json")
    activation = str(raw.get("activation_function") or "torch.nn.modules.activation.Tanh").rsplit(".", 1)[-1]
    if activation not in ACTIVATIONS:
        raise UnsupportedModelError(f"{folder / 'config.json'}: activation {raw.get('activation_function')!r} is not "
                                    f"supported (one of {', '.join(ACTIVATIONS)})")
    if raw.get("use_residual"):
        raise UnsupportedModelError(f"{folder / 'config.json'}: Dense layers with use_residual are not supported")
    try:
        layer = DenseLayer(int(raw["in_features"]), int(raw["out_features"]), bool(raw.get("bias", True)), activation)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'config.json'}: in_features and out_features are required ({exc})") from None
    weights = _dense_weights(folder)
    wanted = ["weight", "bias"] if layer.bias else ["weight"]
    missing = [f"linear.{n}" for n in wanted if f"linear.{n}" not in weights]
    if missing:
        raise CheckpointError(f"{folder}: Dense layer {index} has no {', '.join(missing)}")
    return layer, {n: (lambda t=weights[f"linear.{n}"]: t) for n in wanted}


def _dense_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A Dense folder's tensors (small: read whole) from model.safetensors or pytorch_model.bin."""
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(folder / "model.safetensors"))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{folder / 'model.safetensors'}: cannot read ({exc})") from None
    if (folder / "pytorch_model.bin").is_file():
        try:
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{folder / 'pytorch_model.bin'}: cannot read ({exc})") from None
    raise CheckpointError(f"{folder}: a Dense module needs model.safetensors or pytorch_model.bin")


def _max_seq_length(transformer_dir: Path, tokenizer_dir: Path) -> int | None:
    """sentence_bert_config.json's max_seq_length (older saves), else the tokenizer's model_max_length."""
    value = _json(transformer_dir / "sentence_bert_config.json", {}).get("max_seq_length")
    if isinstance(value, (int, float)) and 0 < value < NO_LIMIT:
        return int(value)
    return tokenizer_max_length(tokenizer_dir)
