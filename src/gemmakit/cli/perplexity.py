"""``gemmakit perplexity``: sliding-window perplexity of a text file (llama.cpp's convention)."""

from __future__ import annotations

import json
import sys

from gemmakit.errors import TokenizerError


def add_parser(sub) -> None:
    p = sub.add_parser("perplexity", help="sliding-window perplexity of a text file (llama.cpp convention)",
                       description="Perplexity of a raw text file: windows of --ctx tokens, the second half of "
                                   "each scored, as llama.cpp's perplexity tool does.")
    p.add_argument("--model", "-m", metavar="SRC", default=None)
    p.add_argument("--data", required=True, metavar="FILE", help="a plain text file")
    p.add_argument("--ctx", type=int, default=512, help="window length n_ctx (default 512, as llama.cpp)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--adapter", metavar="DIR", default=None, help="a LoRA adapter to merge first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from gemmakit.api import load
    from gemmakit.train.perplexity import perplexity_of_file

    # a measurement: the reference numerics (quantised weights' products in float32, not auto's bfloat16)
    model, tokenizer = load(args.model, dtype=args.dtype, adapter=args.adapter, prefill_dtype="float32")
    if tokenizer is None:
        raise TokenizerError("the model has no tokenizer")
    r = perplexity_of_file(model, tokenizer, args.data, args.ctx, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(r.__dict__))
    else:
        print(f"{r.chunks} chunks of {r.n_ctx} tokens, {r.scored} tokens scored (second half of each chunk)")
        print(f"Final estimate: PPL = {r.perplexity:.4f} +/- {r.error:.5f}")
    return 0
