"""Scale-out on torch.distributed: FSDP2 training and tensor-parallel inference.

Launch any gemmakit training command with ``torchrun`` and it finds ``WORLD_SIZE`` / ``RANK`` in
its environment: :func:`setup` joins the process group (NCCL on GPUs, gloo on CPU), every decoder
block and then the whole model are sharded with FSDP2 (``fully_shard``), and each rank takes its
share of every micro-batch (see :mod:`gemmakit.train.loop`). Nothing here is a home-made engine:
sharding, gathering and gradient reduction are torch.distributed's.

Tensor parallelism (:func:`tensor_parallel`) splits each attention layer by heads and each MLP by
intermediate columns, Megatron style: q/k/v and gate/up keep the output rows of this rank's heads
or columns, o_proj and down_proj keep the matching input columns and their partial outputs are
summed with one ``all_reduce`` per sub-layer. Embedding, norms and head stay replicated.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gemmakit.errors import InvalidRequestError
from gemmakit.models.decoder import GemmaModel


def setup(timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun; returns ``(rank, world_size)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    if dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.destroy_process_group()


def device() -> torch.device:
    """This process's device: its local GPU under torchrun with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# --- FSDP2 training -------------------------------------------------------------------------------


def shard_for_training(model: GemmaModel) -> GemmaModel:
    """Shard parameters, gradients and optimizer state across ranks with FSDP2, block by block.

    Each block is its own FSDP unit (gathered just before its forward, freed after), the root unit
    holds the tied embedding/head and final norm. Parameters become DTensors; an optimizer built
    afterwards holds only this rank's shard of its state.
    """
    from torch.distributed.fsdp import fully_shard  # 0.6-1 s to import: only torchrun runs get here

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def gather_full_model(model: nn.Module) -> nn.Module:
    """Replace every sharded parameter with its full value (collective: all ranks must call)."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if hasattr(p, "full_tensor"):
                full = p.full_tensor().detach()
                module._parameters[name] = nn.Parameter(full, requires_grad=p.requires_grad)
    return model


# --- tensor-parallel inference --------------------------------------------------------------------


class RowParallelLinear(nn.Linear):
    """A linear layer holding some input columns; partial outputs are summed across ranks."""

    def __init__(self, weight: torch.Tensor, group=None) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out


def _rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    keep = nn.Linear(linear.in_features, len(index), bias=False, device="meta")
    keep.weight = nn.Parameter(linear.weight.detach()[index].clone(), requires_grad=False)
    return keep


def tensor_parallel(model: GemmaModel, rank: int | None = None, world: int | None = None, group=None) -> GemmaModel:
    """Keep this rank's heads and MLP columns of every block, in place (call on every rank).

    With fewer KV heads than ranks (Gemma 3 270M has one), a KV head is replicated on every rank
    whose query heads read it, so any world size that divides the query heads works.
    """
    rank = dist.get_rank(group) if rank is None else rank
    world = dist.get_world_size(group) if world is None else world
    c = model.config
    if c.num_heads % world or c.intermediate_size % world:
        raise InvalidRequestError(f"tensor parallelism over {world} ranks needs the query heads ({c.num_heads}) "
                                  f"and MLP width ({c.intermediate_size}) to divide evenly")
    heads = c.num_heads // world
    groups = c.num_heads // c.num_kv_heads  # query heads per KV head
    q_heads = torch.arange(rank * heads, (rank + 1) * heads)
    kv_heads = torch.unique(q_heads // groups)
    if c.num_kv_heads >= world:
        if c.num_kv_heads % world:
            raise InvalidRequestError(f"{c.num_kv_heads} KV heads do not split over {world} ranks")
    elif heads % len(kv_heads) or groups % heads:
        raise InvalidRequestError(f"{c.num_heads} query / {c.num_kv_heads} KV heads do not split over {world} ranks")
    d = c.head_dim
    q_rows = (q_heads[:, None] * d + torch.arange(d)).flatten()
    kv_rows = (kv_heads[:, None] * d + torch.arange(d)).flatten()
    cols = c.intermediate_size // world
    mlp_rows = torch.arange(rank * cols, (rank + 1) * cols)
    with torch.no_grad():
        for block in model.layers:
            a = block.attn
            a.q_proj, a.k_proj, a.v_proj = _rows(a.q_proj, q_rows), _rows(a.k_proj, kv_rows), _rows(a.v_proj, kv_rows)
            a.o_proj = RowParallelLinear(a.o_proj.weight.detach()[:, q_rows].clone(), group)
            a.num_heads, a.num_kv_heads = heads, len(kv_heads)
            m = block.mlp
            m.gate_proj, m.up_proj = _rows(m.gate_proj, mlp_rows), _rows(m.up_proj, mlp_rows)
            m.down_proj = RowParallelLinear(m.down_proj.weight.detach()[:, mlp_rows].clone(), group)
    # The cache is sized from the config: give it this rank's head counts.
    model.config = c.replace(num_heads=heads, num_kv_heads=len(kv_heads), intermediate_size=cols)
    return model
