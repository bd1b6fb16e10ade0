"""LoRA: a frozen linear layer plus a trainable low-rank update, saved in PEFT's layout.

``y = x W^T + (alpha / r) * dropout(x) A^T B^T`` with ``A [r, in]`` random and ``B [out, r]``
zero, so training starts from the base model exactly. :class:`LoRALinear` *is* an ``nn.Linear``
that keeps the base ``weight`` under the same name, so the rest of gemmakit (name mappings,
exporters, FSDP wrapping) sees the model it knows; the update lives in ``lora_A`` / ``lora_B``
sub-layers, the names PEFT uses too.

Adapters are written as ``adapter_config.json`` + ``adapter_model.safetensors`` with transformers'
parameter names, so ``peft.PeftModel.from_pretrained(hf_model, dir)`` reproduces our logits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.errors import CheckpointError, InvalidRequestError
from gemmakit.io import atomic_directory
from gemmakit.models.decoder import GemmaModel
from gemmakit.models.gemm import Linear

# our module suffix -> the short name PEFT and transformers use
TARGETS = {
    "attn.q_proj": "q_proj", "attn.k_proj": "k_proj", "attn.v_proj": "v_proj", "attn.o_proj": "o_proj",
    "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "down_proj",
}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # short names ("q_proj") or ours ("attn.q_proj")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """A linear layer with a frozen base weight and a trainable rank-``r`` update (kept in float32)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float,
                 generator: torch.Generator | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: no copy of the base weights
        self.bias = base.bias
        self.scaling = alpha / rank
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)  # PEFT's default
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype))) * self.scaling
        return F.linear(x, self.weight, self.bias) + update.to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # [out, in]
        return (self.weight.float() + delta).to(self.weight.dtype)


def _resolve_targets(targets: tuple[str, ...]) -> set[str]:
    """Short or full target names -> our module suffixes; unknown names are a user error."""
    short_to_ours = {short: ours for ours, short in TARGETS.items()}
    resolved = set()
    for t in targets:
        t = t.removeprefix("self_attn.")
        if t in TARGETS:
            resolved.add(t)
        elif t in short_to_ours:
            resolved.add(short_to_ours[t])
        else:
            raise InvalidRequestError(
                f"LoRA target {t!r} does not exist; choose from {', '.join(DEFAULT_TARGETS)}")
    if not resolved:
        raise InvalidRequestError("no LoRA targets given")
    return resolved


def apply_lora(model: GemmaModel, config: LoRAConfig, seed: int = 0) -> list[str]:
    """Wrap the targeted linear layers in place, freeze everything else; returns the wrapped names.

    The initial ``A`` matrices come from ``seed`` alone (not the global RNG), so two runs with the
    same seed start from the same adapter.
    """
    if config.rank < 1:
        raise InvalidRequestError("--lora-rank must be at least 1")
    suffixes = _resolve_targets(config.targets)
    model.requires_grad_(False)
    wrapped = []
    generator = torch.Generator(device=model.device).manual_seed(seed)
    for name, module in list(model.named_modules()):
        suffix = name.split(".", 2)[-1] if name.startswith("layers.") else None
        if suffix in suffixes and isinstance(module, nn.Linear) and not isinstance(module, LoRALinear):
            parent_name, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), attr,
                    LoRALinear(module, config.rank, config.alpha, config.dropout, generator))
            wrapped.append(name)
    if not wrapped:
        raise InvalidRequestError("no LoRA target matched a linear layer of this model")
    return wrapped


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def merge_lora(model: GemmaModel) -> GemmaModel:
    """Fold every update into its base weight and put plain ``nn.Linear`` layers back (for inference/export)."""
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoRALinear):
                plain = Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device="meta")
                plain.weight = nn.Parameter(module.merged_weight(), requires_grad=False)
                plain.bias = module.bias
                parent_name, attr = name.rsplit(".", 1)
                setattr(model.get_submodule(parent_name), attr, plain)
    return model


def _peft_key(our_module: str, hf: dict[str, str], part: str) -> str:
    """``layers.0.attn.q_proj`` -> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    hf_module = hf[our_module + ".weight"].removesuffix(".weight")
    return f"base_model.model.{hf_module}.{part}.weight"


def save_adapter(model: GemmaModel, directory: str | Path, config: LoRAConfig, base_model: str = "") -> Path:
    """Write the adapter in PEFT's layout, atomically (a temporary directory renamed into place)."""
    from safetensors.torch import save_file

    from gemmakit.checkpoints.safetensors import hf_names

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
    from safetensors.torch import load_file

    from gemmakit.checkpoints.safetensors import hf_names

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
