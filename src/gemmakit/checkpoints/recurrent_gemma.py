"""RecurrentGemma in Hugging Face layout (``model_type: recurrent_gemma``): config, names, tensors, both ways.

Read through :mod:`gemmakit.checkpoints.safetensors`, which hands RecurrentGemma directories here
for their config and tensor names. The layout differs from the other Gemmas in three ways worth
knowing: the MLP's ``intermediate_size`` in config.json is twice the real width (transformers
halves it), the Conv1D weight is a ``[W, 1, K]`` ``nn.Conv1d`` kernel, and the final norm is
``model.final_norm``. :func:`gemmakit.checkpoints.hf_writer.save_recurrent_gemma` writes the layout
back with this module's ``to_hf_*`` functions.
"""

from __future__ import annotations

from typing import Any

import torch

from gemmakit.errors import CheckpointError, InvalidRequestError, UnsupportedModelError
from gemmakit.models.config import LayerKind, ModelConfig

MODEL_TYPE = "recurrent_gemma"

# our per-layer name -> transformers' name under model.layers.{i}.
_COMMON = {
    "attn_norm.weight": "temporal_pre_norm.weight",
    "mlp_norm.weight": "channel_pre_norm.weight",
    **{f"mlp.{p}.{t}": f"mlp_block.{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj") for t in ("weight", "bias")},
}
_ATTENTION = {
    "attn.q_proj.weight": "temporal_block.q_proj.weight",
    "attn.k_proj.weight": "temporal_block.k_proj.weight",
    "attn.v_proj.weight": "temporal_block.v_proj.weight",
    "attn.o_proj.weight": "temporal_block.o_proj.weight",
    "attn.o_proj.bias": "temporal_block.o_proj.bias",
}
_RECURRENT = {
    **{f"recurrent.{p}.{t}": f"temporal_block.{p}.{t}" for p in ("linear_x", "linear_y", "linear_out")
       for t in ("weight", "bias")},
    "recurrent.conv1d.weight": "temporal_block.conv_1d.weight",  # ours [K, W]; theirs [W, 1, K]
    "recurrent.conv1d.bias": "temporal_block.conv_1d.bias",
    "recurrent.rg_lru.a_param": "temporal_block.rg_lru.recurrent_param",
    "recurrent.rg_lru.input_gate.weight": "temporal_block.rg_lru.input_gate_weight",
    "recurrent.rg_lru.input_gate.bias": "temporal_block.rg_lru.input_gate_bias",
    "recurrent.rg_lru.a_gate.weight": "temporal_block.rg_lru.recurrent_gate_weight",
    "recurrent.rg_lru.a_gate.bias": "temporal_block.rg_lru.recurrent_gate_bias",
}
_CONV = "recurrent.conv1d.weight"


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Our config from a transformers RecurrentGemmaConfig dict."""
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        layers = int(raw["num_hidden_layers"])
        blocks = list(raw.get("block_types") or ["recurrent", "recurrent", "attention"])
        names = {"recurrent": "recurrent", "attention": "local"}
        try:
            kinds: tuple[LayerKind, ...] = tuple(names[blocks[i % len(blocks)]] for i in range(layers))
        except KeyError as exc:
            raise UnsupportedModelError(f"{source}: unknown block type {exc.args[0]!r}") from None
        rope = raw.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", raw.get("rope_theta", 10_000.0)))
        fraction = float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5)))
        head_dim = hidden // heads  # transformers derives it the same way, whatever config.json says
        return ModelConfig(
            family="recurrentgemma", name=str(raw.get("_name_or_path") or "recurrentgemma"),
            vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]) // 2, num_layers=layers, num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=head_dim, layer_kinds=kinds,
            max_position_embeddings=int(raw.get("max_position_embeddings") or 1 << 20),
            query_pre_attn_scalar=head_dim, sliding_window=int(raw.get("attention_window_size", 2048)),
            rope_theta=theta, rope_local_theta=theta, final_logit_softcap=float(raw.get("logits_soft_cap", 30.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), lru_width=int(raw.get("lru_width") or hidden),
            conv1d_width=int(raw.get("conv1d_width", 4)), rope_fraction=fraction, embed_scale_bf16=True,
            mlp_bias=True, attn_out_bias=True,
        )
    except KeyError as exc:
        raise CheckpointError(f"{source}: required key {exc.args[0]!r} is missing") from None


def hf_names(config: ModelConfig, prefix: str = "model.") -> dict[str, str]:
    """Our parameter name -> the transformers name, for every parameter of ``config``."""
    names = {"embed.weight": f"{prefix}embed_tokens.weight", "final_norm.weight": f"{prefix}final_norm.weight"}
    for i, kind in enumerate(config.layer_kinds):
        table = {**_COMMON, **(_RECURRENT if kind == "recurrent" else _ATTENTION)}
        for ours, theirs in table.items():
            names[f"layers.{i}.{ours}"] = f"{prefix}layers.{i}.{theirs}"
    return names


def from_hf_tensor(ours: str, tensor: torch.Tensor) -> torch.Tensor:
    """Convert a transformers tensor to our layout (only the Conv1D kernel differs)."""
    return tensor[:, 0, :].t().contiguous() if ours.endswith(_CONV) else tensor


def to_hf_tensor(ours: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t().unsqueeze(1).contiguous() if ours.endswith(_CONV) else tensor


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """The config.json transformers' RecurrentGemmaForCausalLM reads for ``config``."""
    pattern = {"recurrent": "recurrent", "local": "attention"}
    if "global" in config.layer_kinds:
        raise InvalidRequestError("RecurrentGemma has no global attention layers; this config cannot be exported")
    return {
        "architectures": ["RecurrentGemmaForCausalLM"], "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": 2 * config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "lru_width": config.recurrent_width, "attention_window_size": config.sliding_window,
        "conv1d_width": config.conv1d_width, "logits_soft_cap": config.final_logit_softcap,
        "rms_norm_eps": config.rms_norm_eps, "hidden_activation": "gelu_pytorch_tanh",
        "block_types": [pattern[k] for k in config.layer_kinds],
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_local_theta,
                            "partial_rotary_factor": config.rope_fraction},
        "partial_rotary_factor": config.rope_fraction, "rope_theta": config.rope_local_theta,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
