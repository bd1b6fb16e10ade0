"""Greedy speculative decoding: a draft proposes, the target model verifies.

Each round the draft proposes ``k`` tokens one by one; the target scores all of them in *one*
forward pass (k + 1 positions cost about what one position costs when decoding is bandwidth
bound). Proposals are kept while they equal the target's own greedy choice; at the first mismatch
the target's choice is taken instead. The output is therefore the target's greedy output, token
for token; only the number of target passes changes.

Rejected tokens must leave the caches. A global layer simply forgets columns past ``length``; a
local layer's ring has overwritten the slots of older positions, so those slots are saved before
the verifying pass and restored after it.

Two kinds of draft share the rounds. A small model with the target's tokenizer keeps a cache of
its own, rolled back as the target's is. A Gemma 4 assistant (models/assistant.py) keeps none: it
drafts from the target's cache and the target's last hidden state, so each target pass also
returns its hidden states, and the one after the last accepted token starts the next round.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from gemmakit.engine.generate import check_prompts
from gemmakit.errors import InvalidRequestError
from gemmakit.models.assistant import AssistantModel
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


def drafting_model(draft):
    """The module that drafts for a loaded draft model: a vision model's text decoder, an assistant
    as it is (its ``decoder`` alone is only its layers)."""
    return draft if isinstance(draft, AssistantModel) else getattr(draft, "decoder", draft)


def check_draft(target, draft) -> None:
    """A draft must share the target's vocabulary (the tokenizer), and an assistant must fit the
    target it drafts for; raise a one-line error if not."""
    if isinstance(draft, AssistantModel):
        check_assistant(getattr(target, "decoder", target), draft)
    elif target.config.vocab_size != draft.config.vocab_size:
        raise InvalidRequestError(
            f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
            f"({target.config.vocab_size}); a draft must share the tokenizer")


def check_assistant(target, assistant: AssistantModel) -> None:
    """An assistant reads the target's embeddings, hidden states and keys/values as they are: its
    vocabulary, its backbone width and, for each of its layer kinds, the key/value shape of the
    target's layer it reads must be the target's."""
    a, t = assistant.config, target.config
    producers = t.kv_producers()
    problem = None
    if a.vocab_size != t.vocab_size:
        problem = f"its vocabulary has {a.vocab_size} tokens, the target's {t.vocab_size}"
    elif a.backbone_hidden_size != t.hidden_size:
        problem = f"it was made for a target of width {a.backbone_hidden_size}, this one's is {t.hidden_size}"
    else:
        for kind, plan in a.decoder.kind_plans.items():
            if kind not in producers:
                problem = f"it has {kind} attention layers and the target has none"
                break
            theirs = t.layer_plan[producers[kind]]
            if (plan.num_kv_heads, plan.head_dim) != (theirs.num_kv_heads, theirs.head_dim):
                problem = (f"its {kind} layers read {plan.num_kv_heads} key/value heads of {plan.head_dim}, "
                           f"the target's layer {theirs.index} holds {theirs.num_kv_heads} of {theirs.head_dim}")
                break
    if problem is not None:
        raise InvalidRequestError(f"the assistant drafter does not fit the target: {problem}; an assistant "
                                  "drafts for the model it was trained with (gemma-4-E2B-it-assistant for "
                                  "gemma-4-E2B-it)")


def speculative_tokens(target, draft, prompt: Sequence[int], max_new_tokens: int, k: int = 4,
                       stop_ids: frozenset[int] = frozenset(), stats: dict | None = None) -> Iterator[int]:
    """The same greedy continuation, yielded token by token as rounds are verified (for streaming).

    Arguments are checked before the first token is asked for; ``stats`` (if given) receives the
    number of rounds and of accepted draft tokens as they happen.
    """
    check_draft(target, draft)
    if k < 1:
        raise InvalidRequestError(f"draft length must be >= 1, got {k}")
    assistant = isinstance(draft, AssistantModel)
    if assistant:
        target = getattr(target, "decoder", target)  # a vision model's text decoder holds the cache it reads
    context = min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
    check_prompts([prompt], context)
    max_new_tokens = min(max_new_tokens, context - len(prompt))
    # a verifying pass must fit in the rings (an assistant keeps none of its own)
    windows = (target.config.sliding_window,) if assistant else (target.config.sliding_window,
                                                                 draft.config.sliding_window)
    window = min(w for w in (*windows, 10**9) if w)
    k = max(1, min(k, window - 1))
    stats = stats if stats is not None else {}
    stats.update(rounds=0, accepted=0)
    drafter = _AssistantDrafter(target, draft) if assistant else _ModelDrafter(draft)
    return _rounds(target, drafter, prompt, max_new_tokens, k, stop_ids, stats)


class _ModelDrafter:
    """A small model with the target's tokenizer, over a cache of its own that it rolls back to
    the tokens the target accepted."""

    needs_hidden = False

    def __init__(self, draft) -> None:
        self.draft = draft

    def start(self, ids: torch.Tensor, size: int, target_cache: KVCache, hidden: torch.Tensor | None) -> None:
        self.cache = self.draft.new_cache(1, size)
        self.draft(ids.to(self.draft.device), cache=self.cache, last_only=True)
        self.pending = ids[:, :0].cpu()  # tokens the draft has not seen yet (a round writes < window columns)

    def propose(self, token: int, k: int) -> list[int]:
        self.pending = torch.cat([self.pending, torch.tensor([[token]], device=self.pending.device)], dim=1)
        self.snap = _snapshot(self.cache, self.pending.shape[1] + k - 1)
        proposals: list[int] = []
        x = self.pending
        for _ in range(k):
            proposals.append(int(self.draft(x.to(self.draft.device), cache=self.cache, last_only=True)[0, -1].argmax()))
            x = torch.tensor([[proposals[-1]]])
        return proposals

    def accepted(self, proposals: list[int], n: int, hidden: torch.Tensor | None) -> None:
        # the draft saw pending + proposals[:k-1]; keep pending + proposals[:n]
        k = len(proposals)
        _rollback(self.cache, self.snap, self.pending.shape[1] + min(n, k - 1))
        self.pending = torch.tensor([proposals[k - 1:n]], dtype=torch.long)  # d_k when all k were accepted


class _AssistantDrafter:
    """A Gemma 4 assistant: every step of a round at the position of the round's first token, over
    the target's cache as it stands (every position before it), starting from the target's hidden
    state at the position before."""

    needs_hidden = True

    def __init__(self, target, assistant: AssistantModel) -> None:
        self.target, self.assistant = target, assistant

    def start(self, ids: torch.Tensor, size: int, target_cache: KVCache, hidden: torch.Tensor) -> None:
        self.cache, self.state = target_cache, hidden[:, -1:]  # [1, 1, target hidden]

    def propose(self, token: int, k: int) -> list[int]:
        position = torch.full((1, 1), self.cache.length, device=self.target.device)
        reading = self.cache.read_by_kind(self.assistant.config.decoder, position.to(self.assistant.device),
                                          self.assistant.dtype)
        x, state = torch.tensor([[token]], device=self.target.device), self.state
        proposals: list[int] = []
        for _ in range(k):
            x, state = self.assistant.propose(self.target.embed_tokens(x), state, reading)
            proposals.append(int(x))
            x = x.to(self.target.device)
        return proposals

    def accepted(self, proposals: list[int], n: int, hidden: torch.Tensor) -> None:
        self.state = hidden[:, n:n + 1]  # after the last accepted token, whose successor starts the next round


def _target_pass(target, ids: torch.Tensor, cache: KVCache, with_hidden: bool,
                 last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    if with_hidden:
        return target(ids, cache=cache, last_only=last_only, with_hidden=True)
    return target(ids, cache=cache, last_only=last_only), None


@torch.inference_mode()
def _rounds(target, drafter, prompt: Sequence[int], max_new_tokens: int, k: int, stop_ids: frozenset[int],
            stats: dict) -> Iterator[int]:
    if max_new_tokens <= 0:
        return
    size = len(prompt) + max_new_tokens + k + 1
    t_cache = target.new_cache(1, size)
    ids = torch.tensor([list(prompt)], device=target.device)
    logits, hidden = _target_pass(target, ids, t_cache, drafter.needs_hidden, last_only=True)
    token = int(logits[0, -1].argmax())
    drafter.start(ids, size, t_cache, hidden)
    produced = 0
    while True:
        yield token
        produced += 1
        if token in stop_ids or produced >= max_new_tokens:
            return
        # 1. draft k tokens
        proposals = drafter.propose(token, k)
        # 2. verify [token, proposals] in one target pass
        block = torch.tensor([[token] + proposals], device=target.device)
        t_snap = _snapshot(t_cache, block.shape[1])
        logits, hidden = _target_pass(target, block, t_cache, drafter.needs_hidden)
        choices = logits[0].argmax(-1).tolist()  # target's pick after each token
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
        drafter.accepted(proposals, n, hidden)
