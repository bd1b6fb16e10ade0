"""The official google/gemma_pytorch checkpoints: a torch-pickled ``{"model_state_dict": {...}}``.

Facts this adapter relies on (from gemma_pytorch's ``gemma/model.py`` and ``config.py``):
- Names: ``embedder.weight`` (``text_token_embedder.weight`` in the multimodal Gemma 3 model),
  ``model.norm.weight``, ``model.layers.N.{input_layernorm, post_attention_layernorm,
  pre_feedforward_layernorm, post_feedforward_layernorm}.weight``,
  ``model.layers.N.self_attn.{qkv_proj, o_proj, query_norm, key_norm}.weight`` and
  ``model.layers.N.mlp.{gate,up,down}_proj.weight``. Gemma 1 has only the first two norms, and its
  ``post_attention_layernorm`` is the norm *before* the MLP (Gemma 2/3: the one after attention).
- ``qkv_proj`` is one ``[(heads + 2 * kv_heads) * head_dim, hidden]`` matrix: queries, then keys,
  then values, heads in order. RoPE rotates the two halves of each head, as ours does, so no row
  permutation is needed.
- RMSNorm weights are the offset from one (``x * (1 + w)``), as ours.
- The int8 ("-quant") checkpoints store each linear/embedding as int8 ``weight`` plus a per-row
  float ``weight_scaler``: the real weight is ``weight * weight_scaler[:, None]``.
- Extra entries such as the ``freqs_cis`` RoPE tables and the SigLIP tower (``siglip_vision_model.*``,
  ``mm_*``) are not text-decoder weights and are skipped.

A ``.ckpt`` carries no config. Its shapes give the family (QK-norm: Gemma 3; pre-feed-forward norm:
Gemma 2; else Gemma 1), hidden size, MLP size, layer count and vocabulary; the preset with the same
shapes supplies the rest (heads, window, RoPE, soft-caps). ``config=`` (``--config PRESET``) overrides.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from gemmakit.checkpoints.base import Checkpoint, TensorLoader, half_precision_matrices
from gemmakit.errors import CheckpointError
from gemmakit.models.config import PRESETS, ModelConfig, preset
from gemmakit.tokenizer import Tokenizer

SUFFIXES = (".ckpt", ".pt", ".pth")
_EMBED_NAMES = ("embedder.weight", "text_token_embedder.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# our per-layer name -> theirs (q/k/v are slices of the fused qkv_proj and handled apart)
_NAMES_V1 = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_NAMES_V23 = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
              "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
_SHARED = {"attn.o_proj": "self_attn.o_proj", "attn.q_norm": "self_attn.query_norm",
           "attn.k_norm": "self_attn.key_norm", "mlp.gate_proj": "mlp.gate_proj",
           "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj"}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a gemma_pytorch checkpoint, memory-mapped where the file format allows."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (pre-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: not a plain PyTorch state dict (refusing to unpickle arbitrary "
                              f"objects: {_first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors "
                              "(expected gemma_pytorch's {{'model_state_dict': {{name: tensor}}}})")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: the dict holds no tensors; not a model state dict")
    if not any(name in obj for name in _EMBED_NAMES):
        raise CheckpointError(f"{path}: no embedder.weight; not a gemma_pytorch Gemma checkpoint "
                              f"(first keys: {', '.join(map(str, list(obj)[:3]))})")
    return obj


def infer_config(shapes: Mapping[str, tuple[int, ...]], source: str) -> ModelConfig:
    """The preset whose shapes match the checkpoint's (a .ckpt stores no config)."""
    family = _family(shapes)
    vocab, hidden = _embed_shape(shapes, source)
    layers = 1 + max((int(m.group(1)) for n in shapes if (m := _LAYER.match(n))), default=-1)
    gate = shapes.get("model.layers.0.mlp.gate_proj.weight")
    if gate is None or layers == 0:
        raise CheckpointError(f"{source}: no model.layers.0.mlp.gate_proj.weight; not a gemma_pytorch checkpoint")
    qkv_rows = shapes.get("model.layers.0.self_attn.qkv_proj.weight", (0,))[0]
    for config in PRESETS.values():
        if (config.family, config.hidden_size, config.intermediate_size, config.num_layers) == \
                (family, hidden, gate[0], layers) and \
                qkv_rows == (config.num_heads + 2 * config.num_kv_heads) * config.head_dim:
            return config.replace(vocab_size=vocab)
    raise CheckpointError(
        f"{source}: no preset has these shapes ({family}, hidden {hidden}, MLP {gate[0]}, {layers} layers, "
        f"qkv rows {qkv_rows}); pass the architecture with --config PRESET (see `gemmakit info --list`)")


def _family(shapes: Mapping[str, tuple[int, ...]]) -> str:
    if "model.layers.0.self_attn.query_norm.weight" in shapes:
        return "gemma3"
    if "model.layers.0.pre_feedforward_layernorm.weight" in shapes:
        return "gemma2"
    return "gemma"


def _embed_shape(shapes: Mapping[str, tuple[int, ...]], source: str) -> tuple[int, int]:
    for name in _EMBED_NAMES:
        if name in shapes and len(shapes[name]) == 2:
            return shapes[name]
    raise CheckpointError(f"{source}: embedder.weight is missing or not a matrix")


def expected_shapes(config: ModelConfig, embed_name: str = "embedder.weight") -> dict[str, tuple[int, ...]]:
    """gemma_pytorch name -> shape, for every text-decoder weight of ``config``."""
    d, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    out = {embed_name: (config.vocab_size, d), "model.norm.weight": (d,)}
    norms = _NAMES_V1 if config.family == "gemma" else _NAMES_V23
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        for theirs in norms.values():
            out[p + theirs + ".weight"] = (d,)
        out[p + "self_attn.qkv_proj.weight"] = ((config.num_heads + 2 * config.num_kv_heads) * hd, d)
        out[p + "self_attn.o_proj.weight"] = (d, config.num_heads * hd)
        if config.qk_norm:
            out[p + "self_attn.query_norm.weight"] = (hd,)
            out[p + "self_attn.key_norm.weight"] = (hd,)
        out[p + "mlp.gate_proj.weight"] = (inter, d)
        out[p + "mlp.up_proj.weight"] = (inter, d)
        out[p + "mlp.down_proj.weight"] = (d, inter)
    return out


def _check_shapes(state: Mapping[str, torch.Tensor], config: ModelConfig, embed_name: str, source: str) -> None:
    expected = expected_shapes(config, embed_name)
    missing = [n for n in expected if n not in state]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing tensors {', '.join(missing[:3])}{more} "
                              f"(for a {config.family} model of {config.num_layers} layers)")
    for name, shape in expected.items():
        found = tuple(state[name].shape)
        if found != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {found}, expected {shape} "
                                  f"(config {config.name})")


def _weight(state: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """A float weight; int8 '-quant' weights are multiplied by their per-row scaler."""
    w = state[name]
    scaler = state.get(name.removesuffix("weight") + "weight_scaler")
    if scaler is not None and not w.is_floating_point():
        return w.float() * scaler.float()[:, None]
    return w


def _sources(config: ModelConfig, embed_name: str) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """Our parameter name -> the checkpoint tensor it comes from, and for q/k/v its rows of the fused qkv."""
    sources: dict[str, tuple[str, tuple[int, int] | None]] = {
        "embed.weight": (embed_name, None), "final_norm.weight": ("model.norm.weight", None)}
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    slices = {"attn.q_proj": (0, q_rows), "attn.k_proj": (q_rows, q_rows + kv_rows),
              "attn.v_proj": (q_rows + kv_rows, q_rows + 2 * kv_rows)}
    per_layer = {**(_NAMES_V1 if config.family == "gemma" else _NAMES_V23), **_SHARED}
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for o, t in per_layer.items():
            if o in ("attn.q_norm", "attn.k_norm") and not config.qk_norm:
                continue
            sources[f"{ours}{o}.weight"] = (f"{theirs}{t}.weight", None)
        for o, rows in slices.items():
            sources[f"{ours}{o}.weight"] = (f"{theirs}self_attn.qkv_proj.weight", rows)
    return sources


def gemma_pytorch_loaders(state: Mapping[str, torch.Tensor],
                          sources: dict[str, tuple[str, tuple[int, int] | None]]) -> dict[str, TensorLoader]:
    """Our parameter name -> loader reading (and, for q/k/v, slicing) the checkpoint's tensors."""
    def loader(name: str, rows: tuple[int, int] | None) -> TensorLoader:
        return (lambda: _weight(state, name)) if rows is None else (lambda: _weight(state, name)[rows[0]:rows[1]])

    return {ours: loader(name, rows) for ours, (name, rows) in sources.items()}


def _header(state: Mapping[str, torch.Tensor], sources: dict[str, tuple[str, tuple[int, int] | None]]):
    """``our name -> (stored float dtype, shape)`` from ``_sources``' table; int8 '-quant' weights
    have no float dtype here (they are scaled to float32 when loaded, so nothing of theirs stays 16-bit)."""
    def header(ours: str) -> tuple[torch.dtype | None, tuple[int, ...]]:
        name, rows = sources[ours]
        t = state[name]
        shape = tuple(t.shape) if rows is None else (rows[1] - rows[0], *t.shape[1:])
        return (t.dtype if t.is_floating_point() else None), shape

    return header


def open_gemma_pytorch_checkpoint(path: str | Path, config: ModelConfig | str | None = None) -> Checkpoint:
    """Open a gemma_pytorch ``.ckpt``; ``config`` (a ModelConfig or preset name) skips shape inference."""
    path = Path(path)
    state = read_state_dict(path)
    shapes = {n: tuple(t.shape) for n, t in state.items() if isinstance(t, torch.Tensor)}
    embed_name = next(n for n in _EMBED_NAMES if n in state)
    if config is None:
        config = infer_config(shapes, str(path))
    else:
        config = preset(config) if isinstance(config, str) else config
        config = config.replace(vocab_size=_embed_shape(shapes, str(path))[0])
    _check_shapes(state, config, embed_name, str(path))
    tokenizer = None
    for candidate in (path.parent / "tokenizer.model", path.parent / "tokenizer" / "tokenizer.model"):
        if candidate.is_file():
            tokenizer = Tokenizer.from_sentencepiece_file(candidate)
            break
    dtypes = {t.dtype for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    native = dtypes.pop() if len(dtypes) == 1 else torch.float32
    sources = _sources(config, embed_name)
    tensors = gemma_pytorch_loaders(state, sources)
    return Checkpoint(config=config, tensors=tensors, source=str(path),
                      tokenizer=tokenizer, native_dtype=native, metadata={"format": "gemma_pytorch"},
                      packed=half_precision_matrices(config, tensors, _header(state, sources)))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
