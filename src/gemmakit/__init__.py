"""gemmakit: the Gemma model family in readable, fast PyTorch."""

from gemmakit.errors import GemmakitError

__all__ = ["GemmakitError"]
__version__ = "0.1.0"
