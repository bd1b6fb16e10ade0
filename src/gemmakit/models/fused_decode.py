"""A one-token decoding step's layers as one C++ call (``kernels/csrc/decode_step.cpp``).

Eagerly a decode step of Gemma 3 270M dispatches ~1,000 small ops around its matmuls: module
calls, views, splits, norms, cache writes, GELU, residual adds. Each costs a few microseconds of
Python and dispatch, together ~8 of a ~26 ms step on a 2-core EPYC, a third of the time.
``DecodeStack`` runs the same kernels on the same tensors in the same order from C++ (block
matmuls, RMSNorm, QK-norm + RoPE, one-query attention, the GELU kernel), so its output equals the eager
step bit for bit; what is left in Python per step is the embedding lookup, the rotary tables and
masks (once per layer kind, as before), the LM head and the cache bookkeeping.

It applies where the eager step would itself take those kernels: float32 on the CPU, autograd
off, at most ``KERNEL_MAX_ROWS`` rows, a KV cache that is not the compiled step's static one (a
generation's KVCache or the serving engine's RowKVCache) in float32 or int8 (``--kv-cache int8``:
the step quantises its new keys and values and attends over the codes as the eager layers do),
attention layers only, no biases, and every projection a GGML-block or dense float32 matrix.
Anything else (LoRA wrappers, bfloat16, RecurrentGemma) keeps the eager path. The stack holds
references to the model's weights; it is rebuilt whenever a module, weight or buffer of the layers
is no longer the object it was built from (``_fingerprint``). ``GEMMAKIT_FUSED_DECODE=0`` turns it
off (the eager step then runs, for comparison).
"""

from __future__ import annotations

import operator
import os

import torch
from torch import nn

from gemmakit.kernels import build
from gemmakit.kernels.gemm import KERNEL_MAX_ROWS, Linear
from gemmakit.models.cache import KVCache, LayerCache
from gemmakit.models.layers import RMSNorm
from gemmakit.models.masks import StepContext
from gemmakit.models.row_cache import RowKVCache
from gemmakit.quant.grouped import GGMLWeight, GroupedLinear

_EMPTY = torch.empty(0)
_ENABLED = os.environ.get("GEMMAKIT_FUSED_DECODE", "1") != "0"


def fused_hidden(model: nn.Module, h: torch.Tensor, contexts: dict, cache: KVCache | RowKVCache) -> torch.Tensor | None:
    """The final norm's output ``[B, 1, hidden]`` of a one-token step run as one C++ call, or None
    where the fused step does not apply (the caller then runs the eager layers). Writes the step's
    keys and values into ``cache`` like the eager layers do."""
    if not _ENABLED or not _step_applies(h, cache):
        return None
    stack = _stack_for(model)
    if stack is None:
        return None
    B = h.shape[0]
    g, loc = contexts.get("global"), contexts.get("local")
    g_slots, l_slots = _write_slots(g, B), _write_slots(loc, B)
    if (g is not None and g_slots is None) or (loc is not None and l_slots is None):
        return None
    if g is None:  # a model with one kind of layer passes it for both
        g, g_slots = loc, l_slots
    if loc is None:
        loc, l_slots = g, g_slots
    keys = [c.keys for c in cache.layers]
    values = [c.values for c in cache.layers]
    int8 = cache.layers[0].quantised  # (a cache is int8 in all its layers or in none)
    key_scales = [c.key_scale for c in cache.layers] if int8 else []
    value_scales = [c.value_scale for c in cache.layers] if int8 else []
    out = stack.step(h.reshape(B, -1), keys, values, key_scales, value_scales, g.cos, g.sin, g.bias, g_slots,
                     loc.cos, loc.sin, loc.bias, l_slots)
    return out.view(h.shape)


def _step_applies(h: torch.Tensor, cache: KVCache | RowKVCache) -> bool:
    return (h.dim() == 3 and h.shape[1] == 1 and h.shape[0] <= KERNEL_MAX_ROWS and h.dtype == torch.float32
            and h.device.type == "cpu" and not torch.is_grad_enabled() and isinstance(cache, (KVCache, RowKVCache))
            and not getattr(cache, "static", False)
            and all(isinstance(c, LayerCache) and (c.keys.dtype == torch.float32 or c.quantised)
                    for c in cache.layers))


def _write_slots(ctx: StepContext | None, rows: int) -> list[int] | None:
    """Where each row's new key goes, for a step whose layers store first and then attend to slots
    ``[0, S)`` of their buffer (``S`` = the mask's width), as the C++ step does: the step's write
    kind knows (``CacheWrite.decode_slots``, models/cache_writes.py). None where the step has no
    one-query bias or its write does something else; the eager layers then run it."""
    if ctx is None or ctx.bias is None:
        return None
    return ctx.write.decode_slots(rows, ctx.bias.shape[-1])


# --------------------------------------------------------------------------- building the stack


# Parameters, buffers and submodules assigned on any module since import (torch's global
# registration hooks see every ``module.x = ...`` and register_*). While it stands still, no
# module's tables can have changed by assignment, so a step skips the fingerprint's ~1,500
# lookups: ~40 us with warm caches, but ~220 us in a decode step, whose weight stream has just
# evicted those dictionaries from every cache. (``del module.x`` fires no hook; nothing deletes
# a layer's weights mid-generation.)
_assignments = 0


def _count_assignment(module: nn.Module, name: str, value) -> None:
    global _assignments
    _assignments += 1  # (returning None keeps the value as assigned)


for _hook in (nn.modules.module.register_module_parameter_registration_hook,
              nn.modules.module.register_module_buffer_registration_hook,
              nn.modules.module.register_module_module_registration_hook):
    _hook(_count_assignment)


def _stack_for(model: nn.Module):
    """The model's DecodeStack, built on first use and again when its weights changed; None if the
    model cannot run fused (remembered until its modules change)."""
    cached = model.__dict__.get("_fused_decode")
    if cached is not None:
        fingerprint, stack, assignments = cached
        if assignments == _assignments:
            return stack
        if _unchanged(fingerprint):  # assignments elsewhere (another model, a new cache's modules)
            model.__dict__["_fused_decode"] = (fingerprint, stack, _assignments)
            return stack
    assignments = _assignments
    stack = _build(model)
    model.__dict__["_fused_decode"] = (_fingerprint(model), stack, assignments)
    return stack


def _fingerprint(model: nn.Module) -> tuple:
    """The parameter, buffer and submodule tables of the model and of every module in its layers,
    with their sizes and the objects they held when the stack was built. Replacing a projection, a
    norm, a weight or a quantised weight's blocks (LoRA wrappers, requantisation, a new Parameter),
    or adding one (``fuse``), changes one of them; in-place edits of a weight need no rebuild, as
    the stack holds the same tensors."""
    modules = [model, *model.final_norm.modules(), *model.layers.modules()]
    tables = [d for m in modules for d in (m._parameters, m._buffers, m._modules)]
    entries = [(d, k, v) for d in tables for k, v in d.items()]
    return (tables, [len(d) for d in tables], [e[0] for e in entries], [e[1] for e in entries],
            [e[2] for e in entries])


def _unchanged(fingerprint: tuple) -> bool:
    """Whether every table still holds exactly its objects: ~1,500 lookups and identity checks,
    all inside C's ``map`` (~40 us a step, where looking the modules up by attribute took ~330)."""
    tables, sizes, entry_tables, keys, held = fingerprint
    return (list(map(len, tables)) == sizes
            and all(map(operator.is_, map(dict.get, entry_tables, keys), held)))


def _build(model: nn.Module):
    ext = build.kernel()
    c = model.config
    if ext is None or any(kind not in ("global", "local") for kind in c.layer_kinds) or not c.plain_blocks:
        return None
    if len({(p.head_dim, p.num_kv_heads) for p in c.layer_plan}) != 1:  # the C++ stack has one attention shape
        return None
    if model.final_norm.weight.dtype != torch.float32:
        return None
    plan = c.layer_plan[0]
    stack = ext.DecodeStack(c.num_heads, plan.num_kv_heads, plan.head_dim, c.intermediate_size, c.rms_norm_eps,
                            c.attention_scale, c.attn_logit_softcap or 0.0, model.final_norm.weight.detach())
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        norms = [_norm(layer.attn_norm), _norm(layer.post_attn_norm), _norm(attn.q_norm), _norm(attn.k_norm),
                 _norm(layer.mlp_norm), _norm(layer.post_mlp_norm)]
        qkv = _projection(ext, [attn.qkv_proj] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj])
        o = _projection(ext, [attn.o_proj])
        gate_up = _projection(ext, [mlp.gate_up_proj] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj])
        down = _projection(ext, [mlp.down_proj])
        if any(n is None for n in norms) or None in (qkv, o, gate_up, down) or norms[0].numel() == 0:
            return None
        stack.add_layer(layer.kind == "global", norms, qkv, o, gate_up, down)
    return stack


def _norm(module: nn.Module | None) -> torch.Tensor | None:
    """An RMSNorm's float32 weight, an empty tensor for an absent norm, None for anything else."""
    if module is None or isinstance(module, nn.Identity):
        return _EMPTY
    if type(module) is RMSNorm and module.weight.dtype == torch.float32:
        return module.weight.detach()
    return None


def _projection(ext, modules: list[nn.Module]):
    parts = [_part(ext, m) for m in modules]
    return None if any(p is None for p in parts) else ext.DecodeProjection(parts)


def _part(ext, module: nn.Module):
    """One linear layer as a DecodePart, or None where the eager layer does something else."""
    if type(module) is GroupedLinear:
        w = module.w
        return ext.DecodePart.ggml(w.parts(), w.types, w.in_features, w.activations) if type(w) is GGMLWeight else None
    if type(module) in (Linear, nn.Linear) and module.bias is None and module.weight.dtype == torch.float32:
        return ext.DecodePart.dense(module.weight.detach())
    return None
