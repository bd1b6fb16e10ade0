"""llama.cpp's vision files (``mmproj-*.gguf``): a Gemma 3 text GGUF plus its SigLIP tower and
projector, or a Gemma 4 one plus its ViT and embedder (``gemma4v``, :func:`attach_gemma4_mmproj`).

llama.cpp keeps a vision-language model in two files: the text decoder as an ordinary GGUF, and
the vision tower with its projector in a second GGUF of architecture ``clip`` (``general.type``
``mmproj``), written by ``convert_hf_to_gguf.py --mmproj`` and taken by its tools as ``--mmproj``.
This adapter joins the two into the checkpoint the Hugging Face directory gives
(checkpoints/hf_vision.py), so the same :class:`~gemmakit.models.multimodal.VisionLanguageModel`
runs either.

Facts this relies on (the converter's Gemma 3 vision writer, tools/mtmd/clip.cpp's reader):
- Only the ``gemma3`` projector: pool the patch grid by ``clip.vision.projector.scale_factor``
  (omitted, and then 4, for every published size: 64x64 patches to 16x16 = 256 tokens), RMSNorm
  with the tower's epsilon, then ``mm.input_projection.weight`` (stored [vision, text] as in the
  reference checkpoints; the converter keeps it F16 whatever the output type).
- ``mm.soft_emb_norm.weight`` is stored with Gemma's 1 already added, as the decoder's norms are;
  the tower's LayerNorms are ordinary ones, stored as they are.
- ``v.blk.N.ffn_up`` is SigLIP's ``fc1`` (hidden -> intermediate) in files from current converters;
  clip.cpp swaps the two where an older file has them the other way round, and so do we, by shape.
- The image processor's mean and std are ``clip.vision.image_mean`` / ``image_std``; the resize is
  bilinear, as Gemma 3's processor does (clip.cpp hard-codes the same for this projector).
- The image placeholder and its markers are not in the mmproj file: they are the text model's
  ``<image_soft_token>``, ``<start_of_image>`` and ``<end_of_image>`` pieces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gemmakit.checkpoints.base import Checkpoint, TensorLoader
from gemmakit.checkpoints.gguf_reader import GGUFFile, GGUFTensor, open_gguf
from gemmakit.errors import CheckpointError, UnsupportedModelError
from gemmakit.models.config import ModelConfig
from gemmakit.models.multimodal import MultimodalConfig
from gemmakit.models.siglip import SiglipConfig
from gemmakit.quant.ggml import SUPPORTED_TYPES, dequantize

MMPROJ_ARCHITECTURE = "clip"
GEMMA3_PROJECTOR = "gemma3"
GEMMA4_PROJECTOR = "gemma4v"  # Gemma 4's ViT and embedder (the E-series, 26B-A4B and 31B)
GEMMA4_PIECES = ("<|image|>", "<|image>", "<image|>", "<|video|>")
DEFAULT_POOLING = 4  # clip.cpp's n_merge for the gemma3 projector when the file names none
IMAGE_PIECES = ("<image_soft_token>", "<start_of_image>", "<end_of_image>")

_TOWER_NAMES = {
    "v.patch_embd.weight": "vision.patch_embedding.weight",
    "v.patch_embd.bias": "vision.patch_embedding.bias",
    "v.position_embd.weight": "vision.position_embedding.weight",
    "v.post_ln.weight": "vision.post_layernorm.weight",
    "v.post_ln.bias": "vision.post_layernorm.bias",
    "mm.input_projection.weight": "projector.weight",
    "mm.soft_emb_norm.weight": "projector.norm.weight",
}
_LAYER_NAMES = {"ln1": "layer_norm1", "ln2": "layer_norm2", "attn_q": "self_attn.q_proj",
                "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_out": "self_attn.out_proj",
                "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}


def mmproj_beside(model: Path) -> Path | None:
    """The one ``mmproj-*.gguf`` in ``model``'s folder (a folder per model, as downloads of GGUF
    vision models come); None if there is none, an error naming them if there are several."""
    found = [p for p in sorted(model.parent.glob("mmproj-*.gguf")) if p.resolve() != model.resolve()]
    if len(found) > 1:
        raise CheckpointError(f"{model.parent}: {len(found)} vision files beside {model.name} "
                              f"({', '.join(p.name for p in found)}); pass the one to use with --mmproj FILE")
    return found[0] if found else None


def attach_mmproj(text: Checkpoint, path: Path) -> Checkpoint:
    """``text`` (a Gemma 3 GGUF's checkpoint) with the vision tower and projector of the mmproj
    file ``path``: the checkpoint of a :class:`VisionLanguageModel`."""
    f = open_gguf(path)
    arch = f.metadata.get("general.architecture")
    if arch != MMPROJ_ARCHITECTURE:
        raise UnsupportedModelError(f"{path}: not an mmproj file (GGUF architecture {arch!r}); --mmproj takes the "
                                    "vision file llama.cpp's convert_hf_to_gguf.py --mmproj writes")
    m = f.metadata
    projector = m.get("clip.projector_type", m.get("clip.vision.projector_type"))
    if m.get("clip.has_vision_encoder", False) and projector == GEMMA4_PROJECTOR:
        return attach_gemma4_mmproj(text, f)
    if not m.get("clip.has_vision_encoder", False) or projector != GEMMA3_PROJECTOR:
        raise UnsupportedModelError(f"{path}: an mmproj for projector {projector!r}; gemmakit reads Gemma 3's "
                                    f"({GEMMA3_PROJECTOR!r}) and Gemma 4's ({GEMMA4_PROJECTOR!r})")
    if not isinstance(text.config, ModelConfig) or text.config.family != "gemma3":
        raise UnsupportedModelError(f"{path}: a Gemma 3 vision file, but {text.source} is a "
                                    f"{getattr(text.config, 'family', type(text.config).__name__)} model")
    tokenizer = text.tokenizer
    if tokenizer is None:
        raise CheckpointError(f"{text.source}: no tokenizer in the GGUF; the image tokens an mmproj needs are "
                              "its <image_soft_token> and markers")
    ids = [tokenizer.token_to_id(piece) for piece in IMAGE_PIECES]
    if None in ids:
        raise UnsupportedModelError(f"{text.source}: a text-only model (its vocabulary has no "
                                    f"{IMAGE_PIECES[ids.index(None)]}); {path.name} needs the text GGUF of the same "
                                    "Gemma 3 vision model (4B, 12B or 27B)")
    width = int(_key(f, "clip.vision.projection_dim"))
    if width != text.config.hidden_size:
        raise CheckpointError(f"{path}: its projector writes width {width} but {text.source} has width "
                              f"{text.config.hidden_size}; the two files come from different models")
    config = _config(f, text, ids)
    tensors: dict[str, TensorLoader] = {f"decoder.{ours}": load for ours, load in text.tensors.items()}
    tensors.update(_tower_tensors(f, config))
    return Checkpoint(config=config, tensors=tensors, source=text.source, tokenizer=tokenizer,
                      native_dtype=text.native_dtype, metadata={**text.metadata, "mmproj": str(path)},
                      file_names={**{f"decoder.{ours}": theirs for ours, theirs in text.file_names.items()},
                                  **{ours: theirs for theirs, ours in _file_names(config).items()}},
                      packed={f"decoder.{ours}": load for ours, load in text.packed.items()})


def _key(f: GGUFFile, key: str):
    if key not in f.metadata:
        raise CheckpointError(f"{f.path}: metadata key {key} is missing")
    return f.metadata[key]


def _float32(value) -> float:
    """A float32 metadata value in its shortest decimal form (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


def _config(f: GGUFFile, text: Checkpoint, ids: list[int]) -> MultimodalConfig:
    try:
        vision = SiglipConfig(
            image_size=int(_key(f, "clip.vision.image_size")), patch_size=int(_key(f, "clip.vision.patch_size")),
            hidden_size=int(_key(f, "clip.vision.embedding_length")),
            intermediate_size=int(_key(f, "clip.vision.feed_forward_length")),
            num_layers=int(_key(f, "clip.vision.block_count")), num_heads=int(_key(f, "clip.vision.attention.head_count")),
            layer_norm_eps=_float32(f.metadata.get("clip.vision.attention.layer_norm_epsilon", 1e-6)))
        pooling = int(f.metadata.get("clip.vision.projector.scale_factor", DEFAULT_POOLING))
        if pooling < 1 or vision.patches_per_side % pooling:
            raise ValueError(f"pooling factor {pooling} does not divide the {vision.patches_per_side}-patch side")
        mean = tuple(_float32(x) for x in f.metadata.get("clip.vision.image_mean", (0.5,) * 3))
        std = tuple(_float32(x) for x in f.metadata.get("clip.vision.image_std", (0.5,) * 3))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")
        image, boi, eoi = ids
        return MultimodalConfig(
            text=text.config, vision=vision, layout="gemma3", projector="pooled_rmsnorm",
            image_attention="per_image", tokens_per_image=(vision.patches_per_side // pooling) ** 2,
            image_token_id=image, boi_token_id=boi, eoi_token_id=eoi, image_mean=mean, image_std=std,
            name=text.config.name)
    except ValueError as exc:
        raise CheckpointError(f"{f.path}: invalid vision metadata ({exc})") from None


def _file_names(config: MultimodalConfig) -> dict[str, str]:
    """The mmproj tensor names -> ours."""
    names = dict(_TOWER_NAMES)
    for i in range(config.vision.num_layers):
        for theirs, ours in _LAYER_NAMES.items():
            for t in ("weight", "bias"):
                names[f"v.blk.{i}.{theirs}.{t}"] = f"vision.layers.{i}.{ours}.{t}"
    return names


def _loader(t: GGUFTensor, offset: float = 0.0) -> TensorLoader:
    def load() -> torch.Tensor:
        w = dequantize(t.raw, t.ggml_type, t.shape)
        return w - offset if offset else w

    return load


def _checked_tensors(f: GGUFFile, present, names: dict[str, str], what: str) -> None:
    """That the file's tensors ``present`` are exactly ``names`` (theirs -> ours), in types gemmakit reads."""
    unexpected = [n for n in present if n not in names]
    if unexpected:
        raise CheckpointError(f"{f.path}: unexpected tensor {unexpected[0]!r} for {what}")
    missing = [n for n in names if n not in f.tensors]
    if missing:
        raise CheckpointError(f"{f.path}: missing tensors {', '.join(missing[:3])}"
                              + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    for theirs in names:
        if f.tensors[theirs].ggml_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(f"{f.path}: tensor {theirs} uses quantisation type "
                                        f"{f.tensors[theirs].ggml_type} which gemmakit cannot read")


def _tower_tensors(f: GGUFFile, config: MultimodalConfig) -> dict[str, TensorLoader]:
    names = _file_names(config)
    _checked_tensors(f, f.tensors, names, f"a Gemma 3 vision tower of {config.vision.num_layers} layers")
    tensors = {}
    for theirs, ours in names.items():
        tensors[ours] = _loader(f.tensors[theirs], 1.0 if theirs == "mm.soft_emb_norm.weight" else 0.0)
    d = config.vision.hidden_size
    for i in range(config.vision.num_layers):
        up = f.tensors[f"v.blk.{i}.ffn_up.weight"]
        if up.shape[0] == d and up.shape[1] != d:  # an older file: fc1 and fc2 under each other's names
            for t in ("weight", "bias"):
                a, b = f"vision.layers.{i}.mlp.fc1.{t}", f"vision.layers.{i}.mlp.fc2.{t}"
                tensors[a], tensors[b] = tensors[b], tensors[a]
    return tensors


# Gemma 4's tower as the converter writes it: its ViT's tensors renamed, the patch projection
# [hidden, patch^2 * 3] reshaped to a convolution's [hidden, 3, patch, patch] (undone below).
_GEMMA4_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_out": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
_GEMMA4_NORMS = {"ln1": "input_layernorm", "attn_post_norm": "post_attention_layernorm", "ln2": "pre_feedforward_layernorm",
                 "ffn_post_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
                 "attn_k_norm": "self_attn.k_norm"}
_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


def attach_gemma4_mmproj(text: Checkpoint, f: GGUFFile) -> Checkpoint:
    """``text`` (a Gemma 4 GGUF's checkpoint) with the vision encoder and embedder of the ``gemma4v``
    mmproj ``f``: the checkpoint of a Gemma4VisionLanguageModel. The encoder's shape the metadata
    does not name (head size, KV heads, position table) comes from the tensors'; its audio tower, if
    the file has one, is not read."""
    from gemmakit.models.gemma4_vision import Gemma4MultimodalConfig, Gemma4VisionConfig

    if not isinstance(text.config, ModelConfig) or text.config.family != "gemma4":
        raise UnsupportedModelError(f"{f.path}: a Gemma 4 vision file, but {text.source} is a "
                                    f"{getattr(text.config, 'family', type(text.config).__name__)} model")
    tokenizer = text.tokenizer
    ids = [tokenizer.token_to_id(piece) for piece in GEMMA4_PIECES] if tokenizer is not None else [None]
    if None in ids[:3]:
        raise UnsupportedModelError(f"{text.source}: its vocabulary has no Gemma 4 image tokens "
                                    f"({', '.join(GEMMA4_PIECES[:3])}); {f.path.name} needs its own text GGUF")
    width = int(_key(f, "clip.vision.projection_dim"))
    if width != text.config.hidden_size:
        raise CheckpointError(f"{f.path}: its embedder writes width {width} but {text.source} has width "
                              f"{text.config.hidden_size}; the two files come from different models")
    vision_names = {n: t for n, t in f.tensors.items() if n.startswith(("v.", "mm."))}
    try:
        heads = int(_key(f, "clip.vision.attention.head_count"))
        q, k = f.tensors["v.blk.0.attn_q.weight"].shape, f.tensors["v.blk.0.attn_k.weight"].shape
        head_dim = q[0] // heads
        vision = Gemma4VisionConfig(
            hidden_size=int(_key(f, "clip.vision.embedding_length")),
            intermediate_size=int(_key(f, "clip.vision.feed_forward_length")),
            num_layers=int(_key(f, "clip.vision.block_count")), num_heads=heads, num_kv_heads=k[0] // head_dim,
            head_dim=head_dim, patch_size=int(_key(f, "clip.vision.patch_size")),
            position_embedding_size=f.tensors["v.position_embd.weight"].shape[1],
            pooling_kernel_size=int(f.metadata.get("clip.vision.projector.scale_factor", 3)),
            rms_norm_eps=_float32(f.metadata.get("clip.vision.attention.layer_norm_epsilon", 1e-6)),
            use_clipped_linears=any(n.endswith(_BOUNDS) for n in vision_names),
            standardize="v.std_bias" in vision_names)
        # soft tokens attend both ways on sliding layers, as every published Gemma 4 does
        config = Gemma4MultimodalConfig(
            text=text.config.replace(group_layer_kinds=("local",)), vision=vision, image_token_id=ids[0],
            boi_token_id=ids[1], eoi_token_id=ids[2], video_token_id=ids[3], name=text.config.name)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{f.path}: invalid Gemma 4 vision metadata ({exc})") from None
    names = _gemma4_names(vision)
    _checked_tensors(f, vision_names, names, f"a Gemma 4 vision encoder of {vision.num_layers} layers")
    tensors: dict[str, TensorLoader] = {f"decoder.{ours}": load for ours, load in text.tensors.items()}
    for theirs, ours in names.items():
        t = f.tensors[theirs]
        load = _loader(t)
        if theirs == "v.patch_embd.weight":  # [hidden, 3, p, p] -> [hidden, p * p * 3] (row, column, channel)
            load = (lambda base=load: base().permute(0, 2, 3, 1).reshape(vision.hidden_size, -1))
        elif t.shape == (1,) and theirs.endswith(_BOUNDS):
            load = (lambda base=load: base().reshape(()))
        tensors[ours] = load
    return Checkpoint(config=config, tensors=tensors, source=text.source, tokenizer=tokenizer,
                      native_dtype=text.native_dtype, metadata={**text.metadata, "mmproj": str(f.path)},
                      file_names={**{f"decoder.{ours}": theirs for ours, theirs in text.file_names.items()},
                                  **{ours: theirs for theirs, ours in names.items()}},
                      packed={f"decoder.{ours}": load for ours, load in text.packed.items()})


def _gemma4_names(vision) -> dict[str, str]:
    """The gemma4v mmproj tensor names -> ours (models/gemma4_vision.py's module tree)."""
    names = {"v.patch_embd.weight": "vision.patch_embedder.input_proj.weight",
             "v.position_embd.weight": "vision.patch_embedder.position_embedding_table",
             "mm.input_projection.weight": "embed_vision.embedding_projection.weight"}
    if vision.standardize:
        names.update({"v.std_bias": "vision.std_bias", "v.std_scale": "vision.std_scale"})
    for i in range(vision.num_layers):
        layer = f"vision.encoder.layers.{i}."
        for theirs, ours in _GEMMA4_LAYER.items():
            names[f"v.blk.{i}.{theirs}.weight"] = f"{layer}{ours}.linear.weight"
            if vision.use_clipped_linears:
                names.update({f"v.blk.{i}.{theirs}.{b}": f"{layer}{ours}.{b}" for b in _BOUNDS})
        for theirs, ours in _GEMMA4_NORMS.items():
            names[f"v.blk.{i}.{theirs}.weight"] = f"{layer}{ours}.weight"
    return names
