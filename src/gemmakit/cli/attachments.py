"""Clips and videos in `gemmakit chat`: `/audio FILE` and `/video FILE` attach one to the next user
message.

Each is marked inside the user turn with the model's own piece (Gemma 4's ``<|audio|>`` and
``<|video|>``, Gemma 3n's ``<audio_soft_token>``), as its chat template writes it; the whole
history, attachments included, is re-rendered each turn.
"""

from __future__ import annotations

from typing import Any, Callable

from gemmakit.errors import InvalidRequestError
from gemmakit.models.multimodal import MediaModel


class Attachments:
    def __init__(self, command: str, marker: str | None, load: Callable[[str], Any], refusal: str) -> None:
        self.command, self.marker, self._load, self._refusal = command, marker, load, refusal
        self._attached: list[Any] = []  # every file in the history, in order, as the model takes it
        self._pending = 0  # attached since the last user message

    def attach(self, path: str) -> str:
        if not path:
            raise InvalidRequestError(f"usage: /{self.command} FILE")
        if self.marker is None:
            raise InvalidRequestError(self._refusal)
        self._attached.append(self._load(path))
        self._pending += 1
        return f"({self.command} attached: {path})"

    def mark(self, text: str) -> str:
        """The user message with a marker for each file attached since the last one."""
        pending, self._pending = self._pending, 0
        return self.marker * pending + text if pending else text

    def all(self) -> list[Any]:
        return list(self._attached)

    def reset(self) -> None:
        self._attached, self._pending = [], 0


def chat_audio(model, tokenizer) -> Attachments:
    """Clips, read once when attached (16 kHz samples)."""
    from gemmakit.audio.io import load_audio

    marker = model.audio_marker(tokenizer) if isinstance(model, MediaModel) else None
    return Attachments("audio", marker, load_audio, "this model has no audio tower; audio needs a Gemma 4 or "
                       "Gemma 3n checkpoint with one")


def chat_videos(model, tokenizer) -> Attachments:
    """Videos, checked when attached and decoded for each turn."""
    from gemmakit.vision.video import probe_video

    def load(path: str) -> str:
        probe_video(path)
        return path

    marker = model.video_marker(tokenizer) if isinstance(model, MediaModel) else None
    return Attachments("video", marker, load, "this model takes no video; video needs a Gemma 4 checkpoint with "
                       "its vision tower")
