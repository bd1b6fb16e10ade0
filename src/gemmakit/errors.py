"""One exception hierarchy for everything a user can get wrong.

Every error raised on purpose by gemmakit derives from :class:`GemmakitError` and carries a
message written for the person at the keyboard: what went wrong and, where possible, what to do.
The CLI prints ``str(error)`` on one line and exits with status 2; the HTTP server answers 400.
"""

from __future__ import annotations


class GemmakitError(Exception):
    """Base class of every error gemmakit raises deliberately."""


class ModelNotFoundError(GemmakitError):
    """The model source (file, directory or preset name) does not exist."""


class CheckpointError(GemmakitError):
    """A checkpoint exists but cannot be read: truncated, corrupt, or missing/mis-shaped tensors."""


class UnsupportedModelError(GemmakitError):
    """The checkpoint is readable but describes an architecture or format gemmakit does not run."""


class TokenizerError(GemmakitError):
    """No tokenizer could be built, or the tokenizer was asked something it cannot do."""


class InvalidRequestError(GemmakitError):
    """A request is malformed: empty prompt, prompt longer than the context, bad sampling values."""


class MatformerPlanError(InvalidRequestError):
    """A MatFormer plan (``--matformer``) is malformed or does not fit the checkpoint it slices."""
