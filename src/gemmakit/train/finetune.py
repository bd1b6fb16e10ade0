"""``gemmakit finetune``: load a model, attach LoRA (or unfreeze everything), train, save outputs.

Outputs in ``out``: ``adapter/`` (PEFT layout, LoRA runs), ``model/`` (a merged or fully
fine-tuned Hugging Face directory, when asked or for full fine-tuning), ``checkpoint.pt`` (to
resume) and ``metrics.json``. Every input problem is reported before the first step.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from gemmakit.api import parse_dtype
from gemmakit.checkpoints import build_model, open_checkpoint
from gemmakit.checkpoints.peft import save_adapter
from gemmakit.errors import TokenizerError
from gemmakit.models.lora import LoRAConfig, apply_lora, merge_lora
from gemmakit.train import distributed
from gemmakit.train.data import load_blocks
from gemmakit.train.export import save_hf_directory
from gemmakit.train.loop import Trainer, TrainConfig, TrainResult


def finetune(model_src: str | None, data: str | Path, out: str | Path, lora: LoRAConfig | None,
             config: TrainConfig, seq_len: int = 256, dtype: str = "float32", resume: bool = False,
             skip_bad: bool = False, heldout: float = 0.1, merge: bool = False, progress: bool = True,
             log=print) -> TrainResult:
    config.check()
    checkpoint = open_checkpoint(model_src)  # the tokenizer, without the weights yet: check the data first
    tokenizer = checkpoint.tokenizer
    if tokenizer is None:
        raise TokenizerError(f"{model_src}: the model has no tokenizer to read the training data with")
    train_blocks, held = load_blocks(data, tokenizer, seq_len, heldout=heldout, seed=config.seed, skip_bad=skip_bad)
    rank, world = distributed.setup()
    model = build_model(checkpoint, parse_dtype(dtype), distributed.device())
    if lora is not None:
        apply_lora(model, lora, seed=config.seed)
    else:
        model.requires_grad_(True)
    if world > 1:
        if lora is not None:  # FSDP2 gathers a block's parameters as one dtype
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.data = p.data.to(model.dtype)
        distributed.shard_for_training(model)
    out = Path(out)
    trainer = Trainer(model, train_blocks, config, out, heldout=held, progress=progress, rank=rank, world=world)
    if resume:
        trainer.load_checkpoint()
    n_train = sum(p.numel() for p in trainer.params.values())
    if rank == 0:
        log(f"training {n_train:,} parameters on {len(train_blocks)} blocks of {seq_len} tokens "
            f"({train_blocks.target_tokens:,} target tokens), {trainer.total_steps} steps"
            + (f", resuming at step {trainer.step}" if resume else ""), file=sys.stderr)
    result = trainer.run()
    if world > 1:
        model = distributed.gather_full_model(model)
    if rank == 0:
        _save_outputs(model, tokenizer, out, lora, merge, model_src)
        metrics = {"steps": result.steps, "final_train_loss": result.losses[-1] if result.losses else None,
                   "tokens_per_s": round(result.tokens_per_s, 1), "seconds": round(result.seconds, 2),
                   "eval": [{"step": s, "loss": loss, "perplexity": math.exp(loss)} for s, loss in result.evals]}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if result.evals:
            loss = result.evals[-1][1]
            log(f"held-out loss {loss:.4f}, perplexity {math.exp(loss):.2f}", file=sys.stderr)
        log(f"{result.tokens_per_s:.1f} training tokens/s; outputs in {out}", file=sys.stderr)
    distributed.teardown()
    return result


def _save_outputs(model, tokenizer, out: Path, lora: LoRAConfig | None, merge: bool, source) -> None:
    if lora is not None:
        save_adapter(model, out / "adapter", lora, base_model=str(source or ""))
        if not merge:
            return
        merge_lora(model)
    save_hf_directory(model, tokenizer, out / "model")
