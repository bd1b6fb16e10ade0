"""``gemmakit quantize``: any supported checkpoint -> a quantised GGUF file."""

from __future__ import annotations

import sys

from gemmakit.cli.common import EPILOG

# Kept in step with checkpoints/gguf_writer.py's SCHEMES (not imported: the CLI's parser is built
# without loading torch or gguf).
_SCHEMES = ("int8", "int4", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


def _scheme(text: str) -> str:
    """--scheme in any case -> its canonical spelling (argparse checks it against the choices)."""
    return text.lower() if text.lower() in ("int8", "int4") else text.upper()


def add_parser(sub) -> None:
    q = sub.add_parser("quantize", help="write any supported checkpoint as a quantised GGUF that loads fast",
                       epilog=EPILOG,
                       description="Quantise SRC (.gguf, gemma_pytorch .ckpt or checkpoint directory) into the GGUF "
                                   "file DST: matrices in GGML blocks (int8 -> Q8_0, int4 -> Q4_1, or one of "
                                   "llama.cpp's mixes Q4_K_M, Q5_K_M, Q6_K, Q8_0 with its per-tensor types), norms "
                                   "in float32, the tokenizer included. gemmakit runs the blocks without expanding "
                                   "them; llama.cpp reads the file too. Gemma 1/2/3 text models.")
    q.add_argument("source", metavar="SRC")
    q.add_argument("destination", metavar="DST", help="the .gguf file to write")
    q.add_argument("--scheme", type=_scheme, choices=_SCHEMES, default="int8", metavar="{" + ",".join(_SCHEMES) + "}",
                   help="int8: Q8_0, 8.5 bits per weight, outputs close to the source; int4: Q4_1, 5 bits per "
                        "weight on disk and in memory (gemmakit runs the file's blocks in place); Q4_K_M, "
                        "Q5_K_M, Q6_K, Q8_0 (any case): the files llama.cpp's quantiser writes, the same type "
                        "for each tensor (default int8)")
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
    mix = ", ".join(f"{n} {t}" for t, n in sorted(r.types.items(), key=lambda kv: -kv[1]))
    print(f"{args.destination}: {r.tensors} tensors ({mix}), matrices in {r.qtype}, {r.bytes / 1e6:.1f} MB, "
          f"{r.seconds:.1f} s")
    return 0
