"""Save a (merged or fully fine-tuned) model as a Hugging Face checkpoint directory.

The directory holds config.json, model.safetensors with transformers' names and the tokenizer, so
transformers, gemmakit and any tool that reads the HF layout load it. Written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gemmakit.models.config import ModelConfig
from gemmakit.models.decoder import GemmaModel

_ARCH = {"gemma": ("gemma", "GemmaForCausalLM"), "gemma2": ("gemma2", "Gemma2ForCausalLM"),
         "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}


def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """Our config as a transformers config.json (the fields our reader and transformers both use)."""
    model_type, arch = _ARCH[config.family]
    raw: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
        "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."), "rope_theta": config.rope_theta,
        "attention_bias": False,
    }
    if config.family != "gemma":
        raw.update(query_pre_attn_scalar=config.query_pre_attn_scalar, sliding_window=config.sliding_window,
                   attn_logit_softcapping=config.attn_logit_softcap,
                   final_logit_softcapping=config.final_logit_softcap,
                   layer_types=["sliding_attention" if k == "local" else "full_attention"
                                for k in config.layer_kinds])
    if config.family == "gemma3":
        raw["rope_local_base_freq"] = config.rope_local_theta
        raw["rope_scaling"] = ({"rope_type": "linear", "factor": config.rope_scaling_factor}
                               if config.rope_scaling_factor != 1.0 else None)
    return raw


def save_hf_directory(model: GemmaModel, tokenizer, directory: str | Path) -> Path:
    """Write ``model`` (plain nn.Linear layers: merge LoRA first) and its tokenizer as an HF directory."""
    from safetensors.torch import save_file

    from gemmakit.checkpoints.safetensors import hf_names
    from gemmakit.quant.grouped import GroupedEmbedding, GroupedLinear
    from gemmakit.train.files import atomic_directory

    if any(isinstance(m, (GroupedLinear, GroupedEmbedding)) for m in model.modules()):
        from gemmakit.errors import InvalidRequestError

        raise InvalidRequestError("this model holds quantised or 16-bit weights as stored, not float parameters; "
                                  "load it with quant='none' (--quant none) to write it as a float checkpoint")
    names = hf_names(model.config)
    state = {names[n]: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()}
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(model.config, model.dtype), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)
