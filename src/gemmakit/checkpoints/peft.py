"""LoRA adapters in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors`` with
transformers' parameter names, so ``peft.PeftModel.from_pretrained(hf_model, dir)`` reproduces our
logits, and an adapter trained by PEFT applies to our model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gemmakit.checkpoints.safetensors import hf_names
from gemmakit.errors import CheckpointError, InvalidRequestError
from gemmakit.io import atomic_directory
from gemmakit.models.decoder import GemmaModel
from gemmakit.models.lora import TARGETS, LoRAConfig, LoRALinear, apply_lora, merge_lora


def _peft_key(our_module: str, hf: dict[str, str], part: str) -> str:
    """``layers.0.attn.q_proj`` -> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    hf_module = hf[our_module + ".weight"].removesuffix(".weight")
    return f"base_model.model.{hf_module}.{part}.weight"


def save_adapter(model: GemmaModel, directory: str | Path, config: LoRAConfig, base_model: str = "") -> Path:
    """Write the adapter in PEFT's layout, atomically (a temporary directory renamed into place)."""
    hf = hf_names(model.config)
    tensors: dict[str, torch.Tensor] = {}
    targets = set()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            targets.add(TARGETS[name.split(".", 2)[-1]])
            for part in ("lora_A", "lora_B"):
                w = getattr(module, part).weight
                tensors[_peft_key(name, hf, part)] = w.detach().to("cpu", torch.float32).contiguous()
    if not tensors:
        raise InvalidRequestError("the model has no LoRA layers to save")
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
    return Path(directory)


def load_adapter(model: GemmaModel, directory: str | Path, merge: bool = True) -> GemmaModel:
    """Apply a PEFT LoRA adapter directory to ``model`` (ours or one trained by PEFT), merged by default."""
    directory = Path(directory)
    cfg_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"{directory}: not a LoRA adapter (needs adapter_config.json and "
                              "adapter_model.safetensors)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({exc})") from None
    if raw.get("peft_type", "LORA") != "LORA" or raw.get("use_dora") or raw.get("rank_pattern") \
            or raw.get("alpha_pattern") or raw.get("use_rslora"):
        raise CheckpointError(f"{cfg_path}: only plain LoRA adapters are supported")
    targets = raw.get("target_modules")
    if isinstance(targets, str):  # PEFT allows a regex; we accept only the plain list form
        raise CheckpointError(f"{cfg_path}: target_modules as a regex is not supported")
    config = LoRAConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=0.0, targets=tuple(targets))
    apply_lora(model, config)
    weights = load_file(str(weights_path))
    hf = hf_names(model.config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, LoRALinear):
                continue
            for part in ("lora_A", "lora_B"):
                key = _peft_key(name, hf, part)
                # PEFT names may or may not carry the adapter name ("lora_A.default.weight")
                tensor = weights.get(key, weights.get(key.replace(f"{part}.weight", f"{part}.default.weight")))
                if tensor is None:
                    raise CheckpointError(f"{weights_path}: missing {key}")
                target = getattr(module, part).weight
                if tensor.shape != target.shape:
                    raise CheckpointError(f"{weights_path}: {key} has shape {tuple(tensor.shape)}, "
                                          f"expected {tuple(target.shape)} (adapter for another model?)")
                target.copy_(tensor)
    model.requires_grad_(False)
    return merge_lora(model) if merge else model
