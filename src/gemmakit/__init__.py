"""gemmakit: the Gemma model family in readable, fast PyTorch."""

from gemmakit.api import Generation, generate, load, stream
from gemmakit.errors import GemmakitError
from gemmakit.fim import infill

__all__ = ["GemmakitError", "Generation", "generate", "infill", "load", "stream"]
__version__ = "0.1.0"
