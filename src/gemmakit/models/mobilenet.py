"""Gemma 3n's vision tower (timm's MobileNet-v5 encoder) and its multimodal embedder.

The tower is built by timm, as transformers builds it (``TimmWrapperModel``: ``timm.create_model(
architecture, pretrained=False, num_classes=0, **model_args)``), so gemmakit runs the very network the
checkpoints were trained as rather than a copy of it. Its ``forward_features`` gives ``[N, 2048, s, s]``:
the multi-scale fusion adapter's fixed ``s x s`` grid (16 x 16 = 256 soft tokens at any input size).

The embedder (transformers' ``Gemma3nMultimodalEmbedder``) brings a tower's vectors to the decoder's
width: soft tokens (the tower's output, times sqrt(width)) through one RMSNorm, "hard" tokens (ids of
the tower's own small vocabulary, which a text prompt may hold: ``<end_of_image>`` is the vision
vocabulary's first id) through a table and another RMSNorm; then a projection without bias and an
RMSNorm without scale. The audio tower has one of the same shape; its hard tokens are embedded here
too, so that any prompt's ids embed as in the reference.

Sources:
  [hf]   transformers 5.23 ``models/gemma3n`` (configuration_gemma3n.py: Gemma3nVisionConfig, whose
         defaults are E2B/E4B's; modeling_gemma3n.py: Gemma3nMultimodalEmbedder, get_image_features)
         and ``models/timm_wrapper/modeling_timm_wrapper.py``
  [timm] timm 1.0.31 ``models/mobilenetv5.py``: ``mobilenetv5_300m_enc``, input 768 px, mean 0, std 1
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.library
from torch import nn

from gemmakit.errors import UnsupportedModelError
from gemmakit.kernels.gemm import Linear
from gemmakit.models.layers import RMSNorm, unit_rms


@dataclass(frozen=True)
class EmbedderConfig:
    """One tower's embedder: its output width, its hard-token vocabulary and where that sits."""

    hidden_size: int
    vocab_size: int  # hard tokens: ids vocab_offset .. vocab_offset + vocab_size - 1
    vocab_offset: int
    rms_norm_eps: float = 1e-6


@dataclass(frozen=True)
class MobileNetConfig:
    """A timm MobileNet-v5 encoder as Gemma 3n's ``vision_config`` names it."""

    architecture: str = "mobilenetv5_300m_enc"  # [hf] [timm]
    model_args: tuple[tuple[str, Any], ...] = ()  # extra timm.create_model arguments (sorted items)
    hidden_size: int = 2048  # [hf] the fusion adapter's output channels
    image_size: int = 768  # [timm] input side; the preprocessor's size when the checkpoint has one
    vocab_size: int = 128  # [hf]
    vocab_offset: int = 262_144  # [hf]
    rms_norm_eps: float = 1e-6

    @property
    def embedder(self) -> EmbedderConfig:
        return EmbedderConfig(self.hidden_size, self.vocab_size, self.vocab_offset, self.rms_norm_eps)

    def replace(self, **changes: object) -> "MobileNetConfig":
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in MobileNetTower(self).parameters())


@functools.cache
def import_torchvision() -> None:
    """Import torchvision (timm needs it) if it is installed, also where its C++ operators do not
    load beside this torch (PyPI's CUDA wheel next to a CPU torch): there its import fails where it
    registers a fake kernel for ``nms``. Neither timm nor transformers runs those operators, so
    declaring the two it names lets the import through; the rest of torchvision is Python."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    except RuntimeError:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchvision.operators = lib  # the definitions live as long as this object
        import torchvision  # noqa: F401, F811


@functools.cache
def timm_module():
    """timm, imported once, or a one-line error saying how to get it."""
    import_torchvision()
    try:
        import timm
    except ImportError as exc:  # timm itself, or the torchvision it imports
        raise UnsupportedModelError(f"Gemma 3n's vision tower needs timm and torchvision ({exc}): "
                                    "pip install 'gemmakit[vision]'") from None
    return timm


class MobileNetTower(nn.Module):
    """Images ``[N, 3, S, S]`` in [0, 1] -> features ``[N, s * s, hidden]`` in row-major grid order."""

    def __init__(self, config: MobileNetConfig) -> None:
        super().__init__()
        self.config = config
        args = dict(config.model_args)
        if args.get("features_only"):
            raise UnsupportedModelError("a features_only timm tower has no single output grid")
        try:
            # the same name as transformers' wrapper, so the checkpoint's names map one to one
            self.timm_model = timm_module().create_model(config.architecture, pretrained=False, num_classes=0,
                                                         **args)
        except RuntimeError as exc:
            raise UnsupportedModelError(f"timm cannot build {config.architecture!r} ({exc})") from None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # One image at a time: the convolutions' float32 sums then do not depend on which images share
        # a batch (at two images they move features by ~3e-5, logits by ~2e-4); an image is a big
        # enough batch of work on its own.
        grid = torch.cat([self.timm_model.forward_features(image[None]) for image in pixel_values])  # [N, hidden, s, s]
        if grid.shape[1] != self.config.hidden_size:
            raise UnsupportedModelError(f"the vision tower gives {grid.shape[1]} channels, the config says "
                                        f"{self.config.hidden_size}")
        return grid.flatten(2).transpose(1, 2)  # [N, s * s, hidden]


class MultimodalEmbedder(nn.Module):
    """A tower's soft tokens or hard-token ids -> decoder-width embeddings (see the module docstring)."""

    def __init__(self, config: EmbedderConfig, text_hidden: int) -> None:
        super().__init__()
        self.config = config
        eps = config.rms_norm_eps
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.hard_embedding_norm = RMSNorm(config.hidden_size, eps, offset=0.0)
        self.soft_embedding_norm = RMSNorm(config.hidden_size, eps, offset=0.0)
        self.embedding_projection = Linear(config.hidden_size, text_hidden, bias=False)

    def _project(self, normed: torch.Tensor) -> torch.Tensor:
        return unit_rms(self.embedding_projection(normed).float(), self.config.rms_norm_eps).type_as(normed)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Soft tokens ``[N, tokens, width]`` -> ``[N, tokens, text hidden]``."""
        return self._project(self.soft_embedding_norm(features * self.config.hidden_size**0.5))

    def embed_hard(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids of this vocabulary (from 0) -> ``[..., text hidden]``."""
        return self._project(self.hard_embedding_norm(self.embedding(ids)))

    def splice_hard_tokens(self, input_ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return splice_vocabulary(input_ids, h, self.config, self.embed_hard)


def splice_vocabulary(input_ids: torch.Tensor, h: torch.Tensor, vocabulary: EmbedderConfig,
                      embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``h [B, T, text hidden]`` with the rows of ``vocabulary``'s ids (a tower's own, at its offset)
    replaced by ``embed(ids - offset)``."""
    c = vocabulary
    mine = (input_ids >= c.vocab_offset) & (input_ids < c.vocab_offset + c.vocab_size)
    if not bool(mine.any()):
        return h
    out = h.clone()
    out[mine] = embed(input_ids[mine] - c.vocab_offset).to(h.dtype)
    return out
