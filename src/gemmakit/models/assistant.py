"""Gemma 4's assistant drafters (transformers' ``Gemma4AssistantForCausalLM`` and
``Gemma4UnifiedAssistantForCausalLM``): a few decoder layers that draft tokens for a Gemma 4
target from the target's own state, for speculative decoding (engine/speculative.py).

A step's input is the target's scaled embedding of the last token joined with a hidden state of
the target's width, ``[B, T, 2 * backbone]``, projected down to the assistant's width. The first
step of a round takes the target's final-norm output at the position before that token (what
predicted it); each later step takes the assistant's own last state projected back up to the
target's width, so the assistant never runs the target.

Its layers are the one decoder's (models/decoder.py), every one of them reading keys and values
from outside (``ModelConfig.external_kv``): the target's cache, by kind, from the layer that the
target's last layer of that kind reads (``ModelConfig.kv_producers``; ``KVCache.read_by_kind``).
They have query projections only and no cache, and every step of a round sits at the position of
the round's first token, over the same keys: the target's cached positions before it (on sliding
layers, those within the window a query there would see).

The head is the assistant's tied embedding without a soft-cap, or on E2B/E4B a clustered one: a
linear map onto ``num_centroids`` clusters of ``vocab / num_centroids`` tokens each (the
checkpoint's ``token_ordering`` lists them cluster by cluster) picks the ``centroid_top_k`` best
clusters, and only their tokens' logits are computed (4096 of 262144 on E2B).

Facts from transformers 5.23's ``models/gemma4_assistant`` (modeling and configuration) and
``generation/candidate_generator.py`` (``SinglePositionMultiTokenCandidateGenerator``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from gemmakit.kernels.gemm import Linear
from gemmakit.models.config import ModelConfig
from gemmakit.models.decoder import DecoderAddOn, GemmaModel

# What KVCache.read_by_kind hands a step: per kind, the contexts and the target's keys and values
Reading = tuple[dict, dict]


@dataclass(frozen=True)
class AssistantConfig:
    """An assistant drafter: its layers (every one reading outside keys and values) and what it
    needs of its target."""

    decoder: ModelConfig  # external_kv: the layers, the final norm and the tied head's vocabulary
    backbone_hidden_size: int  # the target's width: its embeddings and hidden states come in at it
    num_centroids: int = 0  # clusters of the clustered head (0 = a dense head)
    centroid_top_k: int = 0  # clusters whose tokens a step scores
    name: str = "assistant"

    def __post_init__(self) -> None:
        if not self.decoder.external_kv:
            raise ValueError("an assistant's layers read their target's keys and values (external_kv)")
        if self.num_centroids:
            if self.decoder.vocab_size % self.num_centroids:
                raise ValueError(f"{self.num_centroids} clusters cannot split a vocabulary of "
                                 f"{self.decoder.vocab_size} evenly")
            if not 0 < self.centroid_top_k <= self.num_centroids:
                raise ValueError(f"centroid_intermediate_top_k {self.centroid_top_k} must be in "
                                 f"1..{self.num_centroids}")

    @property
    def family(self) -> str:
        return self.decoder.family

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    @property
    def max_position_embeddings(self) -> int:
        return self.decoder.max_position_embeddings

    def replace(self, **changes: object) -> "AssistantConfig":
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        d, b = self.decoder.hidden_size, self.backbone_hidden_size
        return self.decoder.num_parameters() + 3 * b * d + self.num_centroids * d


class ClusteredHead(nn.Module):
    """The E2B/E4B assistants' head: the best ``centroid_top_k`` clusters by a linear map, then
    the logits of their tokens alone against the tied embedding's rows."""

    def __init__(self, config: AssistantConfig) -> None:
        super().__init__()
        self.top_k = config.centroid_top_k
        self.centroids = Linear(config.decoder.hidden_size, config.num_centroids, bias=False)
        # the vocabulary cluster by cluster: token ids, [num_centroids * tokens per cluster]
        self.register_buffer("token_ordering", torch.zeros(config.vocab_size, dtype=torch.long))

    def forward(self, h: torch.Tensor, embed: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``h [B, T, hidden]`` -> the token ids it scores and their logits, both ``[B, T, n]``
        (n = top_k * tokens per cluster). ``embed(ids)`` gives the tied embedding's rows (a
        quantised embedding dequantises only those)."""
        clusters = self.token_ordering.view(self.centroids.out_features, -1)  # [C, V / C]
        best = self.centroids(h).topk(self.top_k, dim=-1).indices  # [B, T, top_k]
        ids = clusters[best].flatten(-2)  # [B, T, n]
        rows = embed(ids)  # [B, T, n, hidden]
        return ids, (rows @ h.unsqueeze(-1)).squeeze(-1)


class AssistantModel(DecoderAddOn):
    """A Gemma 4 assistant drafter. ``propose(embedding, state, reading)`` is one drafting step's
    greedy token and next state; ``model(embedding, state, reading)`` its logits as transformers
    computes them."""

    def __init__(self, config: AssistantConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder = GemmaModel(config.decoder)
        d, b = config.decoder.hidden_size, config.backbone_hidden_size
        self.pre_projection = Linear(2 * b, d, bias=False)
        self.post_projection = Linear(d, b, bias=False)
        self.head = ClusteredHead(config) if config.num_centroids else None

    def hidden(self, embedding: torch.Tensor, state: torch.Tensor,
               reading: Reading) -> tuple[torch.Tensor, torch.Tensor]:
        """The final norm's output ``[B, T, hidden]`` and the next step's state ``[B, T, backbone]``
        from the target's token embedding and the state, both ``[B, T, backbone]``; ``reading``
        is the target cache's ``read_by_kind`` for this model's config at the step's positions."""
        x = torch.cat([embedding.to(self.dtype), state.to(self.dtype)], dim=-1)
        contexts, shared_kv = reading
        h = self.decoder.hidden_over(self.pre_projection(x), contexts, shared_kv)
        return h, self.post_projection(h)

    def forward(self, embedding: torch.Tensor, state: torch.Tensor,
                reading: Reading) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, T, vocab]`` and the next state. With a clustered head, the tokens outside the
        chosen clusters get one less than the lowest logit computed (as in transformers)."""
        h, state = self.hidden(embedding, state, reading)
        if self.head is None:
            return self.decoder._logits(h), state
        ids, scores = self.head(h, self.decoder.embed)
        logits = scores.new_full((*h.shape[:-1], self.config.vocab_size), float(scores.min()) - 1.0)
        return logits.scatter_(-1, ids, scores), state

    def propose(self, embedding: torch.Tensor, state: torch.Tensor,
                reading: Reading) -> tuple[torch.Tensor, torch.Tensor]:
        """The greedy token ``[B, T]`` and the next state, without a clustered head's full-vocabulary logits."""
        h, state = self.hidden(embedding, state, reading)
        if self.head is None:
            return self.decoder._logits(h).argmax(-1), state
        ids, scores = self.head(h, self.decoder.embed)
        return ids.gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1), state
