"""Gemma 3n text decoders in Hugging Face layout (``model_type: gemma3n_text``, or the
``text_config`` of a ``gemma3n`` multimodal checkpoint, whose decoder sits under
``model.language_model.``): config and tensor names.

Read through :mod:`gemmakit.checkpoints.safetensors`. Facts from transformers 5.23's
``models/gemma3n`` (configuration_gemma3n.py, modeling_gemma3n.py):
  - the config class's defaults are E4B's, so keys a config.json leaves out take those values
    (the final soft-cap among them: 30, though Google's JAX reference has none);
  - ``intermediate_size`` is one width or one per layer; ``activation_sparsity_pattern`` gives each
    layer's gaussian top-k sparsity (default 0.95 on the first 10 layers of models deeper than 10);
  - layers are full attention where ``(i + 1) % 5 == 0`` unless ``layer_types`` says otherwise;
    RoPE is plain on both kinds (bases ``rope_theta`` / ``rope_local_base_freq`` in older files);
  - attention is scaled by 1 (a ``query_pre_attn_scalar`` key in hub files is unused); RMSNorm
    multiplies by its weight (no unit offset); values get an RMSNorm without scale;
  - the last ``num_kv_shared_layers`` layers read the keys and values of the last earlier layer of
    their type; transformers 5 gives them no k/v weights (hub files still carry unused ones);
  - AltUp with ``altup_num_inputs`` streams, of which stream 0 is active (the model-level code
    assumes that index whatever ``altup_active_idx`` says), LAuReL of rank ``laurel_rank``, and
    per-layer embeddings of ``hidden_size_per_layer_input`` from a table of
    ``vocab_size_per_layer_input`` rows (ids beyond it read row 0).
"""

from __future__ import annotations

from typing import Any

from gemmakit.checkpoints import gemma4
from gemmakit.errors import CheckpointError, UnsupportedModelError
from gemmakit.models.config import ModelConfig

MODEL_TYPES = ("gemma3n_text", "gemma3n")

# Gemma 3n's blocks are Gemma 4's (the same transformers names) without the layer scalar, plus
# AltUp and LAuReL; our name -> transformers' name under layers.{i}.
_BLOCK = {
    **{ours: theirs for ours, theirs in gemma4.BLOCK_NAMES.items() if ours != "layer_scalar"},
    **gemma4.PER_LAYER_NAMES,
    "altup.router_norm.weight": "altup.router_norm.weight",
    "altup.router.weight": "altup.modality_router.weight",
    "altup.predict_coefs.weight": "altup.prediction_coefs.weight",
    "altup.correct_coefs.weight": "altup.correction_coefs.weight",
    "altup.output_scale": "altup.correct_output_scale",
    "laurel.left.weight": "laurel.linear_left.weight",
    "laurel.right.weight": "laurel.linear_right.weight",
    "laurel.norm.weight": "laurel.post_laurel_norm.weight",
}
_OWN_KV = {**gemma4.OWN_KV_NAMES, **gemma4.V_NAMES}
_MODEL = {**gemma4.MODEL_NAMES, **gemma4.MODEL_PER_LAYER_NAMES}


def text_config(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The Gemma 3n text decoder's config dict inside ``raw``, or None when ``raw`` is not Gemma 3n."""
    if raw.get("model_type") == "gemma3n_text":
        return raw
    if raw.get("model_type") == "gemma3n" and isinstance(raw.get("text_config"), dict):
        return {**raw["text_config"], "model_type": "gemma3n_text"}
    return None


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Our config from a transformers Gemma3nTextConfig dict."""
    try:
        layers = int(raw.get("num_hidden_layers", 35))
        kinds = gemma4.layer_kinds(raw, layers, 5, source)
        if int(raw.get("altup_active_idx", 0)) != 0:
            raise UnsupportedModelError(f"{source}: AltUp's active stream must be stream 0 (altup_active_idx), "
                                        "as the model's stream projections assume")
        if raw.get("hidden_size_per_layer_input", 256) == 0 or raw.get("laurel_rank", 64) == 0:
            raise UnsupportedModelError(f"{source}: Gemma 3n without per-layer embeddings or LAuReL is not supported")
        hidden, heads = int(raw.get("hidden_size", 2048)), int(raw.get("num_attention_heads", 8))
        widths = raw.get("intermediate_size", 16_384)
        widths = [int(w) for w in widths] if isinstance(widths, (list, tuple)) else [int(widths)] * layers
        sparsity = raw.get("activation_sparsity_pattern")
        if sparsity is None:
            sparse_layers = 10 if layers > 10 else 0
            sparsity = [0.95] * sparse_layers + [0.0] * (layers - sparse_layers)
        sparsity = [float(s) for s in sparsity] if isinstance(sparsity, (list, tuple)) else [float(sparsity)] * layers
        if len(widths) != layers or len(sparsity) != layers:
            raise CheckpointError(f"{source}: intermediate_size and activation_sparsity_pattern need one entry "
                                  f"per layer ({layers})")
        theta_global, theta_local = _rope(raw, source)
        softcap = raw.get("final_logit_softcapping", 30.0)
        per_layer_dim = int(raw.get("hidden_size_per_layer_input", 256))
        clip = raw.get("altup_coef_clip", 120.0)
        return ModelConfig(
            family="gemma3n", name=str(raw.get("_name_or_path") or "gemma3n"),
            vocab_size=int(raw.get("vocab_size", 262_400)), hidden_size=hidden,
            intermediate_size=widths[0], intermediate_sizes=tuple(widths) if len(set(widths)) > 1 else (),
            num_layers=layers, num_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads") or 2),
            head_dim=int(raw.get("head_dim") or 256), layer_kinds=kinds,
            max_position_embeddings=int(raw.get("max_position_embeddings", 32_768)),
            query_pre_attn_scalar=1.0, sliding_window=int(raw.get("sliding_window", 512)) if "local" in kinds else None,
            rope_theta=theta_global, rope_local_theta=theta_local, qk_norm=True, post_norms=True,
            final_logit_softcap=None if softcap is None else float(softcap),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), norm_offset=0.0, v_norm=True,
            num_kv_shared_layers=int(raw.get("num_kv_shared_layers", 15) or 0),
            per_layer_input_dim=per_layer_dim,
            per_layer_vocab_size=int(raw.get("vocab_size_per_layer_input", 262_144)),
            activation_sparsity=tuple(sparsity) if any(sparsity) else (),
            altup_inputs=int(raw.get("altup_num_inputs", 4)),
            altup_coef_clip=None if clip is None else float(clip),
            altup_correct_scale=bool(raw.get("altup_correct_scale", True)),
            laurel_rank=int(raw.get("laurel_rank", 64)),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def _rope(raw: dict[str, Any], source: str) -> tuple[float, float]:
    """(global theta, local theta) from ``rope_parameters`` by layer type, or the older
    ``rope_theta`` / ``rope_local_base_freq`` keys; only plain RoPE is supported."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full, sliding = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:
        full = {**(params or {}), **(raw.get("rope_scaling") or {})}
        full.setdefault("rope_theta", raw.get("rope_theta", 1_000_000.0))
        sliding = {"rope_theta": raw.get("rope_local_base_freq", 10_000.0)}
    for kind in (full, sliding):
        if kind.get("rope_type", kind.get("type", "default")) not in (None, "default"):
            raise UnsupportedModelError(f"{source}: RoPE type {kind.get('rope_type', kind.get('type'))!r} "
                                        "is not supported")
    return float(full.get("rope_theta", 1_000_000.0)), float(sliding.get("rope_theta", 10_000.0))


def hf_names(config: ModelConfig, prefix: str = "model.") -> dict[str, str]:
    """Our parameter name -> the transformers name, for every parameter of ``config``."""
    names = {ours: prefix + theirs for ours, theirs in _MODEL.items()}
    for i in range(config.altup_inputs - 1):
        names[f"altup.expand.{i}.weight"] = f"{prefix}altup_projections.{i}.weight"
        names[f"altup.collapse.{i}.weight"] = f"{prefix}altup_unembed_projections.{i}.weight"
    for plan in config.layer_plan:
        block = _BLOCK if plan.reads_shared_kv else {**_BLOCK, **_OWN_KV}
        i = plan.index
        names.update({f"layers.{i}.{ours}": f"{prefix}layers.{i}.{theirs}" for ours, theirs in block.items()})
    return names


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """The Gemma3nTextConfig ``config.json`` dict of ``config`` (as transformers 5.23 saves it)."""
    kinds = {"local": "sliding_attention", "global": "full_attention"}
    plans = config.layer_plan
    return {
        "architectures": ["Gemma3nForCausalLM"], "model_type": "gemma3n_text",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        # lists, not tuples: transformers' strict config class checks the types
        "intermediate_size": [p.intermediate_size for p in plans], "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "tie_word_embeddings": True, "use_cache": True,
        "layer_types": [kinds[k] for k in config.layer_kinds], "sliding_window": config.sliding_window or 512,
        "final_logit_softcapping": config.final_logit_softcap,
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": config.rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_theta}},
        "num_kv_shared_layers": config.num_kv_shared_layers,
        "hidden_size_per_layer_input": config.per_layer_input_dim,
        "vocab_size_per_layer_input": config.per_layer_vocab_size,
        "activation_sparsity_pattern": [p.activation_sparsity for p in plans],
        "altup_num_inputs": config.altup_inputs, "altup_active_idx": 0, "altup_coef_clip": config.altup_coef_clip,
        "altup_correct_scale": config.altup_correct_scale, "laurel_rank": config.laurel_rank,
    }
