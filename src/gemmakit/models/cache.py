"""Explicit KV caches, sized from the config.

Global layers keep every position up to ``max_len``. Local (sliding-window) layers keep only the
last ``sliding_window`` positions in a ring buffer, so a 32K-token context costs local layers no
more than their window: the memory follows the real maths of the model.

Each slot remembers the absolute position it holds (``-1`` = empty or padding). Masks are then a
pure function of query and key positions, whatever order the ring happens to be in.

Recurrent (Griffin) layers hold a :class:`RecurrentState` instead: the RG-LRU state and the Conv1D's
last inputs. A model with no global layers (RecurrentGemma) therefore has a state whose size does
not depend on how many tokens it has seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemmakit.errors import InvalidRequestError
from gemmakit.models.cache_writes import Append, Bidirectional, FreshCausal, RingWrite, StaticWrite, Uncached
from gemmakit.models.config import ModelConfig
from gemmakit.models.layers import rope_cos_sin
from gemmakit.models.masks import RecurrentContext, StepContext, attention_mask, encoder_mask


@dataclass
class LayerCache:
    """Keys and values of one attention layer: ``[B, kv_heads, slots, head_dim]``.

    With int8 storage (``--kv-cache int8``) keys and values are int8 codes with one float32 scale
    per group of 32 entries of a vector (GGML's Q8_0 scheme) in ``key_scale``/``value_scale``
    ``[B, kv_heads, slots, head_dim / 32]``: symmetric absmax/127, an error below 0.4% of each
    group's largest entry. Per group rather than per vector because Gemma's values carry outliers
    (absmax ~9x the RMS in the 270M's first layers) that would coarsen a whole vector's step.
    1.125 bytes per entry: 56% of bfloat16, 28% of float32.
    Attention layers store and fetch through :meth:`update_and_fetch`, which follows the step's
    :class:`~gemmakit.models.cache_writes.CacheWrite`;
    :meth:`store` and :meth:`load` hide the int8 difference.
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None

    @property
    def quantised(self) -> bool:
        return self.key_scale is not None

    def store(self, index, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``/``v`` ``[B, kv_heads, n, head_dim]`` at slots ``index`` (a slice or index tensor)."""
        if not self.quantised:
            _put(self.keys, index, k)
            _put(self.values, index, v)
            return
        for codes, scales, x in ((self.keys, self.key_scale, k), (self.values, self.value_scale, v)):
            q, scale = _quantize(x, scales.shape[-1])
            _put(codes, index, q)
            _put(scales, index, scale)

    def scatter(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``/``v`` ``[B, kv_heads, n, head_dim]`` at per-row slots ``index [B, n]`` (the
        serving cache, whose rows write different slots), quantising them as :meth:`store` does."""
        for buffer, scales, x in ((self.keys, self.key_scale, k), (self.values, self.value_scale, v)):
            if scales is None:
                buffer.scatter_(2, index[:, None, :, None].expand_as(x), x)
                continue
            codes, scale = _quantize(x, scales.shape[-1])
            buffer.scatter_(2, index[:, None, :, None].expand_as(codes), codes)
            scales.scatter_(2, index[:, None, :, None].expand_as(scale), scale)

    def update_and_fetch(self, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values ``[B, kv_heads, T, head_dim]`` where ``ctx.write`` (built by
        the cache's ``contexts``) says, and return all keys/values the step may attend to."""
        return ctx.write.apply(self, k, v)

    def load(self, end: int | None = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots ``[0, end)`` (all slots by default) in ``dtype``."""
        k, v = self.keys[:, :, :end], self.values[:, :, :end]
        if not self.quantised:
            return k, v
        return _dequantize(k, self.key_scale[:, :, :end], dtype), _dequantize(v, self.value_scale[:, :, :end], dtype)

    def snapshot(self, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Copies of what ``slots`` hold (speculative decoding undoes rejected writes with them)."""
        return tuple(t[:, :, slots].clone() for t in self._tensors())

    def restore(self, slots: torch.Tensor, saved: tuple[torch.Tensor, ...]) -> None:
        for t, old in zip(self._tensors(), saved):
            t[:, :, slots] = old

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.keys, self.values) + ((self.key_scale, self.value_scale) if self.quantised else ())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors())


KV_GROUP = 32


def kv_int8_groups(head_dim: int) -> int:
    """Scales per cached vector with int8 storage: one per 32 entries (one per vector otherwise)."""
    return head_dim // KV_GROUP if head_dim % KV_GROUP == 0 else 1


def _quantize(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> int8 codes ``[..., D]`` and float32 scales ``[..., groups]``: symmetric
    absmax / 127 per group (at least 1e-12), codes rounded half to even (what the fused decode
    step's C++ writes too, kernels/csrc/decode_step.cpp)."""
    g = x.float().unflatten(-1, (groups, -1))  # [..., groups, group]
    scale = (g.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)
    return torch.round(g / scale[..., None]).flatten(-2).to(torch.int8), scale


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    g = codes.float().unflatten(-1, (scale.shape[-1], -1)) * scale[..., None]
    return g.flatten(-2).to(dtype)


def _put(buffer: torch.Tensor, index, x: torch.Tensor) -> None:
    if isinstance(index, torch.Tensor):
        buffer.index_copy_(2, index, x)  # compiles without specialising on the index
    else:
        buffer[:, :, index] = x


@dataclass
class RecurrentState:
    """State of one recurrent layer: ``rg_lru [B, lru_width]`` (float32), ``conv [B, conv1d_width - 1, lru_width]``."""

    rg_lru: torch.Tensor
    conv: torch.Tensor


class KVCache:
    """Per-layer key/value storage plus the positions each slot holds.

    ``length`` counts the timeline columns written so far (padding included); with left padding
    the columns of different rows hold different positions, which is why positions are stored.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", static: bool = False, kv_int8: bool = False) -> None:
        self.config = config
        # static: one-token steps attend to the whole global buffer (masked) so every step has the
        # same shapes, as a compiled decode step needs (GemmaModel.compile_decode)
        self.static = static
        self.batch = batch
        self.max_len = max_len
        self.window = min(config.sliding_window or max_len, max_len)
        self.length = 0
        self.layers: list[LayerCache | RecurrentState] = layer_states(config, batch, max_len, self.window, dtype, device,
                                                                      kv_int8=kv_int8)
        self.has_global = "global" in config.layer_kinds
        global_slots = max_len if self.has_global else 0  # without global layers nothing grows with max_len
        self.global_positions = torch.full((batch, global_slots), -1, dtype=torch.long, device=device)
        self.ring_positions = torch.full((batch, self.window), -1, dtype=torch.long, device=device)
        # Attention group of each slot (-1 = causal text); see attention_mask. Carried like positions
        # so that a bidirectional group split over two forward calls still sees its cached half.
        self.global_groups = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.ring_groups = torch.full((batch, self.window), -1, dtype=torch.long, device=device)
        if static:  # the compiled step writes keys, values and global positions in place, reads ring positions
            _mark_static_addresses(self.layers, self.global_positions, self.ring_positions)

    def nbytes(self) -> int:
        """Bytes held by keys and values and recurrent states (what `gemmakit info` reports)."""
        total = 0
        for c in self.layers:
            if isinstance(c, RecurrentState):
                total += c.rg_lru.nbytes + c.conv.nbytes
            elif c is not None:
                total += c.nbytes
        return total

    def ring_slots(self, num_new: int) -> tuple[torch.Tensor, int]:
        """Ring indices for the last ``min(num_new, window)`` of the new columns, and how many to skip."""
        keep = min(num_new, self.window)
        first_col = self.length + num_new - keep
        slots = torch.arange(first_col, first_col + keep, device=self.ring_positions.device) % self.window
        return slots, num_new - keep

    def static_step_inputs(self) -> tuple:
        """What the compiled one-token step (:func:`static_step_contexts`) reads and writes: the next
        column, the layers' buffers and the positions, tensors whose addresses never change."""
        return self.next_column(), self.layers, self.global_positions, self.ring_positions

    def next_column(self) -> torch.Tensor:
        """The timeline column a one-token step writes next, as a ``[1]`` device tensor: a compiled
        step takes it as data, where a Python int would be a constant it recompiles for."""
        return torch.full((1,), self.length, dtype=torch.long, device=self.global_positions.device)

    def contexts(self, positions: torch.Tensor, dtype: torch.dtype,
                 groups: torch.Tensor | None = None) -> dict[str, StepContext | RecurrentContext]:
        """This step's rotary tables, masks and write slots for each layer kind (:func:`step_contexts`)."""
        return step_contexts(self.config, positions, dtype, groups, self)

    def read_by_kind(self, reader: ModelConfig, positions: torch.Tensor, dtype: torch.dtype
                     ) -> tuple[dict[str, StepContext], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """What a model whose layers read this cache's keys and values (``reader.external_kv``: a
        Gemma 4 assistant drafting for the model that fills the cache) needs for queries at
        ``positions [B, T]``, which come after every cached position: for each of the reader's
        layer kinds, a step context (the reader's rotary tables; a mask over the cached positions,
        within the reader's window on sliding layers) and the keys and values
        ``[B, kv_heads, slots, head_dim]`` of the layer this model's last layer of that kind reads
        (``ModelConfig.kv_producers``). Nothing is written: the reader keeps no keys of its own."""
        producers = self.config.kv_producers()
        contexts: dict[str, StepContext] = {}
        shared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for kind, plan in reader.kind_plans.items():
            layer = self.layers[producers[kind]]
            if kind == "global":
                k, v = layer.load(self.length, dtype)
                k_pos = self.global_positions[:, :self.length]
            else:  # the ring as it stands: empty slots hold position -1, which the mask hides
                k, v = layer.load(dtype=dtype)
                k_pos = self.ring_positions
            cos, sin = rope_cos_sin(positions, plan.rotary_dim, plan.rope_theta, plan.rope_scaling, dtype,
                                    plan.rope_proportion)
            contexts[kind] = StepContext(cos, sin, attention_mask(positions, k_pos, plan.window), Uncached())
            shared[kind] = (k.to(dtype), v.to(dtype))
        return contexts, shared

    def advance(self, positions: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        """After every layer ran: record what the ring now holds and move the cursor past the step."""
        slots, skip = self.ring_slots(positions.shape[1])
        self.ring_positions[:, slots] = positions[:, skip:]
        self.ring_groups[:, slots] = -1 if groups is None else groups[:, skip:]
        self.length += positions.shape[1]

    def check_room(self, num_new: int) -> None:
        # Global layers fill a buffer of max_len; a ring that holds the full window never runs out.
        bounded = self.has_global or self.window < (self.config.sliding_window or 0)
        if bounded and self.length + num_new > self.max_len:
            raise InvalidRequestError(
                f"sequence of {self.length + num_new} tokens exceeds the cache size {self.max_len}; "
                "use a shorter prompt or fewer new tokens"
            )


def step_contexts(config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype,
              groups: torch.Tensor | None = None,
              cache: KVCache | None = None) -> dict[str, StepContext | RecurrentContext]:
    """Rotary tables and masks for each layer kind, built once per step: over ``cache`` (writing
    the step's positions into it), or over the step's own tokens where there is no cache."""
    c = config
    if c.bidirectional:
        return encoder_contexts(c, positions, dtype, cache)
    kinds = set(c.layer_kinds)
    out: dict[str, StepContext | RecurrentContext] = {}
    bypass = c.group_bypasses_window
    T = positions.shape[1]
    if cache is not None and cache.static and T == 1:  # as the compiled step computes them
        return static_step_contexts(c, positions, cache.next_column(), cache.global_positions,
                                    cache.ring_positions, dtype, groups, cache.global_groups, cache.ring_groups)
    fresh = T > 1 and groups is None and _plainly_causal(positions, cache)
    if "recurrent" in kinds:
        out["recurrent"] = RecurrentContext(positions)
    if "global" in kinds:
        g = c.kind_plans["global"]
        cos, sin = rope_cos_sin(positions, g.rotary_dim, g.rope_theta, g.rope_scaling, dtype, g.rope_proportion)
        groups_g = groups if "global" in c.group_layer_kinds else None
        k_groups = groups_g
        if fresh:
            if cache is not None:
                cache.global_positions[:, :T] = positions
            mask = attention_mask(positions, positions, None)
            out["global"] = StepContext(cos, sin, mask, FreshCausal(slice(0, T) if cache is not None else None))
        else:
            if cache is None:
                k_pos, write = positions, Uncached()
            else:
                end = cache.length + positions.shape[1]
                cache.global_positions[:, cache.length:end] = positions
                k_pos = cache.global_positions[:, :end]
                if groups_g is not None:
                    cache.global_groups[:, cache.length:end] = groups_g
                    k_groups = cache.global_groups[:, :end]
                write = Append(cache.length)
            out["global"] = StepContext(cos, sin, attention_mask(positions, k_pos, None, groups_g, k_groups), write)
    if "local" in kinds:
        lp = c.kind_plans["local"]
        window = lp.window
        groups_l = groups if "local" in c.group_layer_kinds else None
        cos, sin = rope_cos_sin(positions, lp.rotary_dim, lp.rope_theta, lp.rope_scaling, dtype, lp.rope_proportion)
        if fresh and T <= (window or T):
            mask = attention_mask(positions, positions, window)
            slots, skip = cache.ring_slots(T) if cache is not None else (None, 0)
            out["local"] = StepContext(cos, sin, mask, FreshCausal(slots, skip))
        elif cache is None:
            mask = attention_mask(positions, positions, window, groups_l, groups_l, bypass)
            out["local"] = StepContext(cos, sin, mask, Uncached())
        elif positions.shape[1] == 1 and (cache.window == window or cache.length < cache.window):
            # One new token (decoding): the slot it overwrites holds the position one full window
            # back, which it may not see anyway (or nothing yet, in a ring shorter than the window);
            # so store first and attend to the ring alone instead of copying the whole ring into a
            # concatenation every layer.
            slots, _ = cache.ring_slots(1)
            k_pos = cache.ring_positions.index_copy(1, slots, positions)
            k_groups = None if groups_l is None else cache.ring_groups.index_copy(1, slots, groups_l)
            mask = attention_mask(positions, k_pos, window, groups_l, k_groups, bypass)
            out["local"] = StepContext(cos, sin, mask, RingWrite(slots, write_first=True))
        else:
            k_pos = torch.cat([cache.ring_positions, positions], dim=1)
            k_groups = None if groups_l is None else torch.cat([cache.ring_groups, groups_l], dim=1)
            slots, skip = cache.ring_slots(positions.shape[1])
            mask = attention_mask(positions, k_pos, window, groups_l, k_groups, bypass)
            out["local"] = StepContext(cos, sin, mask, RingWrite(slots, skip))
    return out


def encoder_contexts(config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype,
                     cache: KVCache | None = None) -> dict[str, StepContext]:
    """Rotary tables and bidirectional masks (:func:`encoder_mask`) for a model whose queries see
    keys on both sides (``ModelConfig.bidirectional``): a whole sequence in one step, so no cache."""
    if cache is not None:
        raise InvalidRequestError("a bidirectional (embedding) model reads each text whole; it has no cache "
                                  "and does not generate")
    out: dict[str, StepContext] = {}
    for kind, plan in config.kind_plans.items():
        if kind == "recurrent":
            raise ValueError("a bidirectional model has attention layers only")
        cos, sin = rope_cos_sin(positions, plan.rotary_dim, plan.rope_theta, plan.rope_scaling, dtype,
                                plan.rope_proportion)
        out[kind] = StepContext(cos, sin, encoder_mask(positions, plan.window), Bidirectional())
    return out


def static_step_contexts(config: ModelConfig, positions: torch.Tensor, index: torch.Tensor,
                         global_positions: torch.Tensor, ring_positions: torch.Tensor, dtype: torch.dtype,
                         groups: torch.Tensor | None = None, global_groups: torch.Tensor | None = None,
                         ring_groups: torch.Tensor | None = None) -> dict[str, StepContext | RecurrentContext]:
    """Contexts of a one-token step over a static cache (``KVCache(static=True)``), whose shapes
    never change: global layers write their one column at ``index`` (recording its position in
    ``global_positions``) and attend to the whole buffer, whose unwritten columns hold position -1
    and are masked; sliding-window layers store into ring slot ``index % window`` first and attend
    to the ring alone (the slot it overwrites holds the position one full window back, which the
    new token may not see anyway). A static cache's ring always holds a full window."""
    c = config
    kinds = set(c.layer_kinds)
    out: dict[str, StepContext | RecurrentContext] = {}
    if "recurrent" in kinds:
        out["recurrent"] = RecurrentContext(positions)
    if "global" in kinds:
        g = c.kind_plans["global"]
        cos, sin = rope_cos_sin(positions, g.rotary_dim, g.rope_theta, g.rope_scaling, dtype, g.rope_proportion)
        global_positions.index_copy_(1, index, positions)
        groups_g = groups if "global" in c.group_layer_kinds else None
        if groups_g is not None:
            global_groups.index_copy_(1, index, groups_g)
        mask = attention_mask(positions, global_positions, None, groups_g, global_groups)
        out["global"] = StepContext(cos, sin, mask, StaticWrite(index))
    if "local" in kinds:
        lp = c.kind_plans["local"]
        cos, sin = rope_cos_sin(positions, lp.rotary_dim, lp.rope_theta, lp.rope_scaling, dtype, lp.rope_proportion)
        slots = index % ring_positions.shape[1]
        groups_l = groups if "local" in c.group_layer_kinds else None
        k_pos = ring_positions.index_copy(1, slots, positions)
        k_groups = None if groups_l is None else ring_groups.index_copy(1, slots, groups_l)
        mask = attention_mask(positions, k_pos, lp.window, groups_l, k_groups, c.group_bypasses_window)
        out["local"] = StepContext(cos, sin, mask, StaticWrite(slots))
    return out


def _plainly_causal(positions: torch.Tensor, cache: KVCache | None) -> bool:
    """Whether every row of a multi-token step is positions 0..T-1 into an empty cache: then each
    query sees exactly the earlier keys of this step (no padding, no cached prefix) and attention
    can use the causal kernel on the new keys alone (a prompt's prefill, a training batch)."""
    if cache is not None and cache.length != 0:
        return False
    T = positions.shape[1]
    return bool((positions == torch.arange(T, device=positions.device)).all())


def _mark_static_addresses(states: list, *others: torch.Tensor) -> None:
    """Tell torch.compile that a static cache's buffers keep their addresses, so that a CUDA-graph
    replay (``mode="reduce-overhead"``) may write keys and values into them in place. Without it,
    a graph that mutates tensors made outside it is not captured at all (torch skips CUDA graphs
    for it). A later cache's new addresses make torch record the graph again, once per cache
    (up to its re-record limit, 128 by default, after which the step runs compiled without graphs)."""
    for state in states:
        if isinstance(state, LayerCache):
            others += tuple(t for t in (state.keys, state.values, state.key_scale, state.value_scale) if t is not None)
    for t in others:
        torch._dynamo.mark_static_address(t)


def layer_states(config: ModelConfig, batch: int, max_len: int, window: int, dtype: torch.dtype,
                 device: torch.device | str, extra_slots: int = 0,
                 kv_int8: bool = False) -> list[LayerCache | RecurrentState]:
    """One zeroed state per layer: a recurrent state, or keys/values of ``window`` (local) or
    ``max_len`` (global) slots, plus ``extra_slots`` (the serving cache's slot for padding)."""
    states: list[LayerCache | RecurrentState | None] = []
    for i, plan in enumerate(config.layer_plan):
        if plan.reads_shared_kv:  # attends to an earlier layer's keys and values: nothing of its own to keep
            states.append(None)
            continue
        if plan.mixer == "recurrent":
            width = config.recurrent_width
            states.append(RecurrentState(
                rg_lru=torch.zeros(batch, width, dtype=torch.float32, device=device),
                conv=torch.zeros(batch, config.conv1d_width - 1, width, dtype=dtype, device=device),
            ))
            continue
        shape = (batch, plan.num_kv_heads, (window if plan.mixer == "local" else max_len) + extra_slots, plan.head_dim)
        if kv_int8:
            scale_shape = shape[:-1] + (kv_int8_groups(plan.head_dim),)
            states.append(LayerCache(keys=torch.zeros(shape, dtype=torch.int8, device=device),
                                     values=torch.zeros(shape, dtype=torch.int8, device=device),
                                     key_scale=torch.zeros(scale_shape, dtype=torch.float32, device=device),
                                     value_scale=torch.zeros(scale_shape, dtype=torch.float32, device=device)))
            continue
        states.append(LayerCache(keys=torch.zeros(shape, dtype=dtype, device=device),
                                 values=torch.zeros(shape, dtype=dtype, device=device)))
    return states
