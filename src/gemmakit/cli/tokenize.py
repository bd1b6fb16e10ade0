"""``gemmakit tokenize``: print the token ids of a text as JSON."""

from __future__ import annotations

import json

from gemmakit.cli.common import EPILOG, add_model_args, tokenizer_missing


def add_parser(sub) -> None:
    t = sub.add_parser("tokenize", help="print the token ids of TEXT as JSON", epilog=EPILOG,
                       description="Print the ids of TEXT as a JSON list (no <bos> added; special-token "
                                   "strings such as <start_of_turn> are recognised).")
    add_model_args(t, dtype=False)
    t.add_argument("text", metavar="TEXT")
    t.set_defaults(func=run)


def run(args) -> int:
    from gemmakit.checkpoints import open_checkpoint

    tokenizer = open_checkpoint(args.model, args.config).tokenizer
    if tokenizer is None:
        raise tokenizer_missing(args.model)
    print(json.dumps(tokenizer.encode(args.text)))
    return 0
