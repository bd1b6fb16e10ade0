"""Save a (merged or fully fine-tuned) model as a Hugging Face checkpoint directory.

The directory holds config.json, model.safetensors with transformers' names and the tokenizer, so
transformers, gemmakit and any tool that reads the HF layout load it. Written atomically, by the
same writer as ``gemmakit convert`` (gemmakit/checkpoints/hf_writer.py).
"""

from __future__ import annotations

from pathlib import Path

from gemmakit.checkpoints.hf_writer import write_hf_directory
from gemmakit.checkpoints.safetensors import hf_names
from gemmakit.errors import InvalidRequestError
from gemmakit.models.decoder import GemmaModel
from gemmakit.quant.grouped import GroupedEmbedding, GroupedLinear


def save_hf_directory(model: GemmaModel, tokenizer, directory: str | Path) -> Path:
    """Write ``model`` (plain nn.Linear layers: merge LoRA first) and its tokenizer as an HF directory."""
    if any(isinstance(m, (GroupedLinear, GroupedEmbedding)) for m in model.modules()):
        raise InvalidRequestError("this model holds quantised or 16-bit weights as stored, not float parameters; "
                                  "load it with quant='none' (--quant none) to write it as a float checkpoint")
    names = hf_names(model.config)
    tensors = ((names[n], p.detach().to("cpu")) for n, p in model.named_parameters())
    return write_hf_directory(directory, model.config, tensors, tokenizer)
