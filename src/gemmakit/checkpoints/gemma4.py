"""Gemma 4 text decoders in Hugging Face layout (``model_type: gemma4_text``, or the ``text_config``
of a ``gemma4`` multimodal checkpoint): config and tensor names.

Read through :mod:`gemmakit.checkpoints.safetensors`. Facts from transformers 5.23's
``models/gemma4`` (configuration_gemma4.py, modeling_gemma4.py):
  - global ("full_attention") layers have their own head size and, where ``attention_k_eq_v``
    holds, their own KV-head count; config.json states them as ``per_layer_config`` (newer files) or
    as ``global_head_dim`` / ``num_global_key_value_heads`` (default 512 / none);
  - their values are the key projection's output when ``attention_k_eq_v`` (no ``v_proj``);
  - RoPE is "default" on sliding layers and "proportional" on global ones (a share of the
    frequency pairs rotates, the exponents still over the whole head);
  - attention is scaled by 1 (the q/k norms take the place of 1/sqrt(d)); RMSNorm multiplies by
    its weight (no unit offset); values get an RMSNorm without scale;
  - the last ``num_kv_shared_layers`` layers have no k/v weights and read the keys and values of
    the last earlier layer of their type;
  - per-layer embeddings (PLE) when ``hidden_size_per_layer_input`` (default 256) is non-zero;
  - ``enable_moe_block``: experts beside the dense MLP in every layer.

The assistant drafters (``model_type: gemma4_assistant`` / ``gemma4_unified_assistant``,
models/assistant.py) wrap such a decoder's config as ``text_config``; from transformers'
``models/gemma4_assistant``: every layer reads its target's keys and values (``num_kv_shared_layers``
is set to the layer count), and there are neither per-layer embeddings, experts nor a double-wide
MLP; ``pre_projection``/``post_projection`` join and leave the target's width
(``backbone_hidden_size``); the head is ``lm_head`` (tied to ``model.embed_tokens``) with no
soft-cap, or with ``use_ordered_embeddings`` ``masked_embedding``'s clusters (``num_centroids``,
``centroid_intermediate_top_k``, ``token_ordering``).
"""

from __future__ import annotations

from typing import Any

from gemmakit.errors import CheckpointError, UnsupportedModelError
from gemmakit.models.assistant import AssistantConfig
from gemmakit.models.config import LayerKind, ModelConfig

MODEL_TYPES = ("gemma4_text", "gemma4", "gemma4_unified_text", "gemma4_unified")
# the assistant drafters and the backbone width each config class defaults to (transformers 5.23's
# Gemma4AssistantConfig: E2B's 1536; Gemma4UnifiedAssistantConfig: the 12B's 3840)
ASSISTANT_MODEL_TYPES = {"gemma4_assistant": 1536, "gemma4_unified_assistant": 3840}

LAYER_KINDS = {"sliding_attention": "local", "full_attention": "global"}

# our per-layer name -> transformers' name under layers.{i}. (every layer)
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "mlp_norm.weight": "pre_feedforward_layernorm.weight",
    "post_mlp_norm.weight": "post_feedforward_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "layer_scalar": "layer_scalar",
}
OWN_KV_NAMES = {"attn.k_proj.weight": "self_attn.k_proj.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"}
V_NAMES = {"attn.v_proj.weight": "self_attn.v_proj.weight"}
PER_LAYER_NAMES = {
    "per_layer.gate.weight": "per_layer_input_gate.weight",
    "per_layer.proj.weight": "per_layer_projection.weight",
    "per_layer.norm.weight": "post_per_layer_input_norm.weight",
}
EXPERT_NAMES = {
    "dense_norm.weight": "post_feedforward_layernorm_1.weight",
    "moe.pre_norm.weight": "pre_feedforward_layernorm_2.weight",
    "moe.post_norm.weight": "post_feedforward_layernorm_2.weight",
    "moe.router.scale": "router.scale",
    "moe.router.proj.weight": "router.proj.weight",
    "moe.router.per_expert_scale": "router.per_expert_scale",
    "moe.experts.gate_up_proj": "experts.gate_up_proj",
    "moe.experts.down_proj": "experts.down_proj",
}
MODEL_NAMES = {
    "embed.weight": "embed_tokens.weight",
    "final_norm.weight": "norm.weight",
}
MODEL_PER_LAYER_NAMES = {
    "per_layer_embed.weight": "embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "per_layer_projection_norm.weight",
}


def text_config(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The Gemma 4 text decoder's config dict inside ``raw``, or None when ``raw`` is not Gemma 4.
    ``gemma4_unified`` (the 12B) is the same decoder without per-layer embeddings or experts."""
    kind = raw.get("model_type")
    if kind in ("gemma4_text", "gemma4_unified_text"):
        return raw
    if kind in ("gemma4", "gemma4_unified") and isinstance(raw.get("text_config"), dict):
        return {**raw["text_config"], "model_type": f"{kind}_text"}
    return None


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Our config from a transformers Gemma4TextConfig dict."""
    try:
        layers = int(raw["num_hidden_layers"])
        kinds = layer_kinds(raw, layers, 6, source)
        if raw.get("use_bidirectional_attention") == "all":
            raise UnsupportedModelError(f"{source}: bidirectional Gemma 4 (use_bidirectional_attention 'all') "
                                        "is an embedding model, not a causal LM")
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or hidden // heads)
        k_eq_v = bool(raw.get("attention_k_eq_v", False))
        global_head_dim, global_kv = _global_shape(raw, kinds, k_eq_v, source)
        rope = raw.get("rope_parameters") or {}
        full, sliding = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
        for params in (full, sliding):
            if params.get("rope_type", "default") not in ("default", "proportional"):
                raise UnsupportedModelError(f"{source}: RoPE type {params['rope_type']!r} is not supported")
        if sliding.get("rope_type") == "proportional" and sliding.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError(f"{source}: partial RoPE on sliding layers is not supported")
        proportional = full.get("rope_type", "proportional" if not full else "default") == "proportional"
        unified = raw.get("model_type") == "gemma4_unified_text"  # its config has neither PLE nor experts
        moe = bool(raw.get("enable_moe_block", False)) and not unified
        per_layer_dim = 0 if unified else int(raw.get("hidden_size_per_layer_input", 256) or 0)
        return ModelConfig(
            family="gemma4", name=str(raw.get("_name_or_path") or "gemma4"),
            vocab_size=int(raw["vocab_size"]), hidden_size=hidden, intermediate_size=int(raw["intermediate_size"]),
            num_layers=layers, num_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=head_dim, layer_kinds=kinds,
            max_position_embeddings=int(raw.get("max_position_embeddings", 131_072)),
            query_pre_attn_scalar=1.0, sliding_window=int(raw.get("sliding_window", 512)) if "local" in kinds else None,
            rope_theta=float(full.get("rope_theta", 1_000_000.0)), rope_local_theta=float(sliding.get("rope_theta", 10_000.0)),
            rope_scaling_factor=float(full.get("factor", 1.0)),
            rope_global_proportion=float(full.get("partial_rotary_factor", 0.25 if not full else 1.0))
            if proportional else 1.0,
            qk_norm=True, post_norms=True, final_logit_softcap=_optional_float(raw.get("final_logit_softcapping")),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), norm_offset=0.0, v_norm=True, layer_scalar=True,
            global_head_dim=global_head_dim, global_kv_heads=global_kv, k_eq_v=k_eq_v,
            num_kv_shared_layers=int(raw.get("num_kv_shared_layers", 0) or 0),
            double_wide_mlp=bool(raw.get("use_double_wide_mlp", False)),
            per_layer_input_dim=per_layer_dim,
            per_layer_vocab_size=int(raw.get("vocab_size_per_layer_input", 262_144)) if per_layer_dim else 0,
            num_experts=int(raw["num_experts"]) if moe else 0,
            experts_per_token=int(raw["top_k_experts"]) if moe else 0,
            expert_intermediate_size=int(raw["moe_intermediate_size"]) if moe else 0,
        )
    except KeyError as exc:
        raise CheckpointError(f"{source}: required key {exc.args[0]!r} is missing") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def layer_kinds(raw: dict[str, Any], layers: int, period: int, source: str) -> tuple[LayerKind, ...]:
    """The layer kinds of a Gemma 3n / Gemma 4 config.json (``layer_types``, else one global layer
    every ``period``), after refusing what these decoders do not have: another MLP activation,
    attention biases."""
    if raw.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh" or raw.get("attention_bias"):
        raise UnsupportedModelError(f"{source}: only gelu_pytorch_tanh MLPs without attention biases are supported")
    types = raw.get("layer_types") or ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
                                       for i in range(layers)]
    try:
        return tuple(LAYER_KINDS[t] for t in types)
    except KeyError as exc:
        raise UnsupportedModelError(f"{source}: unknown layer type {exc.args[0]!r}") from None


def _global_shape(raw: dict[str, Any], kinds: tuple[LayerKind, ...], k_eq_v: bool,
                  source: str = "config.json") -> tuple[int, int | None]:
    """Global layers' head size and KV-head count (None = the sliding layers' count)."""
    per_layer = raw.get("per_layer_config")
    if isinstance(per_layer, dict) and per_layer:
        shapes = {(int(v.get("head_dim", raw.get("head_dim"))), v.get("num_key_value_heads"))
                  for k, v in per_layer.items() if kinds[int(k)] == "global"}
        if len(shapes) != 1:
            raise UnsupportedModelError(f"{source}: per_layer_config gives the global layers different shapes "
                                        f"{sorted(shapes)}")
        (head_dim, kv), = shapes
        return head_dim, None if kv is None else int(kv)
    kv = raw.get("num_global_key_value_heads") if k_eq_v else None
    return int(raw.get("global_head_dim", 512)), None if kv is None else int(kv)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def hf_names(config: ModelConfig, prefix: str = "model.") -> dict[str, str]:
    """Our parameter name -> the transformers name, for every parameter of ``config``."""
    names = {ours: prefix + theirs for ours, theirs in MODEL_NAMES.items()}
    if config.per_layer_input_dim:
        names.update({ours: prefix + theirs for ours, theirs in MODEL_PER_LAYER_NAMES.items()})
    for plan in config.layer_plan:
        block = dict(BLOCK_NAMES)
        if not plan.reads_shared_kv:
            block.update(OWN_KV_NAMES)
            if not plan.k_eq_v:
                block.update(V_NAMES)
        if config.per_layer_input_dim:
            block.update(PER_LAYER_NAMES)
        if config.num_experts:
            block.update(EXPERT_NAMES)
        i = plan.index
        names.update({f"layers.{i}.{ours}": f"{prefix}layers.{i}.{theirs}" for ours, theirs in block.items()})
    return names


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """The Gemma4TextConfig ``config.json`` dict of ``config`` (as transformers 5.23 saves it)."""
    kinds = {"local": "sliding_attention", "global": "full_attention"}
    glob = next((p for p in config.layer_plan if p.mixer == "global"), None)
    full = ({"rope_type": "proportional", "partial_rotary_factor": config.rope_global_proportion,
             "rope_theta": config.rope_theta} if config.rope_global_proportion != 1.0
            else {"rope_type": "default", "rope_theta": config.rope_theta})
    if config.rope_scaling_factor != 1.0:
        full = {**full, "rope_type": "proportional", "factor": config.rope_scaling_factor}
    out: dict[str, Any] = {
        "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "tie_word_embeddings": True, "use_cache": True,
        "layer_types": [kinds[k] for k in config.layer_kinds], "sliding_window": config.sliding_window or 512,
        "final_logit_softcapping": config.final_logit_softcap,
        "rope_parameters": {"full_attention": full,
                            "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_theta}},
        "attention_k_eq_v": config.k_eq_v, "num_kv_shared_layers": config.num_kv_shared_layers,
        "use_double_wide_mlp": config.double_wide_mlp,
        "hidden_size_per_layer_input": config.per_layer_input_dim,
        "vocab_size_per_layer_input": config.per_layer_vocab_size or config.vocab_size,
        "enable_moe_block": bool(config.num_experts),
        "num_experts": config.num_experts or None, "top_k_experts": config.experts_per_token or None,
        "moe_intermediate_size": config.expert_intermediate_size or None,
        "per_layer_config": {str(p.index): {"head_dim": p.head_dim} | (
            {"num_key_value_heads": p.num_kv_heads} if config.global_kv_heads is not None else {})
            for p in config.layer_plan if p.mixer == "global"},
    }
    if glob is not None:  # what transformers versions that predate per_layer_config read
        out["global_head_dim"] = glob.head_dim
        if config.global_kv_heads is not None:
            out["num_global_key_value_heads"] = config.global_kv_heads
    return out


def is_assistant(raw: dict[str, Any]) -> bool:
    return raw.get("model_type") in ASSISTANT_MODEL_TYPES


def assistant_config_from_hf(raw: dict[str, Any], source: str = "config.json") -> AssistantConfig:
    """Our config from a transformers Gemma4AssistantConfig (or Gemma4UnifiedAssistantConfig) dict."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{source}: an assistant's config needs its text_config")
    layers = text.get("num_hidden_layers")
    for key, allowed in (("hidden_size_per_layer_input", (0, None)), ("enable_moe_block", (False, None)),
                         ("use_double_wide_mlp", (False, None)), ("num_kv_shared_layers", (0, None, layers))):
        if text.get(key) not in allowed:
            raise UnsupportedModelError(f"{source}: an assistant with {key} {text[key]!r} is not one transformers "
                                        "defines (its layers all read the target's keys and values)")
    unified = raw["model_type"] == "gemma4_unified_assistant"
    # Read as a decoder whose layers have their own keys and values, then made to read the target's.
    # No final soft-cap: the assistant's head is its lm_head alone, whatever the text config says.
    inner = {**text, "model_type": "gemma4_unified_text" if unified else "gemma4_text", "num_kv_shared_layers": 0,
             "hidden_size_per_layer_input": 0, "enable_moe_block": False}
    name = str(raw.get("_name_or_path") or raw["model_type"])
    decoder = config_from_hf(inner, source).replace(external_kv=True, final_logit_softcap=None, name=name)
    ordered = bool(raw.get("use_ordered_embeddings", False))
    try:
        return AssistantConfig(
            decoder=decoder, name=name,
            backbone_hidden_size=int(raw.get("backbone_hidden_size", ASSISTANT_MODEL_TYPES[raw["model_type"]])),
            num_centroids=int(raw.get("num_centroids", 2048)) if ordered else 0,
            centroid_top_k=int(raw.get("centroid_intermediate_top_k", 32)) if ordered else 0)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def assistant_hf_names(config: AssistantConfig, tied: bool = True) -> dict[str, str]:
    """Our parameter (and token-order buffer) name -> the transformers name. The decoder's embedding
    is only ever the head: ``lm_head.weight`` where the file does not tie it to ``model.embed_tokens``."""
    names = {f"decoder.{ours}": theirs for ours, theirs in hf_names(config.decoder).items()}
    if not tied:
        names["decoder.embed.weight"] = "lm_head.weight"
    names["pre_projection.weight"] = "pre_projection.weight"
    names["post_projection.weight"] = "post_projection.weight"
    if config.num_centroids:
        names["head.centroids.weight"] = "masked_embedding.centroids.weight"
        names["head.token_ordering"] = "masked_embedding.token_ordering"
    return names
