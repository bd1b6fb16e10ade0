"""SigLIP's vision tower: the ViT that turns an image into one feature vector per patch.

PaliGemma and multimodal Gemma 3 both use the So400m/14 shape (27 layers, width 1152, patch 14)
without SigLIP's attention-pooling head: the language model wants every patch, not one summary.
Unlike the Gemma decoder this is a classic ViT: LayerNorm with bias, biased projections, learned
absolute position embeddings and no rotary tables, so it shares none of the decoder's layers.

Sources for the So400m/14 numbers:
  [hf]  ``vision_config`` in google/paligemma-3b-pt-224, google/paligemma2-3b-pt-448,
        google/gemma-3-4b-pt ``config.json``
  [sig] "Getting ViT in Shape" (arXiv 2305.13035), SoViT-400m/14: width 1152, depth 27, MLP 4304
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.errors import InvalidRequestError
from gemmakit.kernels.gemm import Linear


@dataclass(frozen=True)
class SiglipConfig:
    """Shape of one SigLIP vision tower."""

    image_size: int  # square input side in pixels
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    def replace(self, **changes: object) -> "SiglipConfig":
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        d, f, p = self.hidden_size, self.intermediate_size, self.patch_size
        layer = 4 * (d * d + d) + 2 * d * f + f + d + 4 * d
        return self.num_channels * p * p * d + d + self.num_patches * d + self.num_layers * layer + 2 * d


def so400m(image_size: int) -> SiglipConfig:
    """SigLIP So400m/14 at 224, 448 or 896 pixels ([hf], [sig]): 256, 1024 or 4096 patches."""
    return SiglipConfig(image_size=image_size, patch_size=14, hidden_size=1152, intermediate_size=4304,
                        num_layers=27, num_heads=16)


class SiglipAttention(nn.Module):
    """Full (unmasked) multi-head self-attention over the patches, biased projections."""

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = d // config.num_heads
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.out_proj = Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        split = lambda t: t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731  [B, H, N, hd]
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipVisionModel(nn.Module):
    """``model(pixel_values [N, 3, S, S])`` -> patch features ``[N, (S/patch)^2, hidden]``."""

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        # A patch embedding is a strided convolution: one kernel application per non-overlapping patch.
        self.patch_embedding = nn.Conv2d(config.num_channels, d, config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.num_patches, d)
        self.layers = nn.ModuleList(SiglipLayer(config) for _ in range(config.num_layers))
        self.post_layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if tuple(pixel_values.shape[1:]) != expected:
            raise InvalidRequestError(f"pixel_values have shape {tuple(pixel_values.shape)}; this vision tower "
                                      f"takes [N, {', '.join(map(str, expected))}]")
        w = self.patch_embedding.weight
        h = self.patch_embedding(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)  # [N, patches, hidden]
        h = h + self.position_embedding.weight[None]
        for layer in self.layers:
            h = layer(h)
        return self.post_layernorm(h)
