"""What every checkpoint adapter produces, and how a model is filled from it.

An adapter (one module per file format) turns a file into a :class:`Checkpoint`: the config plus
a mapping from *our* parameter names to zero-argument loaders. Tensors are produced one at a time
and copied straight into the model's parameters, so peak memory is the model plus one tensor,
never two full copies of the weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from gemmakit.errors import CheckpointError
from gemmakit.models.assistant import AssistantConfig, AssistantModel
from gemmakit.models.config import ModelConfig
from gemmakit.models.decoder import GemmaModel
from gemmakit.models.encoder import EmbeddingConfig, EmbeddingModel
from gemmakit.models.gemma4_vision import Gemma4MultimodalConfig, Gemma4VisionLanguageModel
from gemmakit.models.moe import Experts
from gemmakit.models.multimodal import MultimodalConfig, VisionLanguageModel
from gemmakit.quant.ggml import HALF_TYPES, GGMLBlocks, packable
from gemmakit.quant.grouped import fuse_projections, install

if TYPE_CHECKING:
    from gemmakit.tokenizer import Tokenizer

TensorLoader = Callable[[], torch.Tensor]
# our names of a mixture's stacked expert matrices (models/moe.py ``Experts.expert_stacks``)
EXPERT_STACKS = tuple(f"experts.{name}" for name in Experts.expert_stacks)


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: Mapping[str, TensorLoader]  # our parameter name -> loader of a float tensor
    source: str
    tokenizer: "Tokenizer | None" = None
    native_dtype: torch.dtype = torch.float32  # dtype the weights are stored in (for defaults/info)
    metadata: dict = field(default_factory=dict)
    # our parameter name -> the tensor's name in the file, so errors speak the file's language
    file_names: Mapping[str, str] = field(default_factory=dict)
    # our parameter name -> loader of the same matrix as the file's quantised GGML blocks;
    # build_model(keep_quantised=True) uses these instead of expanding the weights to float
    packed: Mapping[str, Callable[[], GGMLBlocks]] = field(default_factory=dict)


def half_precision_matrices(config: ModelConfig, tensors: Mapping[str, TensorLoader],
                            header: Callable[[str], tuple[torch.dtype, tuple[int, ...]]]) -> dict:
    """Loaders of a checkpoint's bfloat16/float16 matrices (the embedding and the bias-free
    projections) as block-kernel weights, for ``Checkpoint.packed``: on the CPU, by default, they
    stay in their 16-bit form with float32 activations (``build_model(keep_quantised=True)``), half
    of float32's memory with the float32 expansion's results, since each weight widens exactly.
    Gemma 4's per-layer embedding table too: it is read a row per token (E2B's is 2.3B entries);
    and a mixture's stacked experts (22.8B of 26B-A4B's 25.2B parameters).

    ``header(name)`` gives a parameter's stored dtype and shape without reading its data;
    ``tensors[name]()`` must return the stored tensor itself (a view of a mapped file, not a
    copy). RecurrentGemma's layers keep floats.
    """
    if config.family == "recurrentgemma":
        return {}
    packed = {}
    for name, load in tensors.items():
        if not (name in ("embed.weight", "per_layer_embed.weight") or name.endswith(("_proj.weight", *EXPERT_STACKS))):
            continue
        if name.endswith("o_proj.weight") and config.attn_out_bias:
            continue
        dtype, shape = header(name)
        ggml_type = HALF_TYPES.get(dtype)
        if ggml_type is not None and packable(ggml_type, shape):
            packed[name] = lambda f=load, t=ggml_type, k=shape[-1]: GGMLBlocks(f().contiguous().view(torch.uint8), t, k)
    return packed


@contextmanager
def skeleton():
    """Build modules on the meta device without running their initialisers.

    Their values are overwritten by the checkpoint anyway, and initialising meta tensors makes torch
    import its Python decompositions: ~75 MB of resident memory for nothing.
    """
    classes = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.LayerNorm)
    saved = [(cls, cls.__dict__["reset_parameters"]) for cls in classes if "reset_parameters" in cls.__dict__]
    try:
        for cls, _ in saved:
            cls.reset_parameters = lambda self: None
        with torch.device("meta"):
            yield
    finally:
        for cls, method in saved:
            cls.reset_parameters = method


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter name -> shape for ``config`` (from a meta-device model: no memory, no drift)."""
    return dict(_parameter_shapes(config))


@functools.lru_cache(maxsize=4)
def _parameter_shapes(config: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # a loader asks several times (names, checks); a meta model of a big config takes ~50 ms to build
    with skeleton():
        model = GemmaModel(config)
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


def check_file_tensors(source: str, shapes: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                       file_names: Mapping[str, str]) -> None:
    """Fail early, in the file's own tensor names, when a tensor is absent or mis-shaped.

    ``shapes`` is what the config needs, ``found`` what the file holds (both keyed by our names);
    formats whose headers list shapes call this before any tensor data is read.
    """
    missing = [file_names.get(n, n) for n in shapes if n not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing tensors {', '.join(missing[:3])}{more}")
    for name, shape in shapes.items():
        if tuple(found[name]) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {file_names.get(name, name)} has shape {tuple(found[name])}, "
                                  f"expected {tuple(shape)}")


def build_model(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", progress: bool = False,
                keep_quantised: bool = False) -> GemmaModel:
    """Create the model without allocating random weights, then fill it tensor by tensor.

    With ``keep_quantised``, matrices the checkpoint can hand over as quantised GGML blocks (a
    GGUF's) become quantised modules (quant/grouped.py) instead of float parameters.
    """
    with skeleton():
        model = _model_class(checkpoint.config)(checkpoint.config)
    expected = {name: p for name, p in model.named_parameters()}
    # integer tables (an assistant's token order) are filled too, keeping their dtype
    # (non-persistent buffers, such as an audio tower's attention windows, are the model's own)
    saved = set(model.state_dict(keep_vars=True))
    indices = {name: b for name, b in model.named_buffers() if not b.is_floating_point() and name in saved}
    expected.update(indices)
    # float buffers the checkpoint stores (an audio tower's clip ranges) are filled as buffers
    stored = {name: b for name, b in model.named_buffers() if b.is_floating_point() and name in checkpoint.tensors}
    expected.update(stored)
    shown = checkpoint.file_names.get
    missing = sorted(set(expected) - set(checkpoint.tensors))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{checkpoint.source}: missing tensors {', '.join(shown(n, n) for n in missing[:3])}{more}")
    unexpected = sorted(set(checkpoint.tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{checkpoint.source}: unexpected tensors {', '.join(unexpected[:3])}"
                              f" (the config does not describe this checkpoint)")
    names = list(expected)
    iterator = names
    if progress:
        iterator = tqdm(names, desc="loading weights", unit="tensor", leave=False)
    packed = checkpoint.packed if keep_quantised else {}

    def check_shape(name: str, shape: tuple[int, ...]) -> None:
        if tuple(shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{checkpoint.source}: tensor {shown(name, name)} has shape {tuple(shape)}, "
                                  f"expected {tuple(expected[name].shape)}")

    with torch.no_grad():
        for name in iterator:
            if name in packed:
                blocks = packed[name]()
                check_shape(name, (*blocks.blocks.shape[:-1], blocks.in_features))
                install(model, name, blocks, dtype)
                continue
            tensor = checkpoint.tensors[name]()
            check_shape(name, tuple(tensor.shape))
            module_name, _, param_name = name.rpartition(".")
            if name in indices:
                setattr(model.get_submodule(module_name), param_name, tensor.to(device, indices[name].dtype))
                continue
            if name in stored:
                setattr(model.get_submodule(module_name), param_name, tensor.to(device, dtype))
                continue
            # Assign rather than copy: the loader's fresh tensor becomes the parameter, so no
            # second buffer of the model's size is ever allocated or touched.
            tensor = tensor.to(device=device, dtype=dtype).contiguous()
            setattr(model.get_submodule(module_name), param_name, torch.nn.Parameter(tensor, requires_grad=False))
    if packed:
        fuse_projections(model)
    model.eval()
    return model


def _model_class(config) -> type:
    """A vision-language config (models/multimodal.py) builds the decoder with its vision add-on,
    an assistant drafter's (models/assistant.py) the decoder with its projections and head, an
    embedding model's (models/encoder.py) the decoder with its pooling and projections."""
    if isinstance(config, AssistantConfig):
        return AssistantModel
    if isinstance(config, EmbeddingConfig):  # a bidirectional decoder with pooling and projections
        return EmbeddingModel
    if isinstance(config, Gemma4MultimodalConfig):  # Gemma 4's own vision encoder (models/gemma4_vision.py)
        return Gemma4VisionLanguageModel
    return VisionLanguageModel if isinstance(config, MultimodalConfig) else GemmaModel
