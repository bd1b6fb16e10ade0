"""Hugging Face checkpoint directories: config.json + model.safetensors (or a sharded index).

Reads the names transformers uses for GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM and the
language model inside Gemma3ForConditionalGeneration (Gemma 3n's and Gemma 4's through their own
adapters, checkpoints/gemma3n.py and checkpoints/gemma4.py), in both the older config style
(``rope_theta``, ``rope_scaling``, ``rope_local_base_freq``) and the newer one (``rope_parameters``,
``layer_types``). Tensors are read lazily, one at a time, from whichever shard holds them. Also
what a directory's tokenizer files say about its inputs (the special tokens around a text, the
longest input), for the embedding adapters.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from gemmakit.checkpoints import gemma3n, gemma4, recurrent_gemma
from gemmakit.checkpoints.base import Checkpoint, TensorLoader, half_precision_matrices
from gemmakit.errors import CheckpointError, UnsupportedModelError
from gemmakit.models.config import LayerKind, ModelConfig, alternating
from gemmakit.tokenizer import Tokenizer

TEXT_MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}

# our per-layer name -> HF per-layer name. Gemma 1 calls its pre-MLP norm "post_attention_layernorm".
_LAYER_NAMES_V1 = {
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
}
_LAYER_NAMES_V23 = {
    "attn_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}
_SHARED_LAYER_NAMES = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}
# Where the decoder's tensors live, by checkpoint layout (newest transformers first; a bare
# Gemma3TextModel, as sentence-transformers saves EmbeddingGemma, has no prefix).
_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")


def read_config_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / 'config.json'}: invalid JSON ({exc})") from exc


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate a transformers config dict (text part) into our ModelConfig."""
    model_type = raw.get("model_type")
    if gemma4.text_config(raw) is not None:
        return gemma4.config_from_hf(gemma4.text_config(raw), source)
    if gemma3n.text_config(raw) is not None:
        return gemma3n.config_from_hf(gemma3n.text_config(raw), source)
    if model_type == "recurrent_gemma":
        return recurrent_gemma.config_from_hf(raw, source)
    if model_type in ("embedding_gemma2", "embedding_gemma2_text"):  # checkpoints/embedding_gemma2.py reads these
        raise UnsupportedModelError(f"{source}: {model_type} is an embedding model (EmbeddingGemma 2), not a text "
                                    "decoder; load its directory with gemmakit.load")
    if model_type == "gemma3" and "text_config" in raw:
        raw = {**raw["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    family = TEXT_MODEL_TYPES.get(model_type or "")
    if family is None:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"gemmakit reads {', '.join([*TEXT_MODEL_TYPES, *gemma3n.MODEL_TYPES, *gemma4.MODEL_TYPES, 'recurrent_gemma'])}"
        )
    try:
        layers = int(raw["num_hidden_layers"])
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or hidden // heads)
        kinds = _layer_kinds(raw, family, layers)
        theta_global, theta_local, factor = _rope(raw, family)
        return ModelConfig(
            family=family, vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]), num_layers=layers, num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=head_dim, layer_kinds=kinds,
            max_position_embeddings=int(raw.get("max_position_embeddings", 8192)),
            query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar") or head_dim),
            sliding_window=int(raw["sliding_window"]) if "local" in kinds else None,
            rope_theta=theta_global, rope_local_theta=theta_local, rope_scaling_factor=factor,
            qk_norm=family == "gemma3", post_norms=family != "gemma",
            attn_logit_softcap=_optional_float(raw.get("attn_logit_softcapping")) if family != "gemma" else None,
            final_logit_softcap=_optional_float(raw.get("final_logit_softcapping")) if family != "gemma" else None,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), name=str(raw.get("_name_or_path") or family),
            bidirectional=bool(raw.get("use_bidirectional_attention")) and family == "gemma3",  # EmbeddingGemma
        )
    except KeyError as exc:
        raise CheckpointError(f"{source}: required key {exc.args[0]!r} is missing") from None


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _layer_kinds(raw: dict[str, Any], family: str, layers: int) -> tuple[LayerKind, ...]:
    if family == "gemma":
        return ("global",) * layers
    if raw.get("layer_types"):
        names = {"sliding_attention": "local", "full_attention": "global"}
        try:
            return tuple(names[t] for t in raw["layer_types"])
        except KeyError as exc:
            raise UnsupportedModelError(f"unknown layer type {exc.args[0]!r} in config.json") from None
    if family == "gemma2":
        return alternating(layers, 2)
    return alternating(layers, int(raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6))


def _rope(raw: dict[str, Any], family: str) -> tuple[float, float, float]:
    """(global theta, local theta, linear factor on global layers) from either config style."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # newer per-layer-type style
        full, sliding = params["full_attention"] or {}, params.get("sliding_attention") or {}
        factor = _linear_factor(full)
        return float(full.get("rope_theta", 1e6)), float(sliding.get("rope_theta", 1e4)), factor
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10_000.0)))
        factor = _linear_factor(params)
    else:
        theta = float(raw.get("rope_theta", 1e6 if family == "gemma3" else 1e4))
        factor = _linear_factor(raw.get("rope_scaling") or {})
    local = float(raw.get("rope_local_base_freq", 10_000.0)) if family == "gemma3" else theta
    return theta, local, factor


def _linear_factor(rope: dict[str, Any]) -> float:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return 1.0
    if kind != "linear":
        raise UnsupportedModelError(f"RoPE scaling type {kind!r} is not supported (only linear)")
    return float(rope.get("factor", 1.0))


def hf_names(config: ModelConfig, prefix: str = "model.") -> dict[str, str]:
    """Our parameter name -> the transformers name, for every parameter of ``config``."""
    if config.family == "recurrentgemma":
        return recurrent_gemma.hf_names(config, prefix)
    if config.family == "gemma4":
        return gemma4.hf_names(config, prefix)
    if config.family == "gemma3n":
        return gemma3n.hf_names(config, prefix)
    names = {"embed.weight": f"{prefix}embed_tokens.weight", "final_norm.weight": f"{prefix}norm.weight"}
    per_layer = {**(_LAYER_NAMES_V1 if config.family == "gemma" else _LAYER_NAMES_V23), **_SHARED_LAYER_NAMES}
    for i in range(config.num_layers):
        for ours, theirs in per_layer.items():
            if not config.qk_norm and ours in ("attn.q_norm", "attn.k_norm"):
                continue
            names[f"layers.{i}.{ours}.weight"] = f"{prefix}layers.{i}.{theirs}.weight"
    return names


class _ShardedFiles:
    """Maps tensor names to the shard file holding them; opens each shard lazily."""

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
            self.where = {name: directory / shard for name, shard in weight_map.items()}
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{directory}: config.json found but no *.safetensors weights")
            self.where = {}
            for f in files:
                for name in self._open(f).keys():
                    self.where[name] = f
        self._handles: dict[Path, Any] = {}

    def _open(self, file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from exc

    def _handle(self, name: str):
        file = self.where[name]
        if file not in self._handles:
            if not file.is_file():
                raise CheckpointError(f"shard {file} named in the index is missing")
            self._handles[file] = self._open(file)
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def names(self) -> set[str]:
        return set(self.where)

    def header(self, name: str) -> tuple[str, tuple[int, ...]]:
        """A tensor's dtype as safetensors names it ("BF16", "F32", ...) and its shape, from the
        file's header alone (no data read)."""
        view = self._handle(name).get_slice(name)
        return view.get_dtype(), tuple(view.get_shape())


def decoder_tensor_names(directory: Path, names_under: Callable[[str], dict[str, str]],
                         prefixes: tuple[str, ...] = _PREFIXES) -> tuple[_ShardedFiles, dict[str, str]]:
    """The directory's safetensors files and its decoder tensors' names (ours -> theirs:
    ``names_under(prefix)``), under whichever of ``prefixes`` holds ``embed_tokens.weight``;
    refuses a directory that lacks any of them, naming the first few."""
    files = _ShardedFiles(directory)
    available = files.names()
    prefix = next((p for p in prefixes if f"{p}embed_tokens.weight" in available), None)
    if prefix is None:
        raise CheckpointError(f"{directory}: no embed_tokens.weight under any known prefix {prefixes}")
    mapping = names_under(prefix)
    missing = [theirs for theirs in mapping.values() if theirs not in available]
    if missing:
        raise CheckpointError(f"{directory}: missing tensors {', '.join(missing[:3])}"
                              + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return files, mapping


def open_hf_directory(directory: Path, raw: dict[str, Any]) -> Checkpoint:
    """A text model's directory; ``raw`` is its config.json (:func:`read_config_json`)."""
    if gemma4.is_assistant(raw):
        return open_hf_assistant_directory(directory, raw)
    config = config_from_hf(raw, str(directory / "config.json"))
    files, mapping = decoder_tensor_names(directory, lambda prefix: hf_names(config, prefix))
    tensors: dict[str, TensorLoader] = {ours: (lambda n=theirs: files.get(n)) for ours, theirs in mapping.items()}
    if config.family == "recurrentgemma":
        tensors = {ours: (lambda o=ours, n=theirs: recurrent_gemma.from_hf_tensor(o, files.get(n)))
                   for ours, theirs in mapping.items()}
    return Checkpoint(config=config, tensors=tensors, source=str(directory),
                      tokenizer=Tokenizer.from_directory(directory), metadata={"format": "safetensors"},
                      file_names=mapping, packed=half_precision_matrices(config, tensors, header_of(files, mapping)))


def open_hf_assistant_directory(directory: Path, raw: dict[str, Any]) -> Checkpoint:
    """A Gemma 4 assistant drafter's directory (checkpoints/gemma4.py, models/assistant.py)."""
    config = gemma4.assistant_config_from_hf(raw, str(directory / "config.json"))
    files = _ShardedFiles(directory)
    available = files.names()
    tied = raw.get("tie_word_embeddings", True) or "lm_head.weight" not in available
    mapping = gemma4.assistant_hf_names(config, tied)
    missing = [theirs for theirs in mapping.values() if theirs not in available]
    if missing:
        raise CheckpointError(f"{directory}: missing tensors {', '.join(missing[:3])}"
                              + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    tensors: dict[str, TensorLoader] = {ours: (lambda n=theirs: files.get(n)) for ours, theirs in mapping.items()}
    # the layers' and the head's 16-bit matrices may stay as stored (half_precision_matrices); the
    # projections in and out and the clusters' map are small and keep the float path
    decoder = {ours.removeprefix("decoder."): theirs for ours, theirs in mapping.items() if ours.startswith("decoder.")}
    packed = {f"decoder.{ours}": load for ours, load in half_precision_matrices(
        config.decoder, {ours: tensors[f"decoder.{ours}"] for ours in decoder}, header_of(files, decoder)).items()}
    return Checkpoint(config=config, tensors=tensors, source=str(directory),
                      tokenizer=Tokenizer.from_directory(directory), metadata={"format": "safetensors"},
                      file_names=mapping, packed=packed)


# safetensors' dtype names of the floats it stores -> torch's
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def header_of(files: _ShardedFiles, mapping: dict[str, str]):
    """``our name -> (stored dtype, shape)`` read from the shards' headers (no data)."""
    def header(ours: str) -> tuple[torch.dtype | None, tuple[int, ...]]:
        dtype, shape = files.header(mapping[ours])
        return _DTYPES.get(dtype), shape

    return header


# a tokenizer's model_max_length above this is transformers' "no limit" placeholder
NO_LIMIT = 1 << 30


def _optional_json(path: Path) -> dict[str, Any]:
    """A tokenizer file's JSON object ({} when the file is absent)."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    return raw if isinstance(raw, dict) else {}


def tokenizer_max_length(directory: Path) -> int | None:
    """The directory's tokenizer_config.json ``model_max_length`` (None when absent or "no limit")."""
    value = _optional_json(directory / "tokenizer_config.json").get("model_max_length")
    return int(value) if isinstance(value, (int, float)) and 0 < value < NO_LIMIT else None


def special_tokens_added(directory: Path) -> tuple[bool, bool]:
    """Whether the directory's tokenizer puts ``<bos>`` before and ``<eos>`` after a text: the
    single-sequence template of tokenizer.json's post-processor, which transformers 5 follows as
    written (EmbeddingGemma's adds both), else tokenizer_config.json's add_bos_token/add_eos_token."""
    config = _optional_json(directory / "tokenizer_config.json")
    processor = _optional_json(directory / "tokenizer.json").get("post_processor") or {}
    if processor.get("type") == "TemplateProcessing":
        specials = [item["SpecialToken"]["id"] for item in processor.get("single", []) if "SpecialToken" in item]
        sequence = next((i for i, item in enumerate(processor.get("single", [])) if "Sequence" in item), 0)
        before = {item["SpecialToken"]["id"] for item in processor.get("single", [])[:sequence] if "SpecialToken" in item}
        after = set(specials) - before
        bos, eos = _token_text(config, "bos", "<bos>"), _token_text(config, "eos", "<eos>")
        return bos in before, eos in after
    return bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))


def _token_text(config: dict, name: str, default: str) -> str:
    value = config.get(f"{name}_token", default)
    return value.get("content", default) if isinstance(value, dict) else str(value)
