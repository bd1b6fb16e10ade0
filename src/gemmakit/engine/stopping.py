"""Stop strings, found even when they straddle token boundaries.

A stop string such as ``"\\n\\n"`` may arrive as ``"...\\n"`` in one token and ``"\\nThe"`` in the
next. :class:`StopStrings` therefore holds back the end of the text that could still become a stop
string, and releases it once it cannot; the text a caller sees never contains a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Add ``piece``; return ``(text safe to emit, stopped)``. After a stop, nothing more counts."""
        text = self._held + piece
        if not self.stops:
            self._held = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return text[:min(hits)], True
        keep = max((self._overlap(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held-back tail, released when the generation ends for another reason."""
        tail, self._held = self._held, ""
        return tail

    @staticmethod
    def _overlap(text: str, stop: str) -> int:
        """Length of the longest end of ``text`` that is a proper beginning of ``stop``."""
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return k
        return 0
