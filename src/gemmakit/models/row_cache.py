"""A KV cache whose rows move independently: the cache of a continuous-batching engine.

:class:`~gemmakit.models.cache.KVCache` advances one column cursor for the whole batch (rows are
left-padded to line up). A serving engine cannot line rows up: requests join and leave at every
token, one row prefills a prompt chunk while another decodes its 300th token. Here each row writes
its keys at its own columns, chosen from the positions of the new tokens:

- global layers: column = position (row ``r``'s token at position ``p`` lives in column ``p``);
- local layers: ring slot = position % window;
- padding (position ``-1``) goes to one extra "trash" slot at the end that no mask ever shows.

Masks stay a pure function of stored positions (``attention_mask``), so nothing else changes.
A row can be cut back to a prefix (``truncate``), which is what prefix caching needs. Each slot
also keeps its token's attention group (-1: causal; media soft tokens attend both ways within
theirs, ``ModelConfig.group_layer_kinds``), written with its position.

Recurrent (Griffin) layers keep one :class:`~gemmakit.models.cache.RecurrentState` row per
sequence. Padding steps leave it untouched (see :mod:`gemmakit.models.griffin`) and position 0
resets it, so rows need no cursor of their own; but a state summarises *all* tokens it has read,
so it can only be continued, never cut back: ``recurrent_len`` counts the positions it holds.
"""

from __future__ import annotations

import torch

from gemmakit.errors import InvalidRequestError
from gemmakit.models.cache import LayerCache, RecurrentState, layer_states
from gemmakit.models.cache_writes import RowWrite
from gemmakit.models.config import ModelConfig
from gemmakit.models.layers import rope_cos_sin
from gemmakit.models.masks import RecurrentContext, StepContext, attention_mask


class RowKVCache:
    """``rows`` independent sequences of up to ``max_len`` tokens each."""

    def __init__(self, config: ModelConfig, rows: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", *, kv_int8: bool = False, _views: tuple | None = None) -> None:
        self.config = config
        self.max_len = max_len
        self.window = min(config.sliding_window or max_len, max_len)
        if _views is not None:  # a slice of another cache's rows, sharing its storage
            (self.layers, self.global_positions, self.ring_positions, self.recurrent_len, self.global_groups,
             self.ring_groups) = _views
            self.rows = self.global_positions.shape[0]
            return
        self.rows = rows
        # +1 slot per layer: the trash slot that padding writes to and no mask shows
        self.layers: list[LayerCache | RecurrentState] = layer_states(config, rows, max_len, self.window, dtype,
                                                                     device, extra_slots=1, kv_int8=kv_int8)
        self.global_positions = torch.full((rows, max_len + 1), -1, dtype=torch.long, device=device)
        self.ring_positions = torch.full((rows, self.window + 1), -1, dtype=torch.long, device=device)
        self.global_groups = torch.full_like(self.global_positions, -1)
        self.ring_groups = torch.full_like(self.ring_positions, -1)
        # Positions read by each row's recurrent state (-1: cut back, holds no usable prefix).
        self.recurrent_len = torch.zeros(rows, dtype=torch.long, device=device)

    def nbytes(self) -> int:
        return sum(c.rg_lru.nbytes + c.conv.nbytes if isinstance(c, RecurrentState) else c.nbytes
                   for c in self.layers if c is not None)

    def view(self, start: int, stop: int) -> RowKVCache:
        """Rows ``[start, stop)`` as a cache sharing this one's storage (writes land here)."""
        layers = [None if c is None  # a layer reading shared keys/values keeps none
                  else RecurrentState(c.rg_lru[start:stop], c.conv[start:stop]) if isinstance(c, RecurrentState)
                  else LayerCache(*(t[start:stop] if t is not None else None
                                    for t in (c.keys, c.values, c.key_scale, c.value_scale)))
                  for c in self.layers]
        return RowKVCache(self.config, 0, self.max_len, torch.float32,
                          _views=(layers, self.global_positions[start:stop], self.ring_positions[start:stop],
                                  self.recurrent_len[start:stop], self.global_groups[start:stop],
                                  self.ring_groups[start:stop]))

    def truncate(self, row: int, length: int) -> None:
        """Forget every position >= ``length`` in ``row`` (``0`` empties it)."""
        g, r = self.global_positions[row], self.ring_positions[row]
        g[g >= length] = -1
        r[r >= length] = -1
        if length == 0 or length < self.recurrent_len[row]:  # a state cannot forget its last tokens
            self.recurrent_len[row] = 0 if length == 0 else -1

    def holds_prefix(self, row: int, length: int) -> bool:
        """True when ``row`` can continue from position ``length`` after :meth:`truncate`.

        Global columns hold every position, but a local ring holds only the last ``window`` of
        them: continuing at ``length`` needs positions ``length - window + 1 .. length - 1``.
        A recurrent state continues only from exactly the positions it has read.
        """
        if length == 0:
            return True
        if "recurrent" in self.config.layer_kinds and int(self.recurrent_len[row]) != length:
            return False
        if self.config.sliding_window is None or "local" not in self.config.layer_kinds:
            return bool((self.global_positions[row, :length] >= 0).all()) if length <= self.max_len else False
        ring = self.ring_positions[row, :self.window]
        need = torch.arange(max(0, length - self.window + 1), length, device=ring.device)
        return bool(torch.isin(need, ring).all())

    # --- used by GemmaModel.forward -------------------------------------------------------------

    def contexts(self, positions: torch.Tensor, dtype: torch.dtype,
                 groups: torch.Tensor | None = None) -> dict[str, StepContext]:
        """Rotary tables, masks and write slots of one step; ``positions`` ``[B, T]``, -1 = padding;
        ``groups`` ``[B, T]`` the tokens' attention groups (None: all causal)."""
        c = self.config
        groups = _slot_groups(positions, groups)
        if int(positions.max()) >= self.max_len:
            raise InvalidRequestError(f"a sequence would exceed the cache size of {self.max_len} tokens")
        real = positions >= 0
        out: dict[str, StepContext] = {}
        kinds = set(c.layer_kinds)
        if "recurrent" in kinds:
            out["recurrent"] = RecurrentContext(positions)  # padding (-1) leaves a row's state as it is
        if "global" in kinds:
            g = c.kind_plans["global"]
            cos, sin = rope_cos_sin(positions.clamp(min=0), g.rotary_dim, g.rope_theta, g.rope_scaling, dtype,
                                    g.rope_proportion)
            slots = torch.where(real, positions, self.max_len)  # [B, T]
            self.global_positions.scatter_(1, slots, positions)
            self.global_positions[:, self.max_len] = -1
            self.global_groups.scatter_(1, slots, groups)
            length = int(positions.max()) + 1  # no real query sees a column past its own position
            k_pos = self.global_positions[:, :length]
            q_groups, k_groups = ((groups, self.global_groups[:, :length]) if "global" in c.group_layer_kinds
                                  else (None, None))
            out["global"] = StepContext(cos, sin, attention_mask(positions, k_pos, None, q_groups, k_groups),
                                        RowWrite(slots, length, write_first=True))
        if "local" in kinds:
            lp = c.kind_plans["local"]
            cos, sin = rope_cos_sin(positions.clamp(min=0), lp.rotary_dim, lp.rope_theta, lp.rope_scaling, dtype,
                                    lp.rope_proportion)
            # Only the last `window` new tokens of a row survive in its ring; the rest go to trash.
            row_end = positions.max(dim=1, keepdim=True).values + 1
            keep = real & (positions >= row_end - self.window)
            slots = torch.where(keep, positions % self.window, self.window)
            if positions.shape[1] == 1:
                # Decode: the slot a new key takes held position p - window, which the query at p
                # no longer sees; so write first and attend to the ring in place (no copy).
                self.ring_positions.scatter_(1, slots, positions)
                self.ring_positions[:, self.window] = -1
                self.ring_groups.scatter_(1, slots, groups)
                k_pos, self._pending_ring = self.ring_positions[:, :self.window], None
                k_groups = self.ring_groups[:, :self.window]
            else:
                k_pos = torch.cat([self.ring_positions[:, :self.window], positions], dim=1)
                k_groups = torch.cat([self.ring_groups[:, :self.window], groups], dim=1)
                self._pending_ring = slots
            q_groups, k_groups = (groups, k_groups) if "local" in c.group_layer_kinds else (None, None)
            mask = attention_mask(positions, k_pos, lp.window, q_groups, k_groups, c.group_bypasses_window)
            out["local"] = StepContext(cos, sin, mask,
                                       RowWrite(slots, self.window, write_first=self._pending_ring is None))
        return out

    def advance(self, positions: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        """After every layer ran: record which positions (and groups: those given to :meth:`contexts`)
        the rings now hold."""
        if "local" in self.config.layer_kinds and self._pending_ring is not None:
            self.ring_positions.scatter_(1, self._pending_ring, positions)
            self.ring_positions[:, self.window] = -1
            self.ring_groups.scatter_(1, self._pending_ring, _slot_groups(positions, groups))
        if "recurrent" in self.config.layer_kinds:
            last = positions.max(dim=1).values  # [B]; -1 for a row that only padded
            self.recurrent_len.copy_(torch.where(last >= 0, last + 1, self.recurrent_len))

    def lengths(self) -> torch.Tensor:
        """Number of positions held by each row's global columns (or the last ring position + 1)."""
        if "global" in self.config.layer_kinds:
            return (self.global_positions[:, :self.max_len] >= 0).sum(1)
        return self.ring_positions.max(dim=1).values + 1


def _slot_groups(positions: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """The group each slot of a step records: ``groups`` (None: all causal), -1 for padding."""
    if groups is None:
        return torch.full_like(positions, -1)
    return torch.where(positions >= 0, groups, -1)
