"""EmbeddingGemma 2 in Hugging Face layout (``model_type: embedding_gemma2``, or the text model alone,
``embedding_gemma2_text``): a Gemma 4 decoder read fully bidirectionally, with its projection.

Facts from transformers 5.23's ``models/embedding_gemma2`` (configuration and modeling files):
  - the layers are Gemma 4's (q/k norms, value norm without scale, attention scale 1, RMSNorm
    scaling by the weight itself, post-norms, the per-layer-input block after the MLP, a layer
    scalar), with neither K=V layers, shared keys and values, double-wide MLPs nor experts;
    global ("full_attention") layers have their own head size and KV-head count in
    ``per_layer_config`` (the builder's defaults: 512 and 1);
  - every layer attends both ways; ``sliding_window`` is an inclusive *radius* R (a sliding
    layer's query sees every key with ``|q - k| <= R``), read here as a window of 2R + 1 keys
    centred on the query, which gemmakit's encoder mask (models/masks.py) turns back into R;
  - the per-layer inputs are "projection-only": the normed projection of the token embeddings,
    with no per-layer token table and no 1/sqrt(2) blend (``per_layer_vocab_size`` 0 here);
  - ``embedding_projection`` (bias-free, hidden -> ``embedding_dim``) follows the final norm at
    every token, so the model's ``last_hidden_state`` is already in the embedding's width; the
    model does no pooling: it is meant to be followed by sentence-transformers' mean pooling
    (over the tokens the attention mask marks, the tokenizer's special tokens included) and L2
    normalisation, which is the pipeline a bare directory gets;
  - tensors sit under ``language_model.`` (the composite ``EmbeddingGemma2Model``, beside any
    ``vision_tower.`` / ``audio_tower.`` / ``embed_vision.`` / ``embed_audio.``, which the text
    path leaves unread) or at the top level (``EmbeddingGemma2TextModel``, as a
    sentence-transformers Transformer module saves it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemmakit.checkpoints import gemma4
from gemmakit.checkpoints.base import Checkpoint, TensorLoader, half_precision_matrices
from gemmakit.checkpoints.safetensors import (decoder_tensor_names, header_of, special_tokens_added,
                                              tokenizer_max_length)
from gemmakit.errors import CheckpointError, UnsupportedModelError
from gemmakit.models.config import ModelConfig
from gemmakit.models.encoder import EmbeddingConfig
from gemmakit.tokenizer import Tokenizer

MODEL_TYPES = ("embedding_gemma2", "embedding_gemma2_text")

# transformers' builder defaults that config.json may leave out (EmbeddingGemma2TextConfig)
_DEFAULTS = {"hidden_size_per_layer_input": 512, "embedding_dim": 768, "sliding_window": 512,
             "max_position_embeddings": 262_144}
_GLOBAL_DEFAULTS = {"head_dim": 512, "num_key_value_heads": 1}
# plain RoPE on both kinds (where Gemma 4's global layers default to "proportional")
_ROPE_DEFAULTS = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                  "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}

# our name -> transformers' name, for the projection-only PLE (model level and in each layer)
_PLE_NAMES = {"per_layer_model_proj.weight": "ple.per_layer_model_projection.weight",
              "per_layer_proj_norm.weight": "ple.per_layer_projection_norm.weight"}
_PLE_BLOCK_NAMES = {ours: f"ple_block.{theirs}" for ours, theirs in gemma4.PER_LAYER_NAMES.items()}
# where the text model's tensors sit: inside the composite model, or alone
_PREFIXES = ("language_model.", "model.language_model.", "")


def is_embedding_gemma2(raw: dict[str, Any]) -> bool:
    return raw.get("model_type") in MODEL_TYPES


def text_config(raw: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The text model's config dict: ``raw`` itself, or the composite's ``text_config``."""
    if raw.get("model_type") == "embedding_gemma2_text":
        return raw
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{source}: an embedding_gemma2 config needs its text_config")
    return text


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> tuple[ModelConfig, int]:
    """The bidirectional Gemma 4 decoder and the projection's width from an EmbeddingGemma 2 config."""
    text = {**_DEFAULTS, **text_config(raw, source)}
    try:
        layers = int(text["num_hidden_layers"])
        kinds = gemma4.layer_kinds(text, layers, 6, source)
        radius = int(text["sliding_window"])
        width = int(text["embedding_dim"])
    except KeyError as exc:
        raise CheckpointError(f"{source}: required key {exc.args[0]!r} is missing") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    per_layer = _per_layer_config(text, kinds, source)
    rope = text.get("rope_parameters") or {}
    rope = {kind: (rope.get(kind) or default) for kind, default in _ROPE_DEFAULTS.items()}
    # Gemma 4's reader with what EmbeddingGemma 2 fixes: no table for the per-layer inputs, no
    # K=V, shared, double-wide or expert layers, and the radius as a centred window
    inner = {**text, "model_type": "gemma4_text", "per_layer_config": per_layer, "rope_parameters": rope,
             "sliding_window": 2 * radius + 1, "vocab_size_per_layer_input": 0, "attention_k_eq_v": False,
             "num_kv_shared_layers": 0, "use_double_wide_mlp": False, "enable_moe_block": False, "final_logit_softcapping": None}
    decoder = gemma4.config_from_hf(inner, source)
    name = str(raw.get("_name_or_path") or text.get("_name_or_path") or "embedding_gemma2")
    return decoder.replace(bidirectional=True, name=name), width


def _per_layer_config(text: dict[str, Any], kinds: tuple, source: str) -> dict[str, dict[str, Any]]:
    """Each global layer's head size and KV-head count, as transformers resolves them: a layer's
    ``per_layer_config`` entry over the config's own values; with no ``per_layer_config`` at all,
    the builder's defaults (512, 1). Overrides gemmakit's per-layer plan does not carry (other
    keys, sliding layers) are refused."""
    raw = text.get("per_layer_config")
    if not raw:
        return {str(i): dict(_GLOBAL_DEFAULTS) for i, kind in enumerate(kinds) if kind == "global"}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: per_layer_config must map layer indices to settings")
    for key, value in raw.items():
        if not (str(key).isdigit() and int(key) < len(kinds)) or not isinstance(value, dict):
            raise CheckpointError(f"{source}: per_layer_config entry {key!r} is not a layer's settings")
        extra = sorted(set(value) - set(_GLOBAL_DEFAULTS))
        if extra or kinds[int(key)] != "global":
            raise UnsupportedModelError(f"{source}: per_layer_config sets {', '.join(extra or sorted(value))} on "
                                        f"layer {key} ({kinds[int(key)]}); gemmakit reads per-layer head sizes "
                                        "and KV-head counts of global layers only")
    own = {"head_dim": text.get("head_dim"), "num_key_value_heads": text.get("num_key_value_heads")}
    return {str(i): {**own, **raw.get(str(i), raw.get(i, {}))} for i, kind in enumerate(kinds) if kind == "global"}


def hf_names(config: ModelConfig, prefix: str = "language_model.") -> dict[str, str]:
    """Our EmbeddingModel's parameter name -> the transformers name (decoder under ``decoder.``)."""
    names = {f"decoder.{ours}": prefix + theirs for ours, theirs in gemma4.MODEL_NAMES.items()}
    names.update({f"decoder.{ours}": prefix + theirs for ours, theirs in _PLE_NAMES.items()})
    for plan in config.layer_plan:
        block = {**gemma4.BLOCK_NAMES, **gemma4.OWN_KV_NAMES, **gemma4.V_NAMES, **_PLE_BLOCK_NAMES}
        i = plan.index
        names.update({f"decoder.layers.{i}.{ours}": f"{prefix}layers.{i}.{theirs}" for ours, theirs in block.items()})
    names["projection.weight"] = prefix + "embedding_projection.weight"
    return names


def open_embedding_gemma2_directory(directory: Path, raw: dict[str, Any]) -> Checkpoint:
    """An EmbeddingGemma 2 directory as transformers saves it: its text path, mean-pooled and
    L2-normalised. ``raw`` is its config.json."""
    source = str(directory / "config.json")
    decoder, width = config_from_hf(raw, source)
    files, mapping = decoder_tensor_names(directory, lambda prefix: hf_names(decoder, prefix), _PREFIXES)
    tensors: dict[str, TensorLoader] = {ours: (lambda n=theirs: files.get(n)) for ours, theirs in mapping.items()}
    add_bos, add_eos = special_tokens_added(directory)
    try:
        config = EmbeddingConfig(decoder=decoder, projection=width, pooling=("mean",), normalize=True,
                                 max_seq_length=tokenizer_max_length(directory), add_bos=add_bos, add_eos=add_eos,
                                 name=directory.name)
    except ValueError as exc:
        raise CheckpointError(f"{directory}: {exc}") from None
    decoder_names = {ours.removeprefix("decoder."): theirs for ours, theirs in mapping.items()
                     if ours.startswith("decoder.")}
    packed = {f"decoder.{ours}": load for ours, load in half_precision_matrices(
        decoder, {ours: tensors[f"decoder.{ours}"] for ours in decoder_names}, header_of(files, decoder_names)).items()}
    return Checkpoint(config=config, tensors=tensors, source=str(directory),
                      tokenizer=Tokenizer.from_directory(directory), metadata={"format": "safetensors"},
                      file_names=mapping, packed=packed)
