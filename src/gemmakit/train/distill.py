"""Knowledge distillation: the student learns the teacher's next-token distributions.

Loss per scored position: ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(data)``,
where ``^T`` means softmax of logits / T (forward KL, as in Hinton et al. and Gemma's own recipe).
The ``T^2`` keeps gradient sizes comparable across temperatures.

With ``top_k``, the teacher's distribution is truncated to its k largest logits and renormalised,
and the student's log-probabilities are read at those k ids. That is what makes precomputing the
teacher affordable: :func:`precompute_teacher` writes k values + k ids per position to disk (a few
hundred bytes instead of a vocabulary-sized row), so a teacher too large to sit beside the student
runs once, is freed, and training reads its outputs back.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from gemmakit.api import load, parse_dtype
from gemmakit.checkpoints import open_checkpoint
from gemmakit.errors import CheckpointError, InvalidRequestError
from gemmakit.io import atomic_directory
from gemmakit.models.config import PRESETS
from gemmakit.models.decoder import GemmaModel
from gemmakit.train import distributed
from gemmakit.train.data import Blocks, load_blocks
from gemmakit.train.export import save_hf_directory
from gemmakit.train.loop import Trainer

STORE_FORMAT = "gemmakit-teacher-topk-1"


def kl_sum(student_logits: torch.Tensor, mask: torch.Tensor, temperature: float,
           teacher_logits: torch.Tensor | None = None,
           topk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``T^2 * sum over mask`` of KL(teacher || student); student ``[B, T, V]``, mask ``[B, T]``.

    The teacher is either full logits ``[B, T, V]`` or top-k ``(values [B, T, k], ids [B, T, k])``.
    """
    s = student_logits[mask].float() / temperature  # [N, V]
    log_q = F.log_softmax(s, dim=-1)
    if topk is not None:
        values, ids = topk[0][mask].float(), topk[1][mask].long()  # [N, k]
        log_p = F.log_softmax(values / temperature, dim=-1)
        log_q = log_q.gather(-1, ids)
    else:
        log_p = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    return kl * temperature**2


@dataclass
class TeacherTopK:
    """Precomputed top-k teacher logits for every block: ``values/ids [N, seq_len, k]``."""

    values: torch.Tensor
    ids: torch.Tensor
    k: int


def blocks_fingerprint(blocks: Blocks) -> str:
    return hashlib.sha256(blocks.ids.numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def teacher_topk(teacher: nn.Module, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = teacher(ids.to(teacher.device)).float()  # [B, T, V]
    values, index = logits.topk(k, dim=-1)
    return values.cpu(), index.to(torch.int32).cpu()


def precompute_teacher(teacher: nn.Module, blocks: Blocks, k: int, directory: str | Path, batch_size: int = 4,
                       progress: bool = False) -> TeacherTopK:
    """Run the teacher over every block once and store its top-k logits (atomically) in ``directory``."""
    teacher.eval()
    values, ids = [], []
    starts = range(0, len(blocks), batch_size)
    if progress:
        starts = tqdm(starts, desc="teacher top-k", unit="batch", file=sys.stderr)
    for start in starts:
        v, i = teacher_topk(teacher, blocks.ids[start:start + batch_size, :-1], k)
        values.append(v)
        ids.append(i)
    store = TeacherTopK(torch.cat(values), torch.cat(ids), k)
    with atomic_directory(directory) as tmp:
        save_file({"values": store.values.contiguous(), "ids": store.ids.contiguous()}, str(tmp / "topk.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({"format": STORE_FORMAT, "k": k, "blocks": len(blocks),
                                                   "data": blocks_fingerprint(blocks)}) + "\n")
    return store


def load_teacher_store(directory: str | Path, blocks: Blocks) -> TeacherTopK:
    """Read a store written by :func:`precompute_teacher` for exactly these blocks."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
        tensors = load_file(str(directory / "topk.safetensors"))
    except (OSError, json.JSONDecodeError, Exception) as exc:
        raise CheckpointError(f"{directory}: not a readable teacher top-k store ({exc})") from None
    if meta.get("format") != STORE_FORMAT or meta.get("data") != blocks_fingerprint(blocks):
        raise CheckpointError(f"{directory}: was precomputed for different data or --seq-len; "
                              "delete it or pass another --precompute directory")
    return TeacherTopK(tensors["values"], tensors["ids"], int(meta["k"]))


def check_same_tokenizer(teacher_tok, student_tok, teacher_cfg, student_cfg) -> None:
    """Distillation compares distributions id by id: both models must share one vocabulary."""
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise InvalidRequestError(f"teacher and student have different vocabularies "
                                  f"({teacher_cfg.vocab_size} vs {student_cfg.vocab_size} ids)")
    if teacher_tok is None or student_tok is None:
        return
    if teacher_tok.vocab_size != student_tok.vocab_size or any(
            teacher_tok.id_to_piece(i) != student_tok.id_to_piece(i) for i in range(teacher_tok.vocab_size)):
        raise InvalidRequestError("teacher and student use different tokenizers; distillation needs the same one")


def distill_loss(temperature: float, alpha: float, teacher: nn.Module | None = None,
                 store: TeacherTopK | None = None, top_k: int | None = None):
    """The Trainer loss: KD against a live teacher or a precomputed store, mixed with data CE."""
    if not 0.0 <= alpha <= 1.0:
        raise InvalidRequestError("--alpha must be between 0 and 1")
    if not temperature > 0:
        raise InvalidRequestError("--temperature must be positive")

    def loss_sum(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logits = model(ids[:, :-1])  # [B, T, V]
        scored = mask[:, 1:]
        total = logits.new_zeros((), dtype=torch.float32)
        if alpha > 0:
            if store is not None:
                topk = (store.values[index].to(logits.device), store.ids[index].to(logits.device))
                total = total + alpha * kl_sum(logits, scored, temperature, topk=topk)
            elif top_k:
                total = total + alpha * kl_sum(logits, scored, temperature, topk=teacher_topk(teacher, ids[:, :-1], top_k))
            else:
                with torch.no_grad():
                    t_logits = teacher(ids[:, :-1])
                total = total + alpha * kl_sum(logits, scored, temperature, teacher_logits=t_logits)
        if alpha < 1:
            targets = ids[:, 1:].masked_fill(~scored, -100)
            total = total + (1 - alpha) * F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                          ignore_index=-100, reduction="sum")
        return total

    return loss_sum


@torch.no_grad()
def mean_kl(student: nn.Module, teacher: nn.Module, blocks: Blocks, batch_size: int = 4) -> float:
    """Mean KL(teacher || student) per scored position at T = 1 (the distillation metric)."""
    student.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks.ids[start:start + batch_size, :-1]
        mask = blocks.mask[start:start + batch_size, 1:]
        total += kl_sum(student(ids.to(student.device)), mask.to(student.device), 1.0,
                        teacher_logits=teacher(ids.to(teacher.device)).to(student.device)).item()
        count += int(mask.sum())
    return total / max(1, count)


def random_student(config, dtype: torch.dtype, device, seed: int = 0):
    """A freshly initialised student of a preset's shape (matrices N(0, 0.02), norms at zero = scale 1)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = GemmaModel(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model


def distill(teacher_src: str | None, student_src: str, data: str | Path, out: str | Path, config,
            temperature: float = 2.0, alpha: float = 1.0, top_k: int | None = None,
            precompute: str | Path | None = None, seq_len: int = 256, dtype: str = "float32",
            resume: bool = False, skip_bad: bool = False, heldout: float = 0.1, progress: bool = True, log=print):
    """``gemmakit distill``: all inputs are checked before the teacher runs or the first step."""
    config.check()
    if precompute is not None and not top_k:
        top_k = 64  # a precomputed store always holds top-k logits
    if top_k is not None and top_k < 1:
        raise InvalidRequestError("--top-k must be at least 1")
    teacher_ckpt = open_checkpoint(teacher_src)
    if student_src in PRESETS:  # a fresh student of a known shape, sharing the teacher's tokenizer
        student_cfg, student_tok = PRESETS[student_src], teacher_ckpt.tokenizer
    else:
        student_ckpt = open_checkpoint(student_src)
        student_cfg, student_tok = student_ckpt.config, student_ckpt.tokenizer
    tokenizer = teacher_ckpt.tokenizer or student_tok
    if tokenizer is None:
        raise InvalidRequestError("neither teacher nor student has a tokenizer to read the data with")
    check_same_tokenizer(teacher_ckpt.tokenizer, student_tok, teacher_ckpt.config, student_cfg)
    train_blocks, held = load_blocks(data, tokenizer, seq_len, heldout=heldout, seed=config.seed, skip_bad=skip_bad)
    rank, world = distributed.setup()
    device = distributed.device()

    teacher = store = None
    if precompute is not None:
        if (Path(precompute) / "meta.json").is_file():
            store = load_teacher_store(precompute, train_blocks)
        else:
            teacher, _ = load(teacher_src, dtype=dtype, device=device)
            store = precompute_teacher(teacher, train_blocks, top_k, precompute, config.batch_size,
                                       progress and rank == 0)
            del teacher
            teacher = None
            gc.collect()
    else:
        teacher, _ = load(teacher_src, dtype=dtype, device=device)
    if student_src in PRESETS:
        student = random_student(student_cfg, parse_dtype(dtype), device, seed=config.seed)
    else:
        student, _ = load(student_src, dtype=dtype, device=device, quant="none")  # trained: float weights
    student.requires_grad_(True)
    if world > 1:
        distributed.shard_for_training(student)
    loss_fn = distill_loss(temperature, alpha, teacher=teacher, store=store, top_k=top_k)
    trainer = Trainer(student, train_blocks, config, out, heldout=held, loss_fn=loss_fn, progress=progress,
                      rank=rank, world=world)
    if resume:
        trainer.load_checkpoint()
    if rank == 0:
        log(f"distilling into {sum(p.numel() for p in trainer.params.values()):,} student parameters, "
            f"{trainer.total_steps} steps, T={temperature}, alpha={alpha}"
            + (f", teacher top-{top_k}" if top_k else ", full teacher distribution"), file=sys.stderr)
    result = trainer.run()
    if world > 1:
        student = distributed.gather_full_model(student)
    if rank == 0:
        save_hf_directory(student, tokenizer, Path(out) / "model")
        metrics = {"steps": result.steps, "final_train_loss": result.losses[-1] if result.losses else None,
                   "tokens_per_s": round(result.tokens_per_s, 1), "seconds": round(result.seconds, 2),
                   "eval": [{"step": s, "loss": v, "perplexity": math.exp(v)} for s, v in result.evals]}
        (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if result.evals:
            log(f"held-out loss {result.evals[-1][1]:.4f}, perplexity {math.exp(result.evals[-1][1]):.2f}",
                file=sys.stderr)
        log(f"{result.tokens_per_s:.1f} training tokens/s; student saved to {Path(out) / 'model'}", file=sys.stderr)
    distributed.teardown()
    return result
