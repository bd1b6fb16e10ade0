"""``gemmakit quantize``: any supported checkpoint -> a quantised GGUF file."""

from __future__ import annotations

import sys

from gemmakit.cli.common import EPILOG


def add_parser(sub) -> None:
    q = sub.add_parser("quantize", help="write any supported checkpoint as a quantised GGUF that loads fast",
                       epilog=EPILOG,
                       description="Quantise SRC (.gguf, gemma_pytorch .ckpt or checkpoint directory) into the GGUF "
                                   "file DST: every matrix in GGML blocks (int8 -> Q8_0, int4 -> Q4_1), norms in "
                                   "float32, the tokenizer included. gemmakit runs the blocks without expanding them; "
                                   "llama.cpp reads the file too. Gemma 1/2/3 text models.")
    q.add_argument("source", metavar="SRC")
    q.add_argument("destination", metavar="DST", help="the .gguf file to write")
    q.add_argument("--scheme", choices=["int8", "int4"], default="int8",
                   help="int8: Q8_0, 8.5 bits per weight, outputs close to the source; int4: Q4_1, 5 bits per "
                        "weight on disk and in memory (gemmakit runs the file's blocks in place) (default int8)")
    q.add_argument("--config", metavar="PRESET", default=None, help="architecture preset of a .ckpt source")
    q.add_argument("--force", action="store_true", help="replace DST if it exists")
    q.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from gemmakit.checkpoints.gguf_writer import quantize_checkpoint

    progress = None
    if sys.stderr.isatty():
        def progress(items):
            return tqdm(items, desc=f"quantising to {args.scheme}", unit="tensor", leave=False)

    r = quantize_checkpoint(args.source, args.destination, args.scheme, force=args.force, config=args.config,
                            progress=progress)
    print(f"{args.destination}: {r.tensors} tensors, matrices in {r.qtype}, {r.bytes / 1e6:.1f} MB, "
          f"{r.seconds:.1f} s")
    return 0
