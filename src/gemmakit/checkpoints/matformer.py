"""MatFormer slicing of Gemma 3n: an E4B checkpoint loaded as a smaller model nested inside it.

Gemma 3n E4B was trained as a MatFormer: each layer's MLP holds narrower MLPs as its leading
units, and E2B is E4B with every MLP cut to its first 8192 units and layers 20-24 left out. Other
"Mix-n-Match" sizes pick a width per layer and layers to skip. A :class:`MatformerPlan` says
which; :func:`slice_checkpoint` turns an adapter's (config, tensors) into the smaller model's
before anything is built, so the model, caches and writers see an ordinary Gemma 3n.

What slicing does, as Google's MatFormer Lab notebook does it (google-gemini/gemma-cookbook,
``Gemma/[Gemma_3n]MatFormer_Lab.ipynb``, the "Update configuration" and "Slice the model!" cells):
  - a kept layer keeps the first ``w`` rows of ``gate_proj`` / ``up_proj`` and the first ``w``
    columns of ``down_proj``; its other tensors are unchanged, renumbered past the skipped layers;
  - the per-layer embedding table and the model's projection into it hold one slice per layer
    (``[.., layers, per_layer_input_dim]``): the skipped layers' slices go;
  - widths are listed per *kept* layer; skipped layers are numbered as in the checkpoint;
  - ``num_kv_shared_layers`` loses the skipped layers that were among the last (sharing) layers,
    and the layers whose keys and values the sharing layers read must stay (the notebook refuses
    to skip E4B's layers 18 and 19); here that is checked for any plan: every kept layer must read
    the keys and values it read before;
  - the activation-sparsity pattern keeps the kept layers' entries (the notebook rebuilds E4B's
    "0.95 on the first 10 layers" minus the skipped ones among them, the same thing).
Layer types (sliding or full attention) follow their layers likewise: transformers 5 requires
``layer_types`` to have one entry per layer.

Gemma 4's E2B and E4B are not nested this way (their hidden sizes differ, 1536 and 2560: the
gemma4 presets, from transformers' convert_gemma4_weights.py, and transformers' Gemma 4 config has
one MLP width for all layers), so plans apply to Gemma 3n only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES

from gemmakit.checkpoints.base import Checkpoint
from gemmakit.errors import MatformerPlanError, UnsupportedModelError
from gemmakit.models.config import ModelConfig
from gemmakit.quant.ggml import PACKABLE_TYPES, GGMLBlocks


@dataclass(frozen=True)
class MatformerPlan:
    """Which sub-model to cut out: an MLP width for each kept layer (or one for all of them), and
    the layers to skip (numbered as in the checkpoint)."""

    name: str
    ffn_widths: tuple[int, ...]
    skip_layers: tuple[int, ...] = ()
    source: str = ""  # where the numbers come from

    @property
    def num_layers(self) -> int:
        """Layers of the checkpoint the plan was written for."""
        return len(self.ffn_widths) + len(self.skip_layers)


# Google's published slicing configurations of Gemma 3n E4B: the dataset
# huggingface.co/datasets/google/gemma3n-slicing-configs (configs.csv, which the MatFormer Lab
# notebook reads), columns "FFN Hidden Dims" (written as multiples of 2_048) and "Layers Skipped".
# Rows taken: "Config for official E2B Model" (also printed in the notebook's "Config details"
# cell), "Config for E1.96B (layer-level)" and "Config for E2.54B (layer-level)". Their effective
# sizes are checked in tests/test_matformer.py: 1.91B and 1.96B as the table says; 2.52B by the
# widths of the E2.54B row, whose size column says 2.54B.
_NARROW, _FULL = 2048 * 4, 2048 * 8  # E2B's MLP width and E4B's
_SOURCE = "google/gemma3n-slicing-configs configs.csv, row {!r}"
PLANS: dict[str, MatformerPlan] = {p.name: p for p in (
    MatformerPlan("e2b", (_NARROW,) * 30, tuple(range(20, 25)), _SOURCE.format("Config for official E2B Model")),
    # E2B's layers and widths, but the first full-attention layer (4) at E4B's width
    MatformerPlan("e1.96b-layer-level", (_NARROW,) * 4 + (_FULL,) + (_NARROW,) * 25, tuple(range(20, 25)),
                  _SOURCE.format("Config for E1.96B (layer-level)")),
    # all 35 layers: E2B's widths, but layer 4 and the block E2B skips (20-24) at E4B's width
    MatformerPlan("e2.54b-layer-level", (_NARROW,) * 4 + (_FULL,) + (_NARROW,) * 15 + (_FULL,) * 5 + (_NARROW,) * 10,
                  (), _SOURCE.format("Config for E2.54B (layer-level)")),
)}

# The JSON form of a plan, as the MatFormer Lab notebook names its two inputs
_WIDTHS_KEY, _SKIP_KEY = "ffn_hidden_dims", "layers_to_skip"


def resolve_plan(plan: "MatformerPlan | str | Path | Mapping") -> MatformerPlan:
    """A plan from a :data:`PLANS` name, a JSON file's path, or the JSON's dict:
    ``{"ffn_hidden_dims": [one width per kept layer] or one width for all, "layers_to_skip": [...]}``."""
    if isinstance(plan, MatformerPlan):
        return plan
    if isinstance(plan, Mapping):
        return _plan_from_dict(plan, "the MatFormer plan")
    if str(plan) in PLANS:
        return PLANS[str(plan)]
    path = Path(plan)
    if not path.is_file():
        raise MatformerPlanError(f"MatFormer plan {str(plan)!r} is neither a named plan ({', '.join(PLANS)}) "
                                 "nor a JSON file")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MatformerPlanError(f"{path}: not a readable JSON MatFormer plan ({exc})") from None
    if not isinstance(raw, dict):
        raise MatformerPlanError(f"{path}: a MatFormer plan is a JSON object with {_WIDTHS_KEY!r} and {_SKIP_KEY!r}")
    return _plan_from_dict(raw, str(path), default_name=path.stem)


def _plan_from_dict(raw: Mapping, where: str, default_name: str = "custom") -> MatformerPlan:
    unknown = sorted(set(raw) - {_WIDTHS_KEY, _SKIP_KEY, "name"})
    if unknown or _WIDTHS_KEY not in raw:
        raise MatformerPlanError(f"{where}: a MatFormer plan has {_WIDTHS_KEY!r} (one MLP width per kept layer, or one "
                                 f"for all) and optionally {_SKIP_KEY!r}"
                                 + (f"; unknown keys {unknown}" if unknown else ""))
    widths, skip = raw[_WIDTHS_KEY], raw.get(_SKIP_KEY) or []
    if not (_ints(widths) and widths or isinstance(widths, int) and not isinstance(widths, bool)) or not _ints(skip):
        raise MatformerPlanError(f"{where}: {_WIDTHS_KEY!r} must be an integer or a list of integers, "
                                 f"{_SKIP_KEY!r} a list of layer indices")
    # One width for all layers is kept as a single entry until the checkpoint's depth is known
    widths = (widths,) if isinstance(widths, int) else tuple(widths)
    return MatformerPlan(str(raw.get("name", default_name)), widths, tuple(skip), where)


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def slice_config(config: ModelConfig, plan: "MatformerPlan | str | Path | Mapping") -> tuple[ModelConfig, list[int]]:
    """The sub-model's config, and the checkpoint's index of each of its layers."""
    plan = resolve_plan(plan)
    if config.family != "gemma3n":
        if config.family == "gemma4":
            raise UnsupportedModelError("--matformer slices Gemma 3n checkpoints; Gemma 4's E2B and E4B are separate "
                                        "models (hidden sizes 1536 and 2560), not one nested in the other: load the "
                                        "Gemma 4 size you want as it is")
        raise UnsupportedModelError(f"--matformer slices Gemma 3n checkpoints (E4B nests E2B); this is a "
                                    f"{config.family} model")
    layers, skip = config.num_layers, set(plan.skip_layers)
    if len(skip) != len(plan.skip_layers):
        raise MatformerPlanError(f"plan {plan.name!r}: {_SKIP_KEY} repeats layers")
    if len(plan.ffn_widths) > 1 and plan.num_layers != layers:
        raise MatformerPlanError(f"plan {plan.name!r} gives {len(plan.ffn_widths)} MLP widths and skips {len(skip)} "
                                 f"layers: it is for a {plan.num_layers}-layer model, and this checkpoint has {layers}"
                                 + (" (is it already a sub-model?)" if plan.num_layers > layers else ""))
    if bad := sorted(i for i in skip if not 0 <= i < layers):
        raise MatformerPlanError(f"plan {plan.name!r}: {_SKIP_KEY} {bad} are not layers of 0..{layers - 1}")
    kept = [i for i in range(layers) if i not in skip]
    if not kept:
        raise MatformerPlanError(f"plan {plan.name!r} skips every layer")
    widths = plan.ffn_widths * len(kept) if len(plan.ffn_widths) == 1 else plan.ffn_widths
    for j, (i, width) in enumerate(zip(kept, widths)):
        have = config.layer_plan[i].intermediate_size
        if not 0 < width <= have:
            raise MatformerPlanError(f"plan {plan.name!r}: layer {i} (the sub-model's {j}) gets MLP width {width}, but "
                                     f"the checkpoint's is {have}; a sub-model keeps 1..{have} of its units")
    # Every kept layer must read the keys and values it read before. Its producer, when kept, is
    # again the last non-sharing layer of its kind before the sharing ones, so the sub-model's own
    # rule (ModelConfig.kv_sources) finds it.
    sources = config.kv_sources()
    if lost := sorted({sources[i] for i in kept if sources[i] in skip}):
        readers = [i for i in kept if sources[i] in lost]
        raise MatformerPlanError(f"plan {plan.name!r} skips layer(s) {lost}, whose keys and values layers {readers} "
                                 "read; keep them")
    first_shared = layers - config.num_kv_shared_layers
    sliced = config.replace(
        name=f"{config.name} (MatFormer {plan.name})", num_layers=len(kept),
        layer_kinds=tuple(config.layer_kinds[i] for i in kept),
        intermediate_size=widths[0], intermediate_sizes=tuple(widths) if len(set(widths)) > 1 else (),
        activation_sparsity=tuple(config.activation_sparsity[i] for i in kept) if config.activation_sparsity else (),
        num_kv_shared_layers=sum(i >= first_shared for i in kept))
    assert [kept[j] for j in sliced.kv_sources()] == [sources[i] for i in kept]
    return sliced, kept


# Column cuts of stored blocks must fall on block boundaries. Every multiple of this one does for
# every type the block kernel runs: it is a multiple of each type's block size (gguf-py's
# GGML_QUANT_SIZES: 32 for Q8_0/Q4_x/Q5_x, 256 for the K-quants, 1 for F16/BF16) and of the 32
# weights per row that 16-bit rows need there (quant.ggml.packable). Where a cut is not, that
# matrix loads through its float copy.
_BLOCK_ALIGNED = math.lcm(32, *(GGML_QUANT_SIZES[t][0] for t in PACKABLE_TYPES))

_LAYER_NAME = re.compile(r"layers\.(\d+)\.(.+)")
_ROW_CUT = ("mlp.gate_proj.weight", "mlp.up_proj.weight")  # [width, hidden]: keep the first rows
_COLUMN_CUT = "mlp.down_proj.weight"  # [hidden, width]: keep the first columns


def slice_checkpoint(checkpoint: Checkpoint, plan: "MatformerPlan | str | Path | Mapping") -> Checkpoint:
    """``checkpoint`` as the sub-model ``plan`` cuts out of it. Nothing is read now: each tensor is
    cut when its loader runs (rows of a mapped file stay views of it; column cuts are copies)."""
    config, kept = slice_config(checkpoint.config, plan)
    new_index = {i: j for j, i in enumerate(kept)}
    widths = [p.intermediate_size for p in config.layer_plan]
    dim = config.per_layer_input_dim
    # the per-layer slices of the PLE table's columns and of its projection's rows that stay
    slices = [(i * dim, (i + 1) * dim) for i in kept]
    tensors, packed, file_names = {}, {}, {}
    for name, load in checkpoint.tensors.items():
        cut = None  # (float tensor cut, stored blocks cut or None where blocks cannot be cut)
        new_name = name
        if match := _LAYER_NAME.fullmatch(name):
            old, rest = int(match[1]), match[2]
            if old not in new_index:
                continue
            new_name = f"layers.{new_index[old]}.{rest}"
            w = widths[new_index[old]]
            if w == checkpoint.config.layer_plan[old].intermediate_size:
                pass  # the layer keeps its whole MLP
            elif rest in _ROW_CUT:
                cut = (lambda t, w=w: t[:w], lambda b, w=w: b._replace(blocks=b.blocks[:w]))
            elif rest == _COLUMN_CUT:
                cut = (lambda t, w=w: t[:, :w], _column_cut([(0, w)]) if w % _BLOCK_ALIGNED == 0 else None)
        elif name == "per_layer_embed.weight" and len(kept) < checkpoint.config.num_layers:
            cut = (lambda t: torch.cat([t[:, a:b] for a, b in slices], 1),
                   _column_cut(slices) if dim % _BLOCK_ALIGNED == 0 else None)
        elif name == "per_layer_model_proj.weight" and len(kept) < checkpoint.config.num_layers:
            rows = torch.tensor([r for a, b in slices for r in range(a, b)])
            cut = (lambda t: t.index_select(0, rows), lambda b: b._replace(blocks=b.blocks.index_select(0, rows)))
        tensors[new_name] = _then(load, cut[0]) if cut else load
        if name in checkpoint.packed and (cut is None or cut[1] is not None):
            packed[new_name] = _then(checkpoint.packed[name], cut[1]) if cut else checkpoint.packed[name]
        file_names[new_name] = checkpoint.file_names.get(name, name)
    return replace(checkpoint, config=config, tensors=tensors, packed=packed, file_names=file_names)


def _then(load: Callable, cut: Callable) -> Callable:
    return lambda: cut(load())


def _column_cut(ranges: Sequence[tuple[int, int]]) -> Callable[[GGMLBlocks], GGMLBlocks]:
    """Keep the weight columns ``ranges`` (each on block boundaries) of a matrix's stored blocks."""
    def cut(b: GGMLBlocks) -> GGMLBlocks:
        block, size = GGML_QUANT_SIZES[b.ggml_type]
        parts = [b.blocks[:, a // block * size:c // block * size] for a, c in ranges]
        return GGMLBlocks(torch.cat(parts, 1), b.ggml_type, sum(c - a for a, c in ranges))

    return cut
