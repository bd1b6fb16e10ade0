"""``gemmakit distill``: knowledge distillation from a teacher into a student."""

from __future__ import annotations

from gemmakit.cli.common import add_train_args, train_config


def add_parser(sub) -> None:
    d = sub.add_parser("distill", help="knowledge distillation from a teacher into a student",
                       description="Train STUDENT on TEACHER's token distributions (forward KL with temperature, "
                                   "optionally mixed with the data's cross-entropy). --student may be a preset "
                                   "name for a randomly initialised student.")
    d.add_argument("--teacher", required=True, metavar="SRC")
    d.add_argument("--student", required=True, metavar="SRC", help="a checkpoint, or a preset name (random init)")
    add_train_args(d)
    d.add_argument("--temperature", type=float, default=2.0)
    d.add_argument("--alpha", type=float, default=1.0, help="weight of the KL term; 1 - alpha goes to the data CE")
    d.add_argument("--top-k", type=int, default=None, help="keep only the teacher's top-k logits per position")
    d.add_argument("--precompute", metavar="DIR", default=None,
                   help="store the teacher's top-k logits in DIR first (or reuse them), then free the teacher")
    d.set_defaults(func=run)


def run(args) -> int:
    from gemmakit.train.distill import distill

    distill(args.teacher, args.student, args.data, args.out, train_config(args, 5e-4),
            temperature=args.temperature, alpha=args.alpha, top_k=args.top_k, precompute=args.precompute,
            seq_len=args.seq_len, dtype=args.dtype, resume=args.resume, skip_bad=args.skip_bad_lines,
            heldout=args.heldout, progress=not args.no_progress)
    return 0
