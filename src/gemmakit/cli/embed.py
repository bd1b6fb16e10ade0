"""``gemmakit embed``: embeddings of texts as JSON lines, with an embedding model (EmbeddingGemma)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gemmakit.cli.common import add_model_args, invalid, load_model

DESCRIPTION = """\
Embed each TEXT (or each line of --file) with an embedding model and print one JSON object per
line: {"index": N, "text": ..., "embedding": [...]}. The embeddings are L2-normalised where the
model normalises (EmbeddingGemma does), so a dot product of two is their cosine similarity."""

EXAMPLES = """\
examples:
  gemmakit embed -m embeddinggemma-300m --prompt query "Which planet is known as the Red Planet?"
  gemmakit embed -m embeddinggemma-300m --prompt document --dim 256 --file docs.txt -o docs.jsonl

--model is an EmbeddingGemma sentence-transformers directory (modules.json beside config.json)."""


def add_parser(sub) -> None:
    e = sub.add_parser("embed", help="embeddings of texts as JSON lines (EmbeddingGemma)", description=DESCRIPTION,
                       epilog=EXAMPLES, formatter_class=_raw())
    add_model_args(e)
    e.add_argument("texts", metavar="TEXT", nargs="*", help="texts to embed (or use --file)")
    e.add_argument("--file", "-f", metavar="PATH",
                   help="embed each non-empty line of PATH (- = standard input) after any TEXT")
    e.add_argument("--prompt", metavar="NAME", default=None,
                   help="the model's task prompt put before each text, by name (EmbeddingGemma: query, document, "
                        "classification, clustering, ...; default: the model's default prompt, usually none)")
    e.add_argument("--dim", type=int, default=None, metavar="N",
                   help="keep the first N features and normalise again (Matryoshka; EmbeddingGemma is trained "
                        "for 768, 512, 256 and 128)")
    e.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    e.add_argument("--output", "-o", metavar="PATH", default=None,
                   help="write the JSON lines to PATH (whole or not at all) instead of standard output")
    e.set_defaults(func=run)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def _read_texts(args) -> list[str]:
    texts = list(args.texts)
    if args.file is not None:
        try:
            raw = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        except OSError as exc:
            raise invalid(f"cannot read --file {args.file}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise invalid(f"--file {args.file} is not UTF-8 text") from None
        texts += [line for line in raw.splitlines() if line.strip()]
    if not texts:
        raise invalid("nothing to embed: give TEXT arguments or --file PATH")
    return texts


def run(args) -> int:
    from gemmakit.engine.embed import embed_texts

    if args.model is None:
        raise invalid("embed needs --model: an embedding model (an EmbeddingGemma sentence-transformers directory); "
                      "the bundled default model generates text")
    if args.batch_size < 1:
        raise invalid(f"--batch-size must be >= 1, got {args.batch_size}")
    texts = _read_texts(args)
    model, tokenizer, _ = load_model(args)
    vectors = embed_texts(model, tokenizer, texts, dim=args.dim, prompt=args.prompt, batch_size=args.batch_size)
    lines = (json.dumps({"index": i, "text": text, "embedding": vector}, ensure_ascii=False) + "\n"
             for i, (text, vector) in enumerate(zip(texts, vectors.tolist())))
    if args.output is None:
        sys.stdout.writelines(lines)
        return 0
    from gemmakit.io import atomic_file

    try:
        with atomic_file(args.output) as tmp, open(tmp, "w", encoding="utf-8") as out:
            out.writelines(lines)
    except OSError as exc:
        raise invalid(f"cannot write --output {args.output}: {exc.strerror or exc}") from None
    return 0
