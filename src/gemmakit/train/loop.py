"""The training loop shared by fine-tuning and distillation.

One optimizer step consumes ``batch_size * grad_accum`` packed blocks from a fixed stream: the
blocks of epoch 0 in a seeded order, then epoch 1 in another, and so on. The data position is
therefore just the step number, and a run resumed from a checkpoint (trainable weights, AdamW
state, RNG state, step) continues bit for bit as the unbroken run would have.

The loss of a step is the sum of per-token losses over every scored target in the step divided by
their count, so gradient accumulation and data parallelism change only how the sum is split up,
not what it is. Under ``torch.distributed`` each rank takes its share of every micro-batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from gemmakit.errors import CheckpointError, InvalidRequestError
from gemmakit.io import atomic_file
from gemmakit.train.data import Blocks, epoch_order

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "gemmakit-train-1"

# (model, ids [B, T+1], mask [B, T+1], block indices [B]) -> summed loss over the scored targets
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = None  # cap on optimizer steps (default: all epochs)
    warmup_steps: int = 0  # linear warm-up of the learning rate, then constant
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    grad_checkpointing: bool = False
    eval_every: int = 0  # evaluate the held-out split every N steps (0: only at the end)
    save_every: int = 0  # write a resumable checkpoint every N steps (0: only at the end)

    def check(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidRequestError("--max-steps must be at least 1")
        if not self.lr > 0:
            raise InvalidRequestError("--lr must be positive")


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # training loss of each step run in this call
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)
    tokens_per_s: float = 0.0
    seconds: float = 0.0


def cross_entropy_sum(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the scored targets of ``ids [B, T+1]``."""
    logits = model(ids[:, :-1])  # [B, T, V]
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in the backward pass instead of storing its activations.

    Memory then grows with one block's activations plus the residual stream per block, not with
    every intermediate of every block. The block's own ``forward`` is wrapped per instance, so
    parameter names (and everything keyed on them) stay unchanged.
    """
    for block in model.layers:
        original = block.forward

        def run(*args, _original=original):
            return checkpoint(_original, *args, use_reentrant=False)

        block.forward = run


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise InvalidRequestError("nothing to train: every parameter is frozen")
    return params


class Trainer:
    """Runs optimizer steps over packed blocks and writes resumable checkpoints to ``out``."""

    def __init__(self, model: nn.Module, train: Blocks, config: TrainConfig, out: str | Path | None = None,
                 heldout: Blocks | None = None, loss_fn: LossFn = cross_entropy_sum,
                 progress: bool = True, rank: int = 0, world: int = 1) -> None:
        config.check()
        self.model, self.train, self.heldout, self.config = model, train, heldout, config
        self.out = Path(out) if out is not None else None
        self.loss_fn, self.progress, self.rank, self.world = loss_fn, progress, rank, world
        self.params = trainable_parameters(model)
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=config.lr, weight_decay=config.weight_decay)
        per_step = config.batch_size * config.grad_accum
        self.total_steps = math.ceil(len(train) * config.epochs / per_step)
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.step = 0
        torch.manual_seed(config.seed)
        if config.grad_checkpointing:
            enable_gradient_checkpointing(model)

    # --- data ---------------------------------------------------------------------------------

    def _step_blocks(self, step: int) -> list[int]:
        """Indices of the blocks consumed by optimizer step ``step`` (a pure function of the step)."""
        per_step = self.config.batch_size * self.config.grad_accum
        n = len(self.train)
        out: list[int] = []
        for position in range(step * per_step, min((step + 1) * per_step, n * self.config.epochs)):
            epoch, offset = divmod(position, n)
            if offset == 0 or not out:
                order = epoch_order(n, epoch, self.config.seed)
            out.append(order[offset])
        return out

    def fingerprint(self) -> str:
        """Identifies the training data, so a checkpoint is never resumed on other data."""
        h = hashlib.sha256(self.train.ids.numpy().tobytes())
        h.update(self.train.mask.numpy().tobytes())
        return h.hexdigest()[:16]

    # --- training -----------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        if self.config.warmup_steps and step < self.config.warmup_steps:
            return self.config.lr * (step + 1) / self.config.warmup_steps
        return self.config.lr

    def train_step(self) -> float:
        """One optimizer step (with accumulation); returns the step's mean loss per target token."""
        c = self.config
        blocks = self._step_blocks(self.step)
        micro = [blocks[i:i + c.batch_size] for i in range(0, len(blocks), c.batch_size)]
        total_targets = max(1, int(self.train.mask[blocks, 1:].sum()))
        self.model.train()
        loss_total = 0.0
        for rows in micro:
            mine = rows[self.rank::self.world]  # this rank's share of the micro-batch
            weight = self.world / total_targets  # ranks' gradients are averaged: scale to the global mean
            if not mine:  # every rank must join the backward's collectives: run one block at weight 0
                mine, weight = rows[:1], 0.0
            index = torch.tensor(mine)
            ids, mask = self.train.ids[index], self.train.mask[index]
            loss_sum = self.loss_fn(self.model, ids.to(self._device), mask.to(self._device), index)
            (loss_sum * weight).backward()
            loss_total += loss_sum.item() if weight else 0.0
        if self.world > 1:
            t = torch.tensor([loss_total], dtype=torch.float64)
            dist.all_reduce(t)
            loss_total = t.item()
        if c.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), c.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_total / total_targets

    @property
    def _device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def run(self, stop_after: int | None = None) -> TrainResult:
        """Train until ``total_steps`` (or ``stop_after`` more steps, to split a run in tests)."""
        c = self.config
        result = TrainResult(steps=self.step)
        end = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        bar = None
        if self.progress and self.rank == 0:
            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="training",
                       dynamic_ncols=True, file=sys.stderr)
        seq = self.train.ids.shape[1] - 1
        tokens = 0
        t0 = time.perf_counter()
        while self.step < end:
            n_blocks = len(self._step_blocks(self.step))
            loss = self.train_step()
            tokens += n_blocks * seq
            result.losses.append(loss)
            elapsed = time.perf_counter() - t0
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / elapsed:.0f}")
                bar.update(1)
            if self.heldout is not None and c.eval_every and self.step % c.eval_every == 0 and self.step < end:
                result.evals.append((self.step, self.evaluate()))
            if self.out is not None and c.save_every and self.step % c.save_every == 0:
                self.save_checkpoint()
        result.seconds = time.perf_counter() - t0
        result.tokens_per_s = tokens / result.seconds if result.seconds > 0 else 0.0
        if bar is not None:
            bar.close()
        if self.heldout is not None and self.step == self.total_steps:
            result.evals.append((self.step, self.evaluate()))
        if self.out is not None:
            self.save_checkpoint()
        result.steps = self.step
        return result

    @torch.no_grad()
    def evaluate(self, blocks: Blocks | None = None) -> float:
        """Mean cross-entropy per scored target on the held-out blocks (perplexity = exp of it)."""
        blocks = blocks or self.heldout
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(blocks), self.config.batch_size):
            ids = blocks.ids[start:start + self.config.batch_size].to(self._device)
            mask = blocks.mask[start:start + self.config.batch_size].to(self._device)
            total += cross_entropy_sum(self.model, ids, mask, torch.arange(0)).item()
            count += int(mask[:, 1:].sum())
        return total / max(1, count)

    # --- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write ``out/checkpoint.pt`` atomically: a crash mid-write leaves the previous one intact."""
        state = {
            "format": FORMAT, "step": self.step, "config": dataclasses.asdict(self.config),
            "data": self.fingerprint(), "rng": torch.get_rng_state(),
            "trainable": {n: _full(p).detach().cpu() for n, p in self.params.items()},
            "optimizer": _full_optimizer_state(self.optimizer),
        }
        if self.rank != 0:
            return None
        path = self.out / CHECKPOINT_NAME
        with atomic_file(path) as tmp:
            torch.save(state, tmp)
        return path

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        """Restore weights, optimizer, RNG and step from a checkpoint written by the same run."""
        path = Path(path) if path is not None else self.out / CHECKPOINT_NAME
        if not path.is_file():
            raise CheckpointError(f"nothing to resume: {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable training checkpoint ({exc})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a gemmakit training checkpoint")
        if state["data"] != self.fingerprint():
            raise CheckpointError(f"{path}: was written for different training data or --seq-len")
        mine = dataclasses.asdict(self.config)
        for key in ("batch_size", "grad_accum", "seed", "epochs"):
            if state["config"][key] != mine[key]:
                raise CheckpointError(f"{path}: was written with {key}={state['config'][key]}, "
                                      f"not {mine[key]}; resume with the same settings")
        if set(state["trainable"]) != set(self.params):
            raise CheckpointError(f"{path}: trains different parameters (LoRA vs full, or other targets)")
        with torch.no_grad():
            for n, p in self.params.items():
                _load_full(p, state["trainable"][n])
        _load_full_optimizer_state(self.optimizer, state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a parameter that may be sharded (FSDP2 DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _shard_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This rank's shard of the full ``value``, placed as the DTensor ``param`` is."""
    from torch.distributed.tensor import distribute_tensor  # 0.4-1.5 s to import: only sharded runs need it

    return distribute_tensor(value, param.device_mesh, param.placements)


def _load_full(param: torch.Tensor, value: torch.Tensor) -> None:
    if hasattr(param, "full_tensor"):  # DTensor: take this rank's shard of the full value
        param.copy_(_shard_like(param, value.to(param.dtype)))
    else:
        param.copy_(value)


def _full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    sd = optimizer.state_dict()
    state = {k: {n: (_full(v).cpu() if torch.is_tensor(v) else v) for n, v in s.items()}
             for k, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def _load_full_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for k, s in saved["state"].items():
        p = params[int(k)]
        state[k] = {}
        for n, v in s.items():
            if torch.is_tensor(v) and v.dim() > 0 and hasattr(p, "full_tensor"):
                v = _shard_like(p, v)
            state[k][n] = v
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
