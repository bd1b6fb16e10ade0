"""The official RecurrentGemma PyTorch checkpoint: one ``torch.save``-d state dict (e.g. ``2b.pt``).

That layout is the one of google-deepmind/recurrentgemma's ``recurrentgemma.torch.Griffin``:

    embedder.input_embedding                                  [V, D]
    blocks.{i}.temporal_pre_norm.scale / channel_pre_norm.scale   (norms store w, applied as 1 + w)
    blocks.{i}.recurrent_block.{linear_x,linear_y,linear_out}.{weight,bias}
    blocks.{i}.recurrent_block.conv_1d.{w [K, W], b}
    blocks.{i}.recurrent_block.rg_lru.{a_param, input_gate.{w,b}, a_gate.{w,b}}
    blocks.{i}.attention_block.{proj_q,proj_k,proj_v}.weight, proj_final.{weight,bias}
    blocks.{i}.mlp_block.ffw_up.{w [2, D, E], b [2, 1, 1, E]}, ffw_down.{weight,bias}
    final_norm.scale

The file carries no config: the shapes give the sizes and block kinds, and the rest (window 2048,
soft-cap 30, embeddings scaled by sqrt(D), half-rotary RoPE) is what both published presets share.
The tokenizer is the ``tokenizer.model`` next to the file, as the official download ships it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gemmakit.checkpoints.base import Checkpoint, TensorLoader
from gemmakit.errors import CheckpointError
from gemmakit.models.config import PRESETS, LayerKind, ModelConfig
from gemmakit.tokenizer import Tokenizer

SUFFIXES = (".pt", ".pth", ".ckpt")


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a readable checkpoint"
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({str(exc).splitlines()[0]})") from None
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]
    if not isinstance(state, dict) or "embedder.input_embedding" not in state:
        raise CheckpointError(f"{path}: not a RecurrentGemma checkpoint (no embedder.input_embedding)")
    return state


def config_from_state_dict(state: dict[str, torch.Tensor], source: str) -> ModelConfig:
    """Sizes and block kinds from the tensor shapes; everything else from the RecurrentGemma presets."""
    vocab, width = state["embedder.input_embedding"].shape
    kinds: list[LayerKind] = []
    heads = lru_width = conv_width = kv_dim = None
    while f"blocks.{len(kinds)}.channel_pre_norm.scale" in state:
        prefix = f"blocks.{len(kinds)}."
        if f"{prefix}recurrent_block.rg_lru.a_gate.w" in state:
            kinds.append("recurrent")
            heads, block, _ = state[f"{prefix}recurrent_block.rg_lru.a_gate.w"].shape
            lru_width = heads * block
            conv_width = state[f"{prefix}recurrent_block.conv_1d.w"].shape[0]
        elif f"{prefix}attention_block.proj_k.weight" in state:
            kinds.append("local")
            kv_dim = state[f"{prefix}attention_block.proj_k.weight"].shape[0]
        else:
            raise CheckpointError(f"{source}: block {len(kinds)} is neither recurrent nor attention")
    if not kinds or heads is None or kv_dim is None:
        raise CheckpointError(f"{source}: expected both recurrent and attention blocks")
    head_dim = width // heads
    base = PRESETS["recurrentgemma-2b"]  # the 2B and 9B presets agree on everything not in the shapes
    name = next((n for n, c in PRESETS.items() if c.family == "recurrentgemma" and not n.endswith("-it")
                 and c.hidden_size == width and c.num_layers == len(kinds)), "recurrentgemma")
    return base.replace(
        name=name, vocab_size=vocab, hidden_size=width,
        intermediate_size=state["blocks.0.mlp_block.ffw_up.w"].shape[-1], num_layers=len(kinds),
        num_heads=heads, num_kv_heads=kv_dim // head_dim, head_dim=head_dim, layer_kinds=tuple(kinds),
        query_pre_attn_scalar=head_dim, lru_width=lru_width, conv1d_width=conv_width,
    )


def _mapping(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Our name -> (their name, how to convert). Conversions: "" as is, "t" transpose, "ffw0"/"ffw1"."""
    names: dict[str, tuple[str, ...]] = {"embed.weight": ("embedder.input_embedding", ""),
                                         "final_norm.weight": ("final_norm.scale", "")}
    for i, kind in enumerate(config.layer_kinds):
        ours, theirs = f"layers.{i}.", f"blocks.{i}."
        table = {
            "attn_norm.weight": ("temporal_pre_norm.scale", ""),
            "mlp_norm.weight": ("channel_pre_norm.scale", ""),
            "mlp.gate_proj.weight": ("mlp_block.ffw_up.w", "w0"),
            "mlp.up_proj.weight": ("mlp_block.ffw_up.w", "w1"),
            "mlp.gate_proj.bias": ("mlp_block.ffw_up.b", "b0"),
            "mlp.up_proj.bias": ("mlp_block.ffw_up.b", "b1"),
            "mlp.down_proj.weight": ("mlp_block.ffw_down.weight", ""),
            "mlp.down_proj.bias": ("mlp_block.ffw_down.bias", ""),
        }
        if kind == "recurrent":
            rb = "recurrent_block."
            table |= {f"recurrent.{p}.{t}": (f"{rb}{p}.{t}", "") for p in ("linear_x", "linear_y", "linear_out")
                      for t in ("weight", "bias")}
            table |= {
                "recurrent.conv1d.weight": (f"{rb}conv_1d.w", ""),
                "recurrent.conv1d.bias": (f"{rb}conv_1d.b", ""),
                "recurrent.rg_lru.a_param": (f"{rb}rg_lru.a_param", ""),
                "recurrent.rg_lru.input_gate.weight": (f"{rb}rg_lru.input_gate.w", ""),
                "recurrent.rg_lru.input_gate.bias": (f"{rb}rg_lru.input_gate.b", ""),
                "recurrent.rg_lru.a_gate.weight": (f"{rb}rg_lru.a_gate.w", ""),
                "recurrent.rg_lru.a_gate.bias": (f"{rb}rg_lru.a_gate.b", ""),
            }
        else:
            ab = "attention_block."
            table |= {
                "attn.q_proj.weight": (f"{ab}proj_q.weight", ""),
                "attn.k_proj.weight": (f"{ab}proj_k.weight", ""),
                "attn.v_proj.weight": (f"{ab}proj_v.weight", ""),
                "attn.o_proj.weight": (f"{ab}proj_final.weight", ""),
                "attn.o_proj.bias": (f"{ab}proj_final.bias", ""),
            }
        names |= {ours + k: (theirs + n, how) for k, (n, how) in table.items()}
    return names


def _convert(tensor: torch.Tensor, how: str) -> torch.Tensor:
    if how in ("w0", "w1"):  # ffw_up.w [2, D, E]: x @ w[c]; nn.Linear wants [E, D]
        return tensor[int(how[1])].t().contiguous()
    if how in ("b0", "b1"):  # ffw_up.b [2, 1, 1, E]
        return tensor[int(how[1])].reshape(-1)
    return tensor


def open_recurrentgemma_torch(path: Path) -> Checkpoint:
    """Open an official RecurrentGemma ``.pt`` state dict (tokenizer.model beside it, if present)."""
    state = _load_state_dict(path)
    config = config_from_state_dict(state, str(path))
    mapping = _mapping(config)
    missing = [theirs for theirs, _ in mapping.values() if theirs not in state]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {', '.join(missing[:3])}"
                              + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    tensors: dict[str, TensorLoader] = {
        ours: (lambda n=theirs, h=how: _convert(state[n], h)) for ours, (theirs, how) in mapping.items()
    }
    tokenizer = Tokenizer.from_directory(path.parent)
    dtype = state["embedder.input_embedding"].dtype
    return Checkpoint(config=config, tensors=tensors, source=str(path), tokenizer=tokenizer,
                      native_dtype=dtype if dtype.is_floating_point else torch.float32,
                      metadata={"format": "recurrentgemma-torch"})
