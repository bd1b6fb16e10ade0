"""The ``gemmakit`` command line: one module per command, each adding its own subparser.

Every user error becomes one line on stderr and exit status 2 (see gemmakit.errors); a model
source is a .gguf file, a checkpoint directory, or (for ``info``) a preset name, and defaults to
the bundled Gemma 3 270M.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from gemmakit.cli import (chat, convert, distill, embed, finetune, generate, info, perplexity, quantize, serve,
                          tokenize)
from gemmakit.cli.common import EPILOG, print_error
from gemmakit.errors import GemmakitError

# the order of `gemmakit --help`
COMMANDS = (generate, chat, embed, tokenize, serve, info, convert, quantize, finetune, distill, perplexity)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemmakit", description="Run Gemma models on your own machine.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"gemmakit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _version() -> str:
    from gemmakit import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = _run(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_without_finalizing(code)
    return code


def _run(args) -> int:
    try:
        return args.func(args)
    except GemmakitError as exc:
        print_error(exc)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _exit_without_finalizing(code: int) -> NoReturn:
    """End a torchrun rank once its command is done, skipping the interpreter's finalisation: gloo's
    worker threads may still hold finished work objects whose tensors need the GIL to be freed, and
    freeing them during finalisation aborted a rank now and then after all its work was written
    (SIGABRT, "terminate called without an active exception": about 1 two-rank run in 10 on a
    loaded 2-core machine; pytorch/pytorch#179291). Outputs are closed files by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
