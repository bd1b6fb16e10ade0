"""Sentence embeddings from a bidirectional Gemma decoder (EmbeddingGemma).

The model is sentence-transformers' pipeline as data: the decoder's final hidden states at every
token (``ModelConfig.bidirectional``: each token sees both sides), optionally projected token by
token (EmbeddingGemma 2's ``embedding_projection``), pooled into one vector per text, through zero
or more dense projections, then L2-normalised. :class:`EmbeddingConfig` records
which pooling, which projections and what the tokenizer wraps around a text; the checkpoint
adapters (checkpoints/sentence_transformers.py, the GGUF reader) fill it from their files.

Pooling follows sentence-transformers' ``Pooling`` module, over the tokens ``mask`` marks (a
text's own tokens, less its prompt where the config excludes prompts):
``mean``, ``max``, ``cls`` (the first marked token), ``lasttoken`` (the last marked token),
``mean_sqrt_len_tokens`` (the sum over the square root of the count) and ``weightedmean``
(token i of the text weighted i + 1). Several modes concatenate in the order given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.kernels.gemm import Linear
from gemmakit.models.config import ModelConfig
from gemmakit.models.decoder import DecoderAddOn, GemmaModel

POOLING_MODES = ("mean", "max", "cls", "lasttoken", "mean_sqrt_len_tokens", "weightedmean")

# a dense layer's activation, by the name of the torch.nn module sentence-transformers records
ACTIVATIONS = {"Identity": lambda x: x, "Tanh": torch.tanh, "ReLU": F.relu, "Sigmoid": torch.sigmoid,
               "GELU": F.gelu, "SiLU": F.silu}


@dataclass(frozen=True)
class DenseLayer:
    """One of sentence-transformers' ``Dense`` modules: ``activation(x @ W.T + b)``."""

    in_features: int
    out_features: int
    bias: bool = False
    activation: str = "Identity"  # a key of ACTIVATIONS


@dataclass(frozen=True)
class EmbeddingConfig:
    """An embedding model: its decoder, pooling, projections and normalisation, and how a text
    becomes token ids (prompts, special tokens, the longest input)."""

    decoder: ModelConfig
    # the width of a bias-free linear map applied to every token's final hidden state before pooling
    # (EmbeddingGemma 2's embedding_projection, part of its transformers model); None = no such map
    projection: int | None = None
    pooling: tuple[str, ...] = ("mean",)
    include_prompt: bool = True  # whether a prompt's tokens are pooled with the text's
    dense: tuple[DenseLayer, ...] = ()
    normalize: bool = True
    max_seq_length: int | None = None  # longer inputs are cut to this, special tokens included
    add_bos: bool = True  # what the tokenizer wraps around every text
    add_eos: bool = False
    prompts: tuple[tuple[str, str], ...] = ()  # (name, text put before the input), e.g. ("query", "task: ...")
    default_prompt: str | None = None  # the prompt used when none is named
    name: str = "embedding"

    def __post_init__(self) -> None:
        if not self.decoder.bidirectional:
            raise ValueError("an embedding model's decoder must be bidirectional")
        for mode in self.pooling:
            if mode not in POOLING_MODES:
                raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(POOLING_MODES)}")
        if self.projection is not None and self.projection < 1:
            raise ValueError(f"the token projection's width must be positive, not {self.projection}")
        width = self.token_width * len(self.pooling)
        for layer in self.dense:
            if layer.in_features != width:
                raise ValueError(f"a dense layer takes {layer.in_features} features where {width} arrive")
            if layer.activation not in ACTIVATIONS:
                raise ValueError(f"dense activation {layer.activation!r} is not one of {', '.join(ACTIVATIONS)}")
            width = layer.out_features

    @property
    def token_width(self) -> int:
        """The width of the per-token states that are pooled."""
        return self.projection or self.decoder.hidden_size

    @property
    def dimension(self) -> int:
        """The width of the embeddings the model returns."""
        return self.dense[-1].out_features if self.dense else self.token_width * len(self.pooling)

    @property
    def max_tokens(self) -> int:
        """The most tokens a text may have (the model's own limit where the config sets none)."""
        return min(self.max_seq_length or self.decoder.max_position_embeddings,
                   self.decoder.max_position_embeddings)

    def num_parameters(self) -> int:
        """The decoder's parameters, the token projection's and the dense layers'."""
        total = self.decoder.num_parameters() + (self.projection or 0) * self.decoder.hidden_size
        return total + sum(d.in_features * d.out_features + d.bias * d.out_features for d in self.dense)

    def prompt(self, name: str | None) -> str:
        """The text of the prompt ``name`` (the default prompt for None; "" when there is none)."""
        prompts = dict(self.prompts)
        if name is None:
            return prompts.get(self.default_prompt, "") if self.default_prompt else ""
        return prompts[name]


class Dense(nn.Module):
    def __init__(self, spec: DenseLayer) -> None:
        super().__init__()
        self.linear = Linear(spec.in_features, spec.out_features, bias=spec.bias)
        self.activation = ACTIVATIONS[spec.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))


class EmbeddingModel(DecoderAddOn):
    """``model(ids, positions, mask)`` -> one embedding per row, ``[B, dimension]``."""

    def __init__(self, config: EmbeddingConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder = GemmaModel(config.decoder)
        if config.projection is not None:
            self.projection = Linear(config.decoder.hidden_size, config.projection, bias=False)
        self.dense = nn.ModuleList(Dense(spec) for spec in config.dense)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``input_ids``, ``positions`` ``[B, T]`` (-1 = padding) and ``mask [B, T]`` (True = a
        token to pool) -> the embeddings ``[B, dimension]``, L2-normalised if the config says so."""
        tokens = self.token_states(input_ids, positions)  # [B, T, token_width]
        x = torch.cat([pool(tokens, mask, mode) for mode in self.config.pooling], dim=-1)
        for layer in self.dense:
            x = layer(x)
        return F.normalize(x, p=2, dim=-1) if self.config.normalize else x

    def token_states(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """What is pooled: the decoder's final hidden states ``[B, T, token_width]``, through the
        token projection where there is one (transformers' ``last_hidden_state`` for EmbeddingGemma 2)."""
        tokens = self.decoder.hidden_states(input_ids, positions)  # [B, T, hidden]
        return self.projection(tokens) if self.config.projection is not None else tokens


def pool(tokens: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``tokens [B, T, D]`` pooled over the positions ``mask [B, T]`` marks -> ``[B, D]``."""
    B, T, D = tokens.shape
    weights = mask.to(tokens.dtype)[..., None]  # [B, T, 1]
    count = weights.sum(1).clamp(min=1e-9)  # [B, 1]
    if mode == "mean":
        return (tokens * weights).sum(1) / count
    if mode == "mean_sqrt_len_tokens":
        return (tokens * weights).sum(1) / count.sqrt()
    if mode == "weightedmean":  # rows start at column 0 (right padding): token i weighs i + 1
        weights = weights * torch.arange(1, T + 1, dtype=tokens.dtype, device=tokens.device)[None, :, None]
        return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if mode == "max":
        return tokens.masked_fill(~mask[..., None], float("-inf")).amax(1)
    columns = torch.arange(T, device=tokens.device).expand(B, T)
    if mode == "cls":
        index = torch.where(mask, columns, T).amin(1).clamp(max=T - 1)
    elif mode == "lasttoken":
        index = torch.where(mask, columns, -1).amax(1).clamp(min=0)
    else:
        raise ValueError(f"unknown pooling mode {mode!r}")
    return tokens[torch.arange(B, device=tokens.device), index]
