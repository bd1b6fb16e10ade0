"""gemmakit: the Gemma model family in readable, fast PyTorch.

The names below load their modules (and torch) on first use, not on ``import gemmakit``: every
``gemmakit.*`` import runs this file first, and ``gemmakit --help`` (gemmakit.cli) needs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from gemmakit.errors import GemmakitError

if TYPE_CHECKING:
    from gemmakit.api import Generation, embed, generate, load, stream
    from gemmakit.fim import infill

__all__ = ["GemmakitError", "Generation", "embed", "generate", "infill", "load", "stream"]
__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {"Generation": "gemmakit.api", "embed": "gemmakit.api", "generate": "gemmakit.api", "load": "gemmakit.api",
         "stream": "gemmakit.api", "infill": "gemmakit.fim"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # found directly from now on
        return value
    raise AttributeError(f"module 'gemmakit' has no attribute {name!r}")
