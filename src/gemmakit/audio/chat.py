"""Audio in `gemmakit chat`: `/audio FILE` attaches a clip to the next user message.

A clip is marked inside the user turn with the model's audio token's piece (Gemma 4's ``<|audio|>``,
Gemma 3n's ``<audio_soft_token>``), as its chat template does; the whole history, clips included,
is re-rendered each turn.
"""

from __future__ import annotations

import numpy as np

from gemmakit.errors import InvalidRequestError
from gemmakit.models.multimodal import MediaModel


class ChatAudio:
    def __init__(self, model, tokenizer) -> None:
        self.marker = model.audio_marker(tokenizer) if isinstance(model, MediaModel) else None
        self.enabled = self.marker is not None
        self._attached: list[np.ndarray] = []  # every clip in the history, in order (16 kHz samples)
        self._pending = 0  # attached since the last user message

    def attach(self, path: str) -> str:
        from gemmakit.audio.io import load_audio

        if not path:
            raise InvalidRequestError("usage: /audio FILE")
        if not self.enabled:
            raise InvalidRequestError("this model has no audio tower; audio needs a Gemma 4 or Gemma 3n checkpoint "
                                      "with one")
        self._attached.append(load_audio(path))
        self._pending += 1
        return f"(audio attached: {path})"

    def mark(self, text: str) -> str:
        """The user message with a marker for each clip attached since the last one."""
        pending, self._pending = self._pending, 0
        return self.marker * pending + text if pending else text

    def all(self) -> list[np.ndarray]:
        return list(self._attached)

    def reset(self) -> None:
        self._attached, self._pending = [], 0
