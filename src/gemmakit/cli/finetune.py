"""``gemmakit finetune``: LoRA or full fine-tuning on a JSONL file."""

from __future__ import annotations

from gemmakit.cli.common import add_train_args, train_config


def add_parser(sub) -> None:
    f = sub.add_parser("finetune", help="LoRA or full fine-tuning on a JSONL file",
                       description="Fine-tune a model on JSONL data. LoRA by default (adapter saved in PEFT's "
                                   "layout under DIR/adapter); --full trains every weight. Run under torchrun "
                                   "to shard training over several processes with FSDP2.")
    f.add_argument("--model", "-m", metavar="SRC", default=None, help="a .gguf file or checkpoint directory")
    add_train_args(f)
    f.add_argument("--full", action="store_true", help="train every weight instead of LoRA")
    f.add_argument("--lora-rank", type=int, default=8)
    f.add_argument("--lora-alpha", type=float, default=16.0)
    f.add_argument("--lora-dropout", type=float, default=0.0)
    f.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                   help="LoRA target modules among q_proj k_proj v_proj o_proj gate_proj up_proj down_proj "
                        "(default: all seven)")
    f.add_argument("--merge", action="store_true", help="also save the merged model as DIR/model (HF layout)")
    f.set_defaults(func=run)


def run(args) -> int:
    from gemmakit.models.lora import DEFAULT_TARGETS, LoRAConfig, _resolve_targets
    from gemmakit.train.finetune import finetune

    lora = None if args.full else LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                             targets=tuple(args.targets or DEFAULT_TARGETS))
    if lora is not None:  # reject bad targets before loading anything
        _resolve_targets(lora.targets)
    finetune(args.model, args.data, args.out, lora, train_config(args, 2e-5 if args.full else 2e-4),
             seq_len=args.seq_len, dtype=args.dtype, resume=args.resume, skip_bad=args.skip_bad_lines,
             heldout=args.heldout, merge=args.merge, progress=not args.no_progress)
    return 0
