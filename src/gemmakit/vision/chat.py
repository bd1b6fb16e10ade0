"""Images in `gemmakit chat`: `/image PATH` attaches an image to the next user message.

Gemma 3 marks the image inside the user turn with ``<start_of_image>`` (as its chat template does);
the whole history, images included, is re-rendered each turn. PaliGemma is not a chat model but
answers one prompt about its image(s); in chat it sees every image attached so far.
"""

from __future__ import annotations

from PIL import Image

from gemmakit.errors import InvalidRequestError
from gemmakit.models.gemma4_vision import Gemma4VisionLanguageModel
from gemmakit.models.multimodal import VisionLanguageModel
from gemmakit.vision.preprocess import load_image


class ChatImages:
    def __init__(self, model) -> None:
        self.vision = model.config if isinstance(model, (VisionLanguageModel, Gemma4VisionLanguageModel)) else None
        self._attached: list[Image.Image] = []  # all images in the history, in order
        self._pending = 0  # attached since the last user message

    def attach(self, path: str) -> str:
        if not path:
            raise InvalidRequestError("usage: /image PATH")
        if self.vision is None:
            raise InvalidRequestError("this is a text-only model; images need PaliGemma or Gemma 3 4B/12B/27B "
                                      "(a GGUF with its mmproj file: --mmproj FILE)")
        self._attached.append(load_image(path))
        self._pending += 1
        return f"(image attached: {path})"

    def mark(self, text: str) -> str:
        """The user message with markers for the images attached since the last one."""
        pending, self._pending = self._pending, 0
        if self.vision is None or self.vision.layout != "gemma3" or not pending:
            return text
        return "<start_of_image>" * pending + text

    def all(self) -> list[Image.Image]:
        return list(self._attached)

    def reset(self) -> None:
        self._attached, self._pending = [], 0
