"""Linear layers and the tied embedding running on quantised weights, never expanded to float.

Two weight holders share one interface (``matmul``, ``rows``, ``in_features``/``out_features``):

- :class:`GGMLWeight` keeps a GGUF file's matrices as the file stores them, in GGML blocks
  (0.56-1.06 bytes per weight for the default model's Q4_K/Q5_0/Q6_K/Q8_0), and multiplies by the
  blocks directly (quant/ggml_ops.py ``ggml_matmul``). Several matrices with the same input (q, k
  and v; gate and up) are one weight of several parts, in whatever types the file mixed, run as one
  call. This is how ``--quant gguf`` (the default for a quantised GGUF on the CPU) holds weights,
  and, as GGML's F16/BF16 types, how a bfloat16/float16 checkpoint's matrices stay 16-bit.
  :class:`GGMLExperts` is the same for a mixture's experts: one ``[E, N, row_bytes]`` tensor, as a
  GGUF stores them, multiplied one expert at a time.
- :class:`GroupedWeight` keeps int8 codes with a float32 scale per group of 32 inputs: what
  ``--quant int8`` requantises a float checkpoint into where the block kernel does not run (off
  the CPU, or with no built kernel). It dequantises for each matmul, in torch; on the CPU with
  the kernel, int8 is GGML Q8_0 blocks in a :class:`GGMLWeight` instead.

Either way the results equal dequantise-then-matmul up to float32 rounding; nothing is
re-quantised on the way, so the model computes what the file describes.

Gemma ties its LM head to the embedding, so one :class:`GroupedEmbedding` serves both: the lookup
dequantises only the rows it needs and the head streams the codes through the kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from gemmakit.errors import CheckpointError
from gemmakit.quant.ggml import HALF_TYPES, GGMLBlocks
from gemmakit.quant.ggml_ops import ggml_linear, ggml_rows


PREFILL_MIN_ROWS = 64  # fewer rows of a prompt take float32 even with a bfloat16 prefill_dtype (they cost little)
_SLAB_ROWS = 4096  # output rows GroupedWeight dequantises at a time (~10 MB of float32 for K = 640)


class GroupedCodes(NamedTuple):
    """``W [N, K] ~ scale * codes`` per group of ``group`` inputs (quant/linear.py ``quantize_int8_groups``)."""

    codes: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N, K / group] float32
    group: int


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, group: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale * codes`` per group: ``[n, K]`` int8 -> ``[n, K]`` float."""
    n, K = codes.shape
    return (codes.view(n, K // group, group).to(torch.float32) * scale.view(n, -1, 1)).view(n, K).to(dtype)


class GroupedWeight(nn.Module):
    """``W [N, K] = scale * codes`` per group of ``group`` inputs, as buffers."""

    prefill_dtype = torch.float32  # set by load(prefill_dtype=...); unused here: the products are float32

    def __init__(self, packed: GroupedCodes) -> None:
        super().__init__()
        self.register_buffer("codes", packed.codes.contiguous())
        self.register_buffer("scale", packed.scale.contiguous())
        self.group = packed.group
        self.out_features, self.in_features = packed.codes.shape

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K] @ W^T -> [..., N]`` in x's dtype, computed in float32 a slab of output rows
        at a time, so the float copy of the weight never exceeds a few MB."""
        flat = x.reshape(-1, self.in_features).to(torch.float32)
        y = torch.empty(flat.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        for start in range(0, self.out_features, _SLAB_ROWS):
            rows = slice(start, start + _SLAB_ROWS)
            y[:, rows] = F.linear(flat, dequantize_rows(self.codes[rows], self.scale[rows], self.group))
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_rows(self.codes[index], self.scale[index], self.group, dtype)

    def extra_repr(self) -> str:
        return f"{self.out_features}x{self.in_features}, int8 codes, symmetric groups of {self.group}"


class GGMLWeight(nn.Module):
    """One or more GGML-block matrices with the same input, as buffers: ``W = [W_0; W_1; ...]``.

    ``matmul`` returns the parts' outputs side by side (``[..., sum N_i]``) from one kernel call.
    """

    prefill_dtype = torch.float32  # a prompt's GEMM dtype (see _dtype_for); load(prefill_dtype=...) sets it
    activations = 0  # the block kernel's activations (ggml_ops.ACTIVATIONS); load(activations=...) sets it

    def __init__(self, parts: list[GGMLBlocks]) -> None:
        super().__init__()
        if len({p.in_features for p in parts}) != 1:
            raise ValueError("GGML weight parts must share their input size")
        for i, part in enumerate(parts):
            self.register_buffer(f"blocks_{i}", part.blocks.contiguous())
        self.types = [int(p.ggml_type) for p in parts]
        self.sizes = [p.blocks.shape[-2] for p in parts]
        self.in_features = parts[0].in_features
        self.out_features = sum(self.sizes)

    def parts(self) -> list[torch.Tensor]:
        return [getattr(self, f"blocks_{i}") for i in range(len(self.types))]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K] @ W^T -> [..., N]`` in x's dtype (computed in float32; a prompt's products in
        ``prefill_dtype``)."""
        flat = x.reshape(-1, self.in_features)
        y = ggml_linear(flat, self.parts(), self.types, self.in_features, self._dtype_for(x, flat.shape[0]),
                        self.activations)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _dtype_for(self, x: torch.Tensor, rows: int) -> torch.dtype:
        """``prefill_dtype`` for a prompt's products (several positions a row, at least
        PREFILL_MIN_ROWS rows), float32 for anything decode-sized: a serving batch's one position
        per row, a speculative round's few, so that decoded tokens never depend on the batch."""
        prompt = x.dim() >= 3 and x.shape[-2] > 1 and rows >= PREFILL_MIN_ROWS
        return self.prefill_dtype if prompt else torch.float32

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``index`` of a one-part weight as floats (the embedding lookup)."""
        (blocks,), (ggml_type,) = self.parts(), self.types
        return ggml_rows(blocks, index, ggml_type, self.in_features).to(dtype)

    def extra_repr(self) -> str:
        kinds = "+".join(GGMLQuantizationType(t).name for t in self.types)
        return f"{self.out_features}x{self.in_features}, GGML blocks {kinds}"


class GGMLExperts(GGMLWeight):
    """A mixture's experts, ``E`` matrices of one shape and type, as one GGML tensor ``[E, N,
    row_bytes]`` (a GGUF's ``ffn_*_exps`` as stored, or requantised): the file's 3-D tensor stays
    whole, and ``matmul(x, e)`` reads expert ``e``'s rows alone, so unchosen experts cost nothing.

    It keeps GGMLWeight's buffers, types and ``prefill_dtype``, so what walks the model's block
    weights (requantising, the bfloat16 prefill, huge pages) covers the experts too; only the
    product differs, taking the expert to multiply by.
    """

    def __init__(self, parts: list[GGMLBlocks]) -> None:
        super().__init__(parts)
        self.num_experts = parts[0].blocks.shape[0]

    def matmul(self, x: torch.Tensor, expert: int, prompt: bool = False) -> torch.Tensor:
        """``x [n, K]`` (the rows sent to ``expert``) times that expert's matrix: ``[n, N]`` float32;
        in ``prefill_dtype`` where ``prompt`` (the rows come from a prompt) and there are at least
        PREFILL_MIN_ROWS of them, as GGMLWeight decides for a prompt's products."""
        dtype = self.prefill_dtype if prompt and x.shape[0] >= PREFILL_MIN_ROWS else torch.float32
        return ggml_linear(x, [b[expert] for b in self.parts()], self.types, self.in_features, dtype,
                           self.activations)

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts of {super().extra_repr()}"


def replace_stack(module: nn.Module, name: str, experts: GGMLExperts) -> None:
    """Put ``experts`` in place of ``module``'s stacked-experts parameter ``name``."""
    delattr(module, name)  # (torch refuses a module assigned to a parameter's name)
    setattr(module, name, experts)


def stack_rows(weights: list[GroupedWeight]) -> GroupedCodes | None:
    """Several weights with the same input as one ``[sum N, K]`` weight, or None if they differ in
    group size."""
    if len({(w.group, w.in_features) for w in weights}) != 1:
        return None
    return GroupedCodes(torch.cat([w.codes for w in weights]), torch.cat([w.scale for w in weights]),
                        weights[0].group)


def _weight(packed: GroupedCodes | GGMLBlocks | nn.Module) -> nn.Module:
    if isinstance(packed, GroupedCodes):
        return GroupedWeight(packed)
    if isinstance(packed, GGMLBlocks):
        return GGMLWeight([packed])
    return packed  # already a weight holder (fused parts)


class GroupedLinear(nn.Module):
    """A bias-free linear layer whose weight stays quantised (GGML blocks or grouped int8 codes)."""

    def __init__(self, packed: GroupedCodes | GGMLBlocks | nn.Module) -> None:
        super().__init__()
        self.w = _weight(packed)
        self.in_features, self.out_features = self.w.in_features, self.w.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.matmul(x)


class GroupedEmbedding(nn.Module):
    """The tied embedding and LM head from one set of grouped codes.

    ``weight`` is an empty tensor carrying only the compute dtype and device, so code that asks the
    model for its dtype or device keeps working; ``project(h)`` is the head matmul.
    """

    def __init__(self, packed: GroupedCodes | GGMLBlocks, dtype: torch.dtype) -> None:
        super().__init__()
        self.w = _weight(packed)
        self.num_embeddings, self.embedding_dim = self.w.out_features, self.w.in_features
        self.register_buffer("_probe", torch.empty(0, dtype=dtype), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self._probe

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        return self.w.rows(ids.reshape(-1), self._probe.dtype).reshape(*ids.shape, self.embedding_dim)

    def project(self, h: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., V]
        return self.w.matmul(h)


def install(model: nn.Module, name: str, packed: GroupedCodes | GGMLBlocks, dtype: torch.dtype) -> None:
    """Put a quantised weight in place of parameter ``name`` (``embed.weight``, a linear's
    ``.weight``, or a stack of experts that its module names in ``expert_stacks``)."""
    module_name, _, param_name = name.rpartition(".")
    if isinstance(packed, GGMLBlocks) and packed.blocks.dim() == 3:
        owner = model.get_submodule(module_name)
        if param_name not in getattr(owner, "expert_stacks", ()):
            raise TypeError(f"{name}: cannot keep a stack of matrices quantised in a {type(owner).__name__}")
        # (its shape was checked against the parameter's by the caller, checkpoints/base.build_model)
        replace_stack(owner, param_name, GGMLExperts([packed]))
        return
    parent_name, _, child_name = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    child = getattr(parent, child_name)
    if isinstance(child, nn.Embedding):
        new: nn.Module = GroupedEmbedding(packed, dtype)
    elif isinstance(child, nn.Linear) and child.bias is None:
        new = GroupedLinear(packed)
    else:
        raise TypeError(f"{name}: cannot keep a {type(child).__name__} quantised")
    if (new.w.out_features, new.w.in_features) != tuple(child.weight.shape):
        raise CheckpointError(f"tensor {name} has shape {(new.w.out_features, new.w.in_features)}, "
                              f"expected {tuple(child.weight.shape)}")
    setattr(parent, child_name, new)


def unmerged_projections(model: nn.Module) -> Iterator[tuple[nn.Module, list[nn.Module]]]:
    """``(module, parts)`` for each attention's q/k/v and each MLP's gate/up that are still separate
    layers (the modules say so with ``projections_to_fuse``): what :func:`fuse_projections`
    (quantised weights) and ``fuse_dense_projections`` (float weights on CUDA) may merge into one
    matmul with ``module.fuse``."""
    for module in model.modules():
        parts = module.projections_to_fuse() if hasattr(module, "projections_to_fuse") else None
        if parts is not None:
            yield module, parts


def fuse_projections(model: nn.Module) -> None:
    """Merge each attention's q/k/v and each MLP's gate/up into one grouped matmul.

    Decoding a token is one pass over the weights either way; fewer, larger calls save the per-call
    overhead (~55 kernel calls per token for the 270M model) and split better across threads.
    """
    for module, parts in list(unmerged_projections(model)):
        if not all(isinstance(p, GroupedLinear) for p in parts):
            continue
        weights = [p.w for p in parts]
        if all(isinstance(w, GGMLWeight) for w in weights):
            fused = GGMLWeight([GGMLBlocks(b, t, w.in_features) for w in weights
                                for b, t in zip(w.parts(), w.types)])
            module.fuse([p.out_features for p in parts], GroupedLinear(fused))
            continue
        if not all(isinstance(w, GroupedWeight) for w in weights):
            continue
        stacked = stack_rows(weights)
        if stacked is not None:
            module.fuse([p.out_features for p in parts], GroupedLinear(stacked))


def set_prefill_dtype(model: nn.Module, dtype: torch.dtype, quantised_codes_only: bool = False) -> int:
    """Make every quantised weight of ``model`` run its many-row (prefill) products in ``dtype``;
    returns how many weights that covers (decode-sized products keep the float32 block kernels).
    ``quantised_codes_only`` takes only GGML-block weights of quantised codes (not F16/BF16 ones,
    and not the grouped int8 codes, whose products are float32 whatever is set)."""
    plain = set(HALF_TYPES.values())
    if quantised_codes_only:
        weights = [m for m in model.modules() if isinstance(m, GGMLWeight) and not plain & set(m.types)]
    else:
        weights = [m for m in model.modules() if isinstance(m, (GGMLWeight, GroupedWeight))]
    for w in weights:
        w.prefill_dtype = dtype
    return len(weights)
