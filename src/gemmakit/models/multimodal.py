"""Vision-language models: a vision tower and a projector in front of the one Gemma decoder.

An image becomes ``tokens_per_image`` soft tokens: the tower's features (SigLIP's patches, or
Gemma 3n's MobileNet-v5 grid, models/mobilenet.py), projected to the decoder's width, written into
the embedding sequence where the prompt holds image placeholder ids. The decoder is the text model
unchanged; the only vision-specific thing it sees is an attention *group* per token
(models/attention.py), which makes some tokens attend both ways:

* PaliGemma 1 and 2 (``image_attention="prefix"``): prefix-LM. The whole prompt (images, ``<bos>``,
  prefix, newline) is one bidirectional group; generated tokens are causal. Positions start at 1,
  as in the reference.
* Gemma 3 (``image_attention="per_image"``): each image's run of soft tokens is one group; text
  stays causal. The 64x64 patch grid is average-pooled to 16x16 = 256 tokens, then RMSNorm'd and
  projected without bias.
* Gemma 3n (``image_attention="causal"``): image tokens are causal like text. The tower is timm's
  MobileNet-v5 and the projector the multimodal embedder (``projector="embedder"``), which also
  embeds the ids of the vision and audio towers' own vocabularies when a prompt holds them. With
  its audio tower (models/gemma3n_audio.py), each clip fills its 188 ``audio_token_id``
  placeholders, causal too, and the tower's embedder embeds the audio vocabulary's ids.

Image soft tokens are not scaled by sqrt(hidden) as text embeddings are (checked against
transformers 5.23, where the scale lives in the embedding module and features are spliced after).

Sources for the presets:
  [hf]   ``config.json`` of google/paligemma-3b-pt-{224,448,896}, google/paligemma2-{3b,10b,28b}-pt-
         {224,448,896} and google/gemma-3-{4b,12b,27b}-pt on the Hugging Face hub
  [pg]   PaliGemma (arXiv 2407.07726) section 3; PaliGemma 2 (arXiv 2412.03555) Table 1
  [g3]   Gemma 3 technical report (arXiv 2503.19786) section 2.1 (vision encoder, 256 tokens, P&S)
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.errors import InvalidRequestError, ModelNotFoundError
from gemmakit.kernels.gemm import Linear
from gemmakit.models.cache import KVCache
from gemmakit.models.config import ModelConfig, preset
from gemmakit.models.decoder import DecoderAddOn, GemmaModel
from gemmakit.models.gemma3n_audio import Gemma3nAudioConfig, Gemma3nAudioTower
from gemmakit.models.layers import RMSNorm
from gemmakit.models.mobilenet import (EmbedderConfig, MobileNetConfig, MobileNetTower, MultimodalEmbedder,
                                       splice_vocabulary)
from gemmakit.models.siglip import SiglipConfig, SiglipVisionModel, so400m


def run_groups(soft: torch.Tensor, start: int) -> torch.Tensor | None:
    """Group ids ``[B, T]`` (-1 = causal) of a call's soft tokens ``soft [B, T]``: one group per run,
    whose id is the timeline column where the run starts (unique across forward calls and images);
    None when the call has none."""
    if not bool(soft.any()):
        return None
    previous = F.pad(soft, (1, 0), value=False)[:, :-1]
    column = torch.arange(start, start + soft.shape[1], device=soft.device).expand_as(soft)
    run_start = torch.where(soft & ~previous, column, -1)
    return torch.where(soft, torch.cummax(run_start, dim=1).values, -1)


@dataclass(frozen=True, eq=False)
class PromptMedia:
    """A prompt's media as the batching engine splices it into its prefill chunks: computed once per
    request (the towers run before admission), read a chunk at a time.

    ``keys`` name each position for the prefix cache: a text token is its id; a soft token is
    ``(digest, run length, offset)``, the digest that of its run's embeddings, so a later prompt
    reuses cached keys/values only where it holds the same image or clip at the same place.
    """

    embeds: torch.Tensor  # [L, hidden]: the prompt's input embeddings, soft tokens spliced in
    ids: torch.Tensor  # [L]: the ids the decoder reads beside them (per-layer embeddings)
    groups: torch.Tensor | None  # [L]: attention group per position (-1 causal; else the group's first position)
    keys: tuple  # [L]: see above

    @classmethod
    def of(cls, embeds: torch.Tensor, ids: torch.Tensor, soft: torch.Tensor,
           groups: torch.Tensor | None) -> PromptMedia:
        """From one prompt's embeddings ``[L, hidden]``, decoder ids ``[L]``, soft-token mask ``[L]`` and groups."""
        keys: list = ids.tolist()
        flags = soft.tolist()
        i = 0
        while i < len(flags):
            if not flags[i]:
                i += 1
                continue
            j = i
            while j < len(flags) and flags[j]:
                j += 1
            digest = hashlib.blake2b(embeds[i:j].detach().float().cpu().numpy().tobytes(), digest_size=16).digest()
            keys[i:j] = [(digest, j - i, k) for k in range(j - i)]
            i = j
        return cls(embeds.detach(), ids, groups, tuple(keys))

    def __len__(self) -> int:
        return self.embeds.shape[0]


class MediaModel(DecoderAddOn):
    """A decoder with media towers in front (Gemma 3, PaliGemma, Gemma 3n, Gemma 4): what the
    batching engine asks of it beyond its decoder."""

    plain_text_embedding = True  # whether embed_text is the decoder's own token embedding

    def audio_marker(self, tokenizer) -> str | None:
        """The piece that marks a clip in a prompt, as the model's chat template writes it (Gemma 4's
        ``<|audio|>``, Gemma 3n's ``<audio_soft_token>``); None for a model without an audio tower."""
        if getattr(self, "audio_tower", None) is None:  # (a submodule: no class attribute may shadow it)
            return None
        return tokenizer.id_to_piece(self.config.audio_token_id)

    def video_marker(self, tokenizer) -> str | None:
        """The piece that marks a video in a prompt (Gemma 4's ``<|video|>``); None for a model that takes none."""
        video = getattr(self.config, "video_token_id", None)
        return None if video is None else tokenizer.id_to_piece(video)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[B, T, hidden]`` of ids read as text (generated tokens, text prompts):
        a placeholder id the sampler picks is embedded as the token it is, with no media behind it."""
        return self.decoder.embed_tokens(input_ids)

    def soft_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where ``input_ids`` hold placeholders that media fill."""
        raise NotImplementedError

    def prompt_groups(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Attention groups ``[B, L]`` of whole prompts ``[B, L]`` starting at position 0 (None: causal)."""
        raise NotImplementedError

    def audio_slots(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where ``input_ids`` hold audio placeholders (none for a config without an audio token)."""
        if getattr(self.config, "audio_token_id", None) is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == self.config.audio_token_id

    def audio_tokens(self, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The soft tokens ``[n, hidden]`` of clips' features ``[A, frames, mels]``, in prompt order."""
        raise NotImplementedError

    def _splice_audio(self, h: torch.Tensor, slots: torch.Tensor, features: torch.Tensor | None,
                      mask: torch.Tensor | None) -> torch.Tensor:
        """``h`` with the clips' soft tokens written, in order, at the audio ``slots``."""
        if features is None:
            if bool(slots.any()):
                raise InvalidRequestError("the prompt has audio tokens but no audio features were given")
            return h
        if getattr(self, "audio_tower", None) is None:
            raise InvalidRequestError("this checkpoint has no audio tower; it cannot take audio")
        param = next(self.audio_tower.parameters())
        tokens = self.audio_tokens(features.to(param.device, param.dtype),
                                   None if mask is None else mask.to(param.device))
        if int(slots.sum()) != tokens.shape[0]:
            raise InvalidRequestError(f"{features.shape[0]} audio clip(s) make {tokens.shape[0]} soft tokens "
                                      f"but the prompt has {int(slots.sum())} audio tokens")
        return h.masked_scatter(slots[..., None], tokens.to(h.device, h.dtype))


class WrapsTextConfig:
    """What a multimodal config answers for its text decoder's config (``self.text``)."""

    text: ModelConfig

    @property
    def family(self) -> str:
        return self.text.family

    @property
    def max_position_embeddings(self) -> int:
        return self.text.max_position_embeddings

    def replace(self, **changes: object):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MultimodalConfig(WrapsTextConfig):
    """A vision-language model: decoder config, vision config and how images enter the prompt."""

    text: ModelConfig
    vision: SiglipConfig | MobileNetConfig
    layout: Literal["paligemma", "gemma3"]  # prompt layout (gemmakit/vision/prompt.py)
    projector: Literal["linear", "pooled_rmsnorm", "embedder"]
    image_attention: Literal["prefix", "per_image", "causal"]
    tokens_per_image: int
    image_token_id: int
    position_offset: int = 0  # PaliGemma counts positions from 1
    boi_token_id: int | None = None  # Gemma 3 <start_of_image>
    eoi_token_id: int | None = None  # Gemma 3 <end_of_image>
    name: str = "custom"
    # the image processor's per-channel normalisation (every published PaliGemma and Gemma 3: 0.5)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_resample: int | None = None  # the processor's PIL resampling filter; None: the layout's
    audio_embedder: EmbedderConfig | None = None  # Gemma 3n: embeds the audio vocabulary's ids in a prompt
    # Gemma 3n's audio tower (whose embedder then embeds those ids): each clip fills its run of
    # ``audio.soft_tokens`` ``audio_token_id`` placeholders between ``boa`` and ``eoa``
    audio: Gemma3nAudioConfig | None = None
    audio_token_id: int | None = None
    boa_token_id: int | None = None
    eoa_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.projector == "linear" and self.tokens_per_image != self.vision.num_patches:
            raise ValueError("a linear projector keeps one token per patch")
        if self.projector == "pooled_rmsnorm":
            side = int(round(self.tokens_per_image**0.5))
            if side * side != self.tokens_per_image or self.vision.patches_per_side % side:
                raise ValueError(f"{self.tokens_per_image} tokens cannot pool a "
                                 f"{self.vision.patches_per_side}x{self.vision.patches_per_side} patch grid")

    @property
    def pan_and_scan(self) -> bool:
        """Whether the image processor offers Gemma 3's pan & scan crops."""
        return self.layout == "gemma3" and self.projector == "pooled_rmsnorm"

    def num_parameters(self) -> int:
        v, d = self.vision.hidden_size, self.text.hidden_size
        if self.projector == "embedder":
            # (with the audio tower, its embedder is the tower's: counted with it, in info's audio line)
            embedders = [self.vision.embedder, *([self.audio_embedder] if self.audio_embedder and not self.audio else [])]
            proj = sum(e.vocab_size * e.hidden_size + 2 * e.hidden_size + e.hidden_size * d for e in embedders)
        else:
            proj = v * d + (d if self.projector == "linear" else v)
        return self.text.num_parameters() + self.vision.num_parameters() + proj


class LinearProjector(nn.Module):
    """PaliGemma: one biased linear map from SigLIP width to decoder width, per patch."""

    def __init__(self, config: MultimodalConfig) -> None:
        super().__init__()
        self.linear = Linear(config.vision.hidden_size, config.text.hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.linear(patches)


class PooledProjector(nn.Module):
    """Gemma 3: average-pool the patch grid to ``tokens_per_image``, RMSNorm, then project (no bias)."""

    def __init__(self, config: MultimodalConfig) -> None:
        super().__init__()
        self.side = config.vision.patches_per_side
        self.kernel = self.side // int(round(config.tokens_per_image**0.5))
        self.norm = RMSNorm(config.vision.hidden_size, config.vision.layer_norm_eps)
        # Stored [vision, text] as in the reference checkpoints (x @ W, not a Linear's x @ W.T).
        self.weight = nn.Parameter(torch.zeros(config.vision.hidden_size, config.text.hidden_size))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        N, P, D = patches.shape
        grid = patches.transpose(1, 2).reshape(N, D, self.side, self.side)  # [N, D, side, side]
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)  # [N, tokens, D]
        return torch.matmul(self.norm(pooled), self.weight).type_as(patches)


class VisionLanguageModel(MediaModel):
    """``model(input_ids, pixel_values=...)`` -> logits ``[B, T, vocab]``.

    ``input_ids`` hold ``tokens_per_image`` placeholder ids per image, in the order of
    ``pixel_values [N, 3, S, S]``; build them with :func:`gemmakit.vision.prompt.build_prompt`.
    """

    def __init__(self, config: MultimodalConfig) -> None:
        super().__init__()
        self.config = config
        text_hidden = config.text.hidden_size
        if isinstance(config.vision, MobileNetConfig):
            self.vision = MobileNetTower(config.vision)
        else:
            self.vision = SiglipVisionModel(config.vision)
        if config.projector == "embedder":
            self.projector = MultimodalEmbedder(config.vision.embedder, text_hidden)
        else:
            self.projector = LinearProjector(config) if config.projector == "linear" else PooledProjector(config)
        self.audio_embedder = self.audio_tower = None
        if config.audio is not None:
            # built on the CPU even inside the loader's meta skeleton: the Conformer's attention windows
            # are buffers made from the config, which no checkpoint holds
            with torch.device("cpu"):
                self.audio_tower = Gemma3nAudioTower(config.audio)
        elif config.audio_embedder:
            self.audio_embedder = MultimodalEmbedder(config.audio_embedder, text_hidden)
        self.decoder = GemmaModel(config.text)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return self.decoder.new_cache(batch, max_len)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Soft tokens ``[N, tokens_per_image, text hidden]`` for images ``[N, 3, S, S]``."""
        return self.projector(self.vision(pixel_values))

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's token embeddings ``[B, T, hidden]``, except for ids of a tower's own
        vocabulary (Gemma 3n), which that tower's embedder gives."""
        h = self.decoder.embed_tokens(input_ids)
        for embedder in (self.projector, self.audio_embedder):
            if isinstance(embedder, MultimodalEmbedder):
                h = embedder.splice_hard_tokens(input_ids, h)
        if self.audio_tower is not None:
            embedder = self.audio_tower.embedder
            h = splice_vocabulary(input_ids, h, self.config.audio_embedder, lambda ids: embedder(hard_ids=ids))
        return h

    @property
    def plain_text_embedding(self) -> bool:
        return (not isinstance(self.projector, MultimodalEmbedder) and self.audio_embedder is None
                and self.audio_tower is None)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def soft_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self.config.image_token_id) | self.audio_slots(input_ids)

    def prompt_groups(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.attention_groups(input_ids, 0, True, positions)

    def embed_media(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                    audio_features: torch.Tensor | None = None, audio_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings ``[B, T, hidden]`` with the soft tokens of ``pixel_values`` (and of the
        clips' ``audio_features``) at the placeholders."""
        audio = self.audio_slots(input_ids)
        placeholders = input_ids == self.config.image_token_id
        h = self.embed_tokens(torch.where(placeholders | audio, 0, input_ids))  # [B, T, hidden]
        h = self._splice_audio(h, audio, audio_features, audio_mask)
        if pixel_values is not None:
            features = self.image_features(pixel_values.to(self.device))  # [N, tokens, hidden]
            if int(placeholders.sum()) != features.shape[0] * features.shape[1]:
                raise InvalidRequestError(
                    f"{features.shape[0]} image(s) need {features.shape[0] * features.shape[1]} image tokens "
                    f"but the prompt has {int(placeholders.sum())}")
            h = h.masked_scatter(placeholders[..., None], features.to(h.dtype))
        elif bool(placeholders.any()):
            raise InvalidRequestError("the prompt has image tokens but no pixel_values were given")
        return h

    def audio_tokens(self, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # every clip fills its audio.soft_tokens places: its real tokens, then padding
        return self.audio_tower.prompt_tokens(features, mask).flatten(0, 1)

    def attention_groups(self, input_ids: torch.Tensor, start: int, with_images: bool,
                         positions: torch.Tensor) -> torch.Tensor | None:
        """Per-token group ids ``[B, T]`` (-1 = causal) for this call; see the module docstring."""
        if self.config.image_attention == "causal":
            return None
        if self.config.image_attention == "prefix":
            if not with_images:
                return None  # after the prompt, generated tokens are causal
            return torch.where(positions >= 0, 0, -1)
        return run_groups(input_ids == self.config.image_token_id, start)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        pixel_values: torch.Tensor | None = None,  # [N, 3, S, S], N = images in the whole batch
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,  # [B, T], from 0; -1 marks left padding
        last_only: bool = False,
        groups: torch.Tensor | None = None,  # override the attention groups (e.g. prefix + suffix)
        audio_features: torch.Tensor | None = None,  # [A, frames, mel bins]: every clip, in prompt order (Gemma 3n)
        audio_mask: torch.Tensor | None = None,  # [A, frames], True = a real frame
    ) -> torch.Tensor:
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        h = self.embed_media(input_ids, pixel_values, audio_features, audio_mask)
        if groups is None:
            groups = self.attention_groups(input_ids, start, pixel_values is not None, positions)
        if self.config.position_offset:
            positions = torch.where(positions >= 0, positions + self.config.position_offset, positions)
        # the ids go along for Gemma 3n's per-layer embeddings, which read them beside ``h``
        return self.decoder(input_ids, cache=cache, positions=positions, last_only=last_only, inputs_embeds=h,
                            groups=groups)


class ImagePrompt:
    """The model as the generation engine sees it for one prompt with images.

    The engine calls ``model(ids, cache=..., positions=..., last_only=...)`` for the prefill and
    then once per new token; this binds the pixel values to the prefill (which must be one call,
    so that every bidirectional group is whole) and runs decode steps as text: a generated
    placeholder id is a token like any other (:meth:`MediaModel.embed_text`).
    """

    def __init__(self, model: VisionLanguageModel, pixel_values: torch.Tensor | None,
                 audio_features: torch.Tensor | None = None, audio_mask: torch.Tensor | None = None) -> None:
        self.model = model
        self.pixel_values = pixel_values
        self.audio_features, self.audio_mask = audio_features, audio_mask
        self.config = model.config.text
        self._prefilled = False

    @property
    def device(self) -> torch.device:
        return self.model.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return self.model.new_cache(batch, max_len)

    def __call__(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                 positions: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        if self._prefilled:
            return self.decode_text(input_ids, cache, positions, last_only)
        self._prefilled = True
        return self.model(input_ids, self.pixel_values, cache=cache, positions=positions, last_only=last_only,
                          audio_features=self.audio_features, audio_mask=self.audio_mask)

    def decode_text(self, input_ids: torch.Tensor, cache: KVCache | None, positions: torch.Tensor | None,
                    last_only: bool) -> torch.Tensor:
        """A step after the prompt: its ids are text, whatever they are."""
        offset = getattr(self.model.config, "position_offset", 0)  # PaliGemma's positions count from 1
        if offset:
            if positions is None:
                start = cache.length if cache is not None else 0
                positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            positions = torch.where(positions >= 0, positions + offset, positions)
        return self.model.decoder(input_ids, cache=cache, positions=positions, last_only=last_only,
                                  inputs_embeds=self.model.embed_text(input_ids))

    def embed_prompt(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(decoder ids, input embeddings)`` of the bound prompt ``[1, L]`` with its media spliced in."""
        return input_ids, self.model.embed_media(input_ids, self.pixel_values, self.audio_features, self.audio_mask)

    @torch.inference_mode()
    def prompt_media(self, ids: list[int]) -> PromptMedia:
        """The prompt ``ids`` with this request's media, as the batching engine takes it (the towers run here)."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        decoder_ids, h = self.embed_prompt(x)
        groups = self.model.prompt_groups(x)
        return PromptMedia.of(h[0], decoder_ids[0], self.model.soft_token_mask(x)[0],
                              None if groups is None else groups[0])


# ----------------------------------------------------------------------------------------------
# Presets

PALIGEMMA_VOCAB = 257_216  # [hf] 256000 Gemma pieces + 1024 <loc> + 128 <seg> + <image> and spares
PALIGEMMA_IMAGE_TOKEN = 257_152  # [hf] image_token_index
GEMMA3_IMAGE_TOKEN, GEMMA3_BOI, GEMMA3_EOI = 262_144, 255_999, 256_000  # [hf] image_token_index, boi/eoi


def _paligemma(name: str, text_preset: str, image_size: int) -> MultimodalConfig:
    vision = so400m(image_size)
    text = preset(text_preset).replace(name=name, vocab_size=PALIGEMMA_VOCAB, group_bypasses_window=True)
    return MultimodalConfig(text=text, vision=vision, layout="paligemma", projector="linear",
                            image_attention="prefix", tokens_per_image=vision.num_patches,
                            image_token_id=PALIGEMMA_IMAGE_TOKEN, position_offset=1, name=name)


def _gemma3(name: str, text_preset: str) -> MultimodalConfig:
    return MultimodalConfig(text=preset(text_preset).replace(name=name), vision=so400m(896), layout="gemma3",
                            projector="pooled_rmsnorm", image_attention="per_image", tokens_per_image=256,
                            image_token_id=GEMMA3_IMAGE_TOKEN, boi_token_id=GEMMA3_BOI, eoi_token_id=GEMMA3_EOI,
                            name=name)


def _presets() -> dict[str, MultimodalConfig]:
    table: list[MultimodalConfig] = []
    for res in (224, 448, 896):
        table.append(_paligemma(f"paligemma-3b-{res}", "gemma-2b", res))  # [pg] Gemma 2B + So400m
        for size, text in (("3b", "gemma2-2b"), ("10b", "gemma2-9b"), ("28b", "gemma2-27b")):  # [pg] Table 1
            table.append(_paligemma(f"paligemma2-{size}-{res}", text, res))
    for size in ("4b", "12b", "27b"):  # [g3] every Gemma 3 size from 4B sees images, at 896 px
        table.append(_gemma3(f"gemma3-{size}-vision", f"gemma3-{size}"))
        table.append(_gemma3(f"gemma3-{size}-vision-it", f"gemma3-{size}-it"))
    return {c.name: c for c in table}


VISION_PRESETS: dict[str, MultimodalConfig] = _presets()


def vision_preset(name: str) -> MultimodalConfig:
    try:
        return VISION_PRESETS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown vision preset {name!r}; known: {', '.join(sorted(VISION_PRESETS))}") from None
