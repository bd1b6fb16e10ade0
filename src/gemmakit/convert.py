"""``gemmakit convert SRC DST``: any supported checkpoint -> a Hugging Face safetensors directory.

Tensors stream from the source one at a time into :func:`gemmakit.checkpoints.hf_writer.write_hf_directory`,
which writes what transformers itself would save (config.json, safetensors shards, tokenizer files)
into a temporary directory next to DST and renames it at the end: an interrupted conversion leaves
no half-written DST behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from gemmakit.checkpoints import build_model, open_checkpoint
from gemmakit.checkpoints.base import parameter_shapes
from gemmakit.checkpoints.gemma4_vision import text_decoder_checkpoint
from gemmakit.checkpoints.hf_writer import DEFAULT_SHARD_BYTES, save_recurrent_gemma, write_hf_directory
from gemmakit.checkpoints.safetensors import hf_names
from gemmakit.errors import CheckpointError, InvalidRequestError
from gemmakit.models.assistant import AssistantConfig
from gemmakit.models.config import ModelConfig


def convert(source: str | Path | None, destination: str | Path, dtype: torch.dtype | None = None,
            config: ModelConfig | str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
            matformer=None) -> Path:
    """Write ``source`` as a Hugging Face directory at ``destination``; returns its path.

    ``dtype`` casts every tensor (default: keep the dtype each tensor is read in: the stored dtype
    for safetensors and .ckpt, float32 for dequantised GGUF tensors). ``matformer`` (a plan, as
    :func:`gemmakit.load` takes it) writes the Gemma 3n sub-model it cuts out instead.
    """
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise InvalidRequestError(f"{destination} already exists; give a new directory to write to")
    checkpoint = open_checkpoint(source, config, matformer)
    if isinstance(checkpoint.config, AssistantConfig):
        raise InvalidRequestError(f"{checkpoint.source} is a Gemma 4 assistant drafter, read only from its Hugging "
                                  "Face directory as it is; use it as --draft-model for its Gemma 4 model")
    checkpoint = text_decoder_checkpoint(checkpoint)  # Gemma 4 with images: its text decoder (Gemma4ForCausalLM)
    if checkpoint.config.family == "recurrentgemma":  # its own transformers layout (checkpoints/recurrent_gemma.py)
        if destination.is_dir():
            destination.rmdir()  # empty (checked above)
        model = build_model(checkpoint, dtype or torch.float32)
        return save_recurrent_gemma(model, destination, checkpoint.tokenizer)
    return write_hf_directory(destination, checkpoint.config, _hf_tensors(checkpoint, dtype), checkpoint.tokenizer,
                              max_shard_bytes)


def _hf_tensors(checkpoint, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors under transformers' names, read (and checked) one at a time."""
    names = hf_names(checkpoint.config, "model.")
    shapes = parameter_shapes(checkpoint.config)
    shown = checkpoint.file_names.get
    missing = [shown(n, n) for n in names if n not in checkpoint.tensors]
    if missing:
        raise CheckpointError(f"{checkpoint.source}: missing tensors {', '.join(missing[:3])}")
    for ours, theirs in names.items():
        tensor = checkpoint.tensors[ours]()
        if tuple(tensor.shape) != shapes[ours]:
            raise CheckpointError(f"{checkpoint.source}: tensor {shown(ours, ours)} has shape {tuple(tensor.shape)}, "
                                  f"expected {shapes[ours]}")
        yield theirs, tensor.to(dtype) if dtype is not None else tensor
