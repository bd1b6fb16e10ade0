"""Argument parsing and command bodies for ``gemmakit finetune / distill / perplexity``.

Kept out of gemmakit/cli.py so that file only registers the commands; everything here imports
lazily, so ``gemmakit generate`` never pays for the training modules.
"""

from __future__ import annotations

import argparse
import json
import sys


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="FILE",
                   help='JSONL: one {"text": ...} or {"messages": [...]} per line')
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4 LoRA, 2e-5 full, 5e-4 distil)")
    p.add_argument("--batch-size", type=int, default=4, help="blocks per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed block (default 256)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="training dtype of the weights (LoRA matrices stay float32)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block in the backward pass (less memory, ~30%% slower)")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction of examples held out for evaluation")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: at the end)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="warn about and skip malformed JSONL lines (default: stop at the first one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub) -> None:
    f = sub.add_parser("finetune", help="LoRA or full fine-tuning on a JSONL file",
                       description="Fine-tune a model on JSONL data. LoRA by default (adapter saved in PEFT's "
                                   "layout under DIR/adapter); --full trains every weight. Run under torchrun "
                                   "to shard training over several processes with FSDP2.")
    f.add_argument("--model", "-m", metavar="SRC", default=None, help="a .gguf file or checkpoint directory")
    _add_train_args(f)
    f.add_argument("--full", action="store_true", help="train every weight instead of LoRA")
    f.add_argument("--lora-rank", type=int, default=8)
    f.add_argument("--lora-alpha", type=float, default=16.0)
    f.add_argument("--lora-dropout", type=float, default=0.0)
    f.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                   help="LoRA target modules among q_proj k_proj v_proj o_proj gate_proj up_proj down_proj "
                        "(default: all seven)")
    f.add_argument("--merge", action="store_true", help="also save the merged model as DIR/model (HF layout)")
    f.set_defaults(func=cmd_finetune)

    d = sub.add_parser("distill", help="knowledge distillation from a teacher into a student",
                       description="Train STUDENT on TEACHER's token distributions (forward KL with temperature, "
                                   "optionally mixed with the data's cross-entropy). --student may be a preset "
                                   "name for a randomly initialised student.")
    d.add_argument("--teacher", required=True, metavar="SRC")
    d.add_argument("--student", required=True, metavar="SRC", help="a checkpoint, or a preset name (random init)")
    _add_train_args(d)
    d.add_argument("--temperature", type=float, default=2.0)
    d.add_argument("--alpha", type=float, default=1.0, help="weight of the KL term; 1 - alpha goes to the data CE")
    d.add_argument("--top-k", type=int, default=None, help="keep only the teacher's top-k logits per position")
    d.add_argument("--precompute", metavar="DIR", default=None,
                   help="store the teacher's top-k logits in DIR first (or reuse them), then free the teacher")
    d.set_defaults(func=cmd_distill)

    p = sub.add_parser("perplexity", help="sliding-window perplexity of a text file (llama.cpp convention)",
                       description="Perplexity of a raw text file: windows of --ctx tokens, the second half of "
                                   "each scored, as llama.cpp's perplexity tool does.")
    p.add_argument("--model", "-m", metavar="SRC", default=None)
    p.add_argument("--data", required=True, metavar="FILE", help="a plain text file")
    p.add_argument("--ctx", type=int, default=512, help="window length n_ctx (default 512, as llama.cpp)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--adapter", metavar="DIR", default=None, help="a LoRA adapter to merge first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_perplexity)


def _train_config(args, default_lr: float):
    from gemmakit.train.loop import TrainConfig

    return TrainConfig(lr=args.lr if args.lr is not None else default_lr, epochs=args.epochs,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps,
                       warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, seed=args.seed,
                       grad_checkpointing=args.gradient_checkpointing, eval_every=args.eval_every,
                       save_every=args.save_every)


def cmd_finetune(args) -> int:
    from gemmakit.train.finetune import finetune
    from gemmakit.train.lora import DEFAULT_TARGETS, LoRAConfig

    lora = None if args.full else LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                             targets=tuple(args.targets or DEFAULT_TARGETS))
    if lora is not None:  # reject bad targets before loading anything
        from gemmakit.train.lora import _resolve_targets

        _resolve_targets(lora.targets)
    finetune(args.model, args.data, args.out, lora, _train_config(args, 2e-5 if args.full else 2e-4),
             seq_len=args.seq_len, dtype=args.dtype, resume=args.resume, skip_bad=args.skip_bad_lines,
             heldout=args.heldout, merge=args.merge, progress=not args.no_progress)
    return 0


def cmd_distill(args) -> int:
    from gemmakit.train.distill import distill

    distill(args.teacher, args.student, args.data, args.out, _train_config(args, 5e-4),
            temperature=args.temperature, alpha=args.alpha, top_k=args.top_k, precompute=args.precompute,
            seq_len=args.seq_len, dtype=args.dtype, resume=args.resume, skip_bad=args.skip_bad_lines,
            heldout=args.heldout, progress=not args.no_progress)
    return 0


def cmd_perplexity(args) -> int:
    from gemmakit.api import load
    from gemmakit.train.perplexity import perplexity_of_file

    # a measurement: the reference numerics (quantised weights' products in float32, not auto's bfloat16)
    model, tokenizer = load(args.model, dtype=args.dtype, adapter=args.adapter, prefill_dtype="float32")
    if tokenizer is None:
        from gemmakit.errors import TokenizerError

        raise TokenizerError("the model has no tokenizer")
    r = perplexity_of_file(model, tokenizer, args.data, args.ctx, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(r.__dict__))
    else:
        print(f"{r.chunks} chunks of {r.n_ctx} tokens, {r.scored} tokens scored (second half of each chunk)")
        print(f"Final estimate: PPL = {r.perplexity:.4f} +/- {r.error:.5f}")
    return 0
