"""Where a step's new keys and values go in a layer's cache, and which keys the step attends to:
one :class:`CacheWrite` per layer kind and step (``StepContext.write``, models/masks.py).

The caches that know their own layout build them (models/cache.py's ``step_contexts`` and
``static_step_contexts``, models/row_cache.py's ``RowKVCache.contexts``); the attention layers
only call :meth:`CacheWrite.apply`, and the fused decode step (models/fused_decode.py) asks
:meth:`CacheWrite.decode_slots` where each row's one new key goes. Each kind says one thing about
a step, so neither has to work out from a set of flags which case it is in.

Two orders of storing and attending appear below. Storing first and then attending to the buffer
alone saves copying the buffer into a concatenation in every layer; it is right whenever the slots
written hold nothing the step may see (a global layer's next columns, or a ring slot whose
position the new token's window has just left). Otherwise (several new tokens on a ring, whose
later ones overwrite slots the earlier ones still see) the step attends to the old buffer followed
by its new keys, and stores afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from gemmakit.models.cache import LayerCache


class CacheWrite:
    """Base of the kinds: ``apply`` stores a step's keys/values ``[B, kv_heads, T, head_dim]`` into
    one layer's cache and returns the keys/values the step's mask covers."""

    # The step's queries see exactly the step's own keys, causally (a fresh cache, no padding, no
    # groups, within the window): attention may then use SDPA's causal kernel on the new keys alone,
    # which skips the masked half instead of computing it (the mask is the plain causal [T, T] one).
    attends_own_keys_causally: ClassVar[bool] = False
    # The step's queries see keys on both sides (an embedding model's encoder). Its mask hides
    # little, so the query-block GEMM attention has nothing to skip, and SDPA's fused kernel ran
    # 2.3x faster on EmbeddingGemma's shapes (8 texts of 512 tokens) than it did.
    sees_both_sides: ClassVar[bool] = False

    def apply(self, layer: LayerCache, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode_slots(self, rows: int, width: int) -> list[int] | None:
        """For a one-token step over ``rows`` rows: the slot each row's new key goes to, where the
        step stores first and then attends to slots ``[0, width)`` of the buffer (what the fused
        decode step does); None where the step does something else."""
        return None


@dataclass(frozen=True)
class Uncached(CacheWrite):
    """No cache (a training batch, a scoring pass): nothing is stored and the step attends to its
    own keys under the mask."""

    def apply(self, layer: LayerCache, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v


@dataclass(frozen=True)
class Bidirectional(Uncached):
    """No cache, and every query sees the step's keys on both sides of it, under the mask (an
    encoder: models/masks.py ``encoder_mask``)."""

    sees_both_sides: ClassVar[bool] = True


@dataclass(frozen=True)
class FreshCausal(CacheWrite):
    """Positions 0..T-1 of every row, into an empty cache or none: the step attends to its own keys
    causally, and stores what later steps need: its keys from the ``skip``-th on at ``slots`` (a
    global layer's first columns, ``slice(0, T)``; a ring's slots for the last ``window`` keys), or
    nothing where ``slots`` is None (no cache)."""

    slots: slice | torch.Tensor | None
    skip: int = 0

    attends_own_keys_causally: ClassVar[bool] = True

    def apply(self, layer: LayerCache, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slots is not None:
            layer.store(self.slots, k[:, :, self.skip:], v[:, :, self.skip:])
        return k, v


@dataclass(frozen=True)
class Append(CacheWrite):
    """A global layer of a growing cache (KVCache): the step's keys go to columns
    ``[start, start + T)`` and it attends to columns ``[0, start + T)``."""

    start: int

    def apply(self, layer: LayerCache, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.start + k.shape[2]
        layer.store(slice(self.start, end), k, v)
        return layer.load(end, k.dtype)

    def decode_slots(self, rows: int, width: int) -> list[int] | None:
        return [self.start] * rows


@dataclass(frozen=True)
class RingWrite(CacheWrite):
    """A sliding-window layer of a growing cache (KVCache), whose ring keeps the last ``window``
    keys: the step's keys from the ``skip``-th on go to ring slots ``slots`` (the earlier ones fall
    out of the window before they could be stored). With ``write_first`` (one decoding token, see
    ``step_contexts``) the step stores and then attends to the ring alone; otherwise it attends to
    what the ring held before the step followed by its new keys."""

    slots: torch.Tensor
    skip: int = 0
    write_first: bool = False

    def apply(self, layer: LayerCache, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.write_first:
            layer.store(self.slots, k, v)
            return layer.load(dtype=k.dtype)
        old_k, old_v = layer.load(dtype=k.dtype)
        all_k = torch.cat([old_k, k], dim=2)
        all_v = torch.cat([old_v, v], dim=2)
        layer.store(self.slots, k[:, :, self.skip:], v[:, :, self.skip:])
        return all_k, all_v

    def decode_slots(self, rows: int, width: int) -> list[int] | None:
        return [int(self.slots[0])] * rows if self.write_first else None


@dataclass(frozen=True)
class RowWrite(CacheWrite):
    """The serving cache (RowKVCache), whose rows write different slots: each row's keys go to its
    own ``slots [B, T]`` (padding to the trash slot no mask shows) and the step attends to slots
    ``[0, attend_len)``. With ``write_first`` (a global layer, whose slots are the new positions; a
    ring's one decoding token) it stores and then attends to those slots alone; otherwise (a ring's
    multi-token step) it attends to them followed by its new keys, and stores afterwards."""

    slots: torch.Tensor
    attend_len: int
    write_first: bool

    def apply(self, layer: LayerCache, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.write_first:
            layer.scatter(self.slots, k, v)
            return layer.load(self.attend_len, k.dtype)
        old_k, old_v = layer.load(self.attend_len, k.dtype)
        all_k, all_v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        layer.scatter(self.slots, k, v)
        return all_k, all_v

    def decode_slots(self, rows: int, width: int) -> list[int] | None:
        if self.slots.shape[1] != 1 or not self.write_first or self.attend_len != width:
            return None
        return self.slots[:, 0].tolist()


@dataclass(frozen=True)
class StaticWrite(CacheWrite):
    """The compiled one-token step over a static cache (``KVCache(static=True)``), whose shapes never
    change: the new key goes to slot ``index`` (a ``[1]`` device tensor, data rather than a constant
    the graph would recompile for: a global column, or a ring slot whose position the token no
    longer sees) and the step attends to the whole buffer, whose unwritten slots the mask hides."""

    index: torch.Tensor

    def apply(self, layer: LayerCache, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer.store(self.index, k, v)
        return layer.load(dtype=k.dtype)
