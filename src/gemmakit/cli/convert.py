"""``gemmakit convert``: any supported checkpoint -> a Hugging Face directory."""

from __future__ import annotations

from gemmakit.cli.common import add_matformer_arg, invalid


def add_parser(sub) -> None:
    v = sub.add_parser("convert", help="write any supported checkpoint as a Hugging Face directory",
                       description="Convert SRC (.gguf, gemma_pytorch .ckpt or checkpoint directory) into a "
                                   "Hugging Face directory DST (config.json, safetensors, tokenizer files) that "
                                   "transformers loads with AutoModelForCausalLM.")
    v.add_argument("source", metavar="SRC")
    v.add_argument("destination", metavar="DST", help="a new (or empty) directory")
    v.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the weights (default: keep each tensor's dtype; GGUF quants become float32)")
    v.add_argument("--config", metavar="PRESET", default=None, help="architecture preset of a .ckpt source")
    v.add_argument("--shard-size", type=float, default=5.0, metavar="GB",
                   help="largest safetensors shard in GB (default 5)")
    add_matformer_arg(v)
    v.set_defaults(func=run)


def run(args) -> int:
    from gemmakit.api import parse_dtype
    from gemmakit.convert import convert

    if args.shard_size <= 0:
        raise invalid("--shard-size must be positive")
    dtype = parse_dtype(args.dtype) if args.dtype else None
    out = convert(args.source, args.destination, dtype=dtype, config=args.config,
                  max_shard_bytes=int(args.shard_size * 1e9), matformer=args.matformer)
    print(out)
    return 0
