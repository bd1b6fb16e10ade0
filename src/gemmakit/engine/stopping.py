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


class TokenOutput:
    """One sequence's output as tokens arrive: the text to emit and whether (and why) it ends.

    Shared by the batching engine and the one-at-a-time paths of the server, so every request
    reports its text and finish reason the same way: an end-of-turn id stops without text, a stop
    string cuts the text, and reaching ``max_tokens`` releases whatever text was held back.
    """

    def __init__(self, stop_ids: frozenset[int], stops: Sequence[str], decoder=None) -> None:
        self.stop_ids = stop_ids
        self.stopper = StopStrings(stops)
        self.decoder = decoder  # a Tokenizer.stream_decoder(), or None for ids-only engines

    def push(self, token: int, generated: int, max_tokens: int, end: bool = False) -> tuple[str, str | None]:
        """``(text, finish_reason or None)`` for the ``generated``-th new token ``token``; ``end``:
        nothing may follow it (a grammar's output is complete), so it stops."""
        text, finish, cut = "", None, False
        if token in self.stop_ids:
            finish = "stop"
        else:
            text, cut = self.stopper.push(self.decoder.push(token) if self.decoder is not None else "")
            finish = "stop" if cut or end else None
        if finish is None and generated >= max_tokens:
            finish = "length"
        if finish is not None and not cut:  # not cut by a stop string: release held text
            text += self.flush()
        return text, finish

    def flush(self) -> str:
        """The text still held back (decoder bytes and a possible stop-string start)."""
        tail = self.decoder.flush() if self.decoder is not None else ""
        text, _ = self.stopper.push(tail)
        return text + self.stopper.flush()
