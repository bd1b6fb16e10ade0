"""Greedy speculative decoding: a small draft model proposes, the target model verifies.

Each round the draft proposes ``k`` tokens one by one; the target scores all of them in *one*
forward pass (k + 1 positions cost about what one position costs when decoding is bandwidth
bound). Proposals are kept while they equal the target's own greedy choice; at the first mismatch
the target's choice is taken instead. The output is therefore the target's greedy output, token
for token; only the number of target passes changes.

Rejected tokens must leave the caches. A global layer simply forgets columns past ``length``; a
local layer's ring has overwritten the slots of older positions, so those slots are saved before
the verifying pass and restored after it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from gemmakit.engine.generate import check_prompts
from gemmakit.errors import InvalidRequestError
from gemmakit.models.cache import KVCache


def _snapshot(cache: KVCache, num_new: int) -> tuple[int, torch.Tensor, torch.Tensor, list]:
    """What a forward of ``num_new`` tokens will overwrite in the rings."""
    slots, _ = cache.ring_slots(num_new)
    saved = [c.snapshot(slots) if kind == "local" and c is not None else None
             for kind, c in zip(cache.config.layer_kinds, cache.layers)]
    return cache.length, slots, cache.ring_positions[:, slots].clone(), saved


def _rollback(cache: KVCache, snap, keep: int) -> None:
    """Keep the first ``keep`` columns written since ``snap``; undo the rest."""
    length, slots, positions, saved = snap
    undo = slice(keep, None)
    cache.ring_positions[:, slots[undo]] = positions[:, undo]
    for layer, old in zip(cache.layers, saved):
        if old is not None:
            layer.restore(slots[undo], tuple(t[:, :, undo] for t in old))
    cache.global_positions[:, length + keep:] = -1
    cache.length = length + keep


def speculative_greedy(target, draft, prompt: Sequence[int], max_new_tokens: int, k: int = 4,
                       stop_ids: frozenset[int] = frozenset()) -> tuple[list[int], dict]:
    """Greedy continuation of ``prompt`` by ``target``, drafted by ``draft``; returns (ids, stats)."""
    stats: dict = {}
    out = list(speculative_tokens(target, draft, prompt, max_new_tokens, k, stop_ids, stats))
    return out, stats


def check_draft(target, draft) -> None:
    """A draft must share the target's vocabulary (the tokenizer); raise a one-line error if not."""
    if target.config.vocab_size != draft.config.vocab_size:
        raise InvalidRequestError(
            f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
            f"({target.config.vocab_size}); a draft must share the tokenizer")


def speculative_tokens(target, draft, prompt: Sequence[int], max_new_tokens: int, k: int = 4,
                       stop_ids: frozenset[int] = frozenset(), stats: dict | None = None) -> Iterator[int]:
    """The same greedy continuation, yielded token by token as rounds are verified (for streaming).

    Arguments are checked before the first token is asked for; ``stats`` (if given) receives the
    number of rounds and of accepted draft tokens as they happen.
    """
    check_draft(target, draft)
    if k < 1:
        raise InvalidRequestError(f"draft length must be >= 1, got {k}")
    context = min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
    check_prompts([prompt], context)
    max_new_tokens = min(max_new_tokens, context - len(prompt))
    window = min(w for w in (target.config.sliding_window, draft.config.sliding_window, 10**9) if w)
    k = max(1, min(k, window - 1))  # a verifying pass must fit in the ring
    stats = stats if stats is not None else {}
    stats.update(rounds=0, accepted=0)
    return _rounds(target, draft, prompt, max_new_tokens, k, stop_ids, stats)


@torch.inference_mode()
def _rounds(target, draft, prompt: Sequence[int], max_new_tokens: int, k: int, stop_ids: frozenset[int],
            stats: dict) -> Iterator[int]:
    if max_new_tokens <= 0:
        return
    size = len(prompt) + max_new_tokens + k + 1
    t_cache, d_cache = target.new_cache(1, size), draft.new_cache(1, size)
    ids = torch.tensor([list(prompt)], device=target.device)
    token = int(target(ids, cache=t_cache, last_only=True)[0, -1].argmax())
    draft(ids.to(draft.device), cache=d_cache, last_only=True)
    pending = ids[:, :0].cpu()  # tokens the draft has not seen yet (a round writes < window columns)
    produced = 0
    while True:
        yield token
        produced += 1
        if token in stop_ids or produced >= max_new_tokens:
            return
        pending = torch.cat([pending, torch.tensor([[token]], device=pending.device)], dim=1)
        # 1. draft k tokens
        proposals: list[int] = []
        d_snap = _snapshot(d_cache, pending.shape[1] + k - 1)
        x = pending
        for _ in range(k):
            proposals.append(int(draft(x.to(draft.device), cache=d_cache, last_only=True)[0, -1].argmax()))
            x = torch.tensor([[proposals[-1]]])
        # 2. verify [token, proposals] in one target pass
        block = torch.tensor([[token] + proposals], device=target.device)
        t_snap = _snapshot(t_cache, block.shape[1])
        choices = target(block, cache=t_cache)[0].argmax(-1).tolist()  # target's pick after each token
        n = 0
        while n < k and proposals[n] == choices[n]:
            n += 1
        stats["rounds"] += 1
        stats["accepted"] += n
        room = max_new_tokens - produced
        for tok in proposals[:n][:room]:
            yield tok
            produced += 1
            if tok in stop_ids:
                return
        if produced >= max_new_tokens:
            return
        token = choices[n]
        _rollback(t_cache, t_snap, n + 1)
        # draft saw pending + proposals[:k-1]; keep pending + proposals[:n]
        seen = pending.shape[1] + min(n, k - 1)
        _rollback(d_cache, d_snap, seen)
        pending = torch.tensor([proposals[k - 1:n]], dtype=torch.long)  # d_k when all k were accepted
