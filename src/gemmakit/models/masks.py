"""What the layers of one kind need for one forward step, built once per step and handed to every
layer of that kind: the rotary tables, the attention mask and where to write into the cache
(:class:`StepContext`, whose ``write`` is one of models/cache_writes.py's kinds), or a recurrent
layer's positions (:class:`RecurrentContext`).

The caches (models/cache.py, models/row_cache.py) build them, since what a step may see depends on
what the cache holds; masks are a pure function of query and key positions (:func:`attention_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gemmakit.models.cache_writes import CacheWrite


# The 0 / -inf of a one-query mask's float32 bias (StepContext.bias), made once.
_VISIBLE, _HIDDEN = torch.tensor(0.0, dtype=torch.float32), torch.tensor(float("-inf"), dtype=torch.float32)


@dataclass
class StepContext:
    """What one kind of attention layer needs for this step (shared by all layers of the kind)."""

    cos: torch.Tensor  # [B, 1, T, D]
    sin: torch.Tensor  # [B, 1, T, D]
    mask: torch.Tensor  # [B, 1, T, S] bool, True = may attend
    write: CacheWrite  # where the step's keys go in each layer's cache, and which keys it attends to
    bias: torch.Tensor | None = None  # one query per row: the mask as 0 / -inf float32, for the decode kernel
    _blocks: dict = field(default_factory=dict, repr=False, compare=False)  # query_blocks' answers, by batch row

    def __post_init__(self) -> None:
        if self.bias is None and self.mask.shape[-2] == 1 and self.mask.device.type == "cpu":
            self.bias = torch.where(self.mask, _VISIBLE, _HIDDEN)  # one op (zeros + masked_fill were three)

    def query_blocks(self, row: int) -> list[tuple[int, int, int, int, int, int]]:
        """Prefill attention's query blocks for batch row ``row`` (:func:`query_blocks_of`), worked
        out once per step for all the layers that share this context."""
        if row not in self._blocks:
            self._blocks[row] = query_blocks_of(self.mask[row, 0])
        return self._blocks[row]


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
                   q_group: torch.Tensor | None = None, k_group: torch.Tensor | None = None,
                   group_bypasses_window: bool = False) -> torch.Tensor:
    """Boolean mask ``[B, 1, T, S]`` from query positions ``[B, T]`` and key positions ``[B, S]``.

    A key is visible when it is real (position >= 0), not in the future, and, for sliding-window
    layers, fewer than ``window`` positions back (the reference keeps exactly ``window`` keys,
    the query's own included). Padding queries (position < 0) may see everything so that their
    softmax stays finite; their outputs are never read.

    Optional *groups* (``[B, T]`` / ``[B, S]``, -1 = none) make attention non-causal: a query sees
    every key of its own group >= 0 in both directions (one image for Gemma 3, the image + prefix
    for PaliGemma's prefix-LM). Whether the sliding window still bounds a group differs by model:
    Gemma 3 applies the window on top (``window AND (causal OR group)``); PaliGemma 2 lets the
    group through whole (``(causal AND window) OR group``, ``group_bypasses_window``).
    """
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    visible = (k >= 0) & (k <= q)
    same_group = None
    if q_group is not None and k_group is not None:
        qg, kg = q_group[:, :, None], k_group[:, None, :]
        same_group = (qg >= 0) & (qg == kg) & (k >= 0)
    if window is not None:
        in_window = (q - k) < window
        if same_group is None:
            visible &= in_window
        elif group_bypasses_window:
            visible = (visible & in_window) | same_group
        else:
            visible = (visible | same_group) & in_window
    elif same_group is not None:
        visible |= same_group
    visible |= q < 0
    return visible[:, None]


def encoder_mask(positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask ``[B, 1, T, T]`` of a bidirectional (encoder) step over its own tokens at
    ``positions [B, T]`` (-1 = padding): every real key is visible, on sliding-window layers only
    those at most ``window // 2`` positions away on either side.

    ``window`` is the checkpoint's own number: transformers' Gemma 3 in bidirectional mode turns
    its ``sliding_window`` W into an exclusive bound of W // 2 + 1 on ``|q - k|``, and llama.cpp's
    symmetric window masks ``|q - k| > W / 2``; both are the ``W // 2`` radius used here.
    Padding queries see every key (a finite softmax); their outputs are never read."""
    q, k = positions[:, :, None], positions[:, None, :]
    visible = (k >= 0).expand(-1, positions.shape[1], -1)
    if window is not None:
        visible = visible & ((q - k).abs() <= window // 2)
    return (visible | (q < 0))[:, None]


@dataclass
class RecurrentContext:
    """What recurrent layers need for this step: where each token sits in its sequence."""

    positions: torch.Tensor  # [B, T]; 0 = sequence start (state reset), -1 = padding (state untouched)


QUERY_BLOCK = 128  # queries per block of prefill attention: a few hundred GEMM rows with the heads stacked


def query_blocks_of(mask: torch.Tensor) -> list[tuple[int, int, int, int, int, int]]:
    """``(first_row, end_row, first_col, end_col, first_masked_col, end_masked_col)`` per block of
    ``QUERY_BLOCK`` queries of a ``[T, S]`` mask: the columns from the block's first to its last
    visible key (every row sees at least one key, so no block is empty), and within them the span
    where some of the block's rows are hidden (empty when none are). A causal mask's later blocks
    see more keys than its earlier ones and need masking only near the diagonal; a sliding
    window's early columns drop out of its later blocks."""
    T, S = mask.shape
    starts = list(range(0, T, QUERY_BLOCK)) if T >= 2 * QUERY_BLOCK else [0]
    ends = starts[1:] + [T]
    seen = torch.stack([mask[r0:r1].any(0) for r0, r1 in zip(starts, ends)])  # [blocks, S]
    col = torch.arange(S)
    first, end = torch.where(seen, col, S).amin(1, keepdim=True), torch.where(seen, col, -1).amax(1, keepdim=True) + 1
    # within [first, end): every column some row of the block may not see (a ring's unused slots
    # can be hidden from all of them), which the block must mask
    partial = ~torch.stack([mask[r0:r1].all(0) for r0, r1 in zip(starts, ends)]) & (col >= first) & (col < end)
    spans = torch.cat([first, end, torch.where(partial, col, S).amin(1, keepdim=True),
                       torch.where(partial, col, -1).amax(1, keepdim=True) + 1], 1)
    out = []
    for r0, r1, (c0, c1, m0, m1) in zip(starts, ends, spans.tolist()):
        out.append((r0, r1, c0, c1, m0, m1) if m1 > m0 else (r0, r1, c0, c1, c0, c0))
    return out
