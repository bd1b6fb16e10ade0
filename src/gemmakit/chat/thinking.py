"""Gemma 4's thought channel: a reply may open with ``<|channel>thought`` + newline, the model's
reasoning, then ``<channel|>``, and only then the answer. :class:`ThoughtSplitter` separates the
two as text streams in, so a chat can show the thoughts apart (dimmed, or not at all) and keep
only the answer; the official template strips earlier turns' thoughts the same way."""

from __future__ import annotations

OPEN, CLOSE = "<|channel>", "<channel|>"
THOUGHT_LABEL = "thought\n"


class ThoughtSplitter:
    """Feed reply text piece by piece; get back ``(kind, text)`` pairs, ``kind`` "thought" or
    "answer". Markers split across pieces are held back until they are complete."""

    def __init__(self) -> None:
        self._pending = ""
        self._in_thought = False
        self.thought, self.answer = "", ""

    def push(self, text: str) -> list[tuple[str, str]]:
        self._pending += text
        out: list[tuple[str, str]] = []
        while self._pending:
            marker = CLOSE if self._in_thought else OPEN
            at = self._pending.find(marker)
            if at < 0:
                keep = partial_suffix(self._pending, marker)
                self._emit(out, self._pending[:len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep:]
                break
            self._emit(out, self._pending[:at])
            self._pending = self._pending[at + len(marker):]
            self._in_thought = not self._in_thought
            if self._in_thought:  # the channel's name follows its opening marker
                if len(self._pending) < len(THOUGHT_LABEL) and THOUGHT_LABEL.startswith(self._pending):
                    self._pending = OPEN + self._pending  # wait for the rest of the label
                    self._in_thought = False
                    break
                self._pending = self._pending.removeprefix(THOUGHT_LABEL)
        return out

    def flush(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._emit(out, self._pending)
        self._pending = ""
        return out

    def _emit(self, out: list[tuple[str, str]], text: str) -> None:
        if not text:
            return
        kind = "thought" if self._in_thought else "answer"
        if kind == "thought":
            self.thought += text
        else:
            self.answer += text
        out.append((kind, text))


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a beginning of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def strip_thoughts(text: str) -> str:
    """``text`` with every thought channel removed, trimmed (what the official template does to
    earlier model turns)."""
    parts = []
    for piece in text.split(CLOSE):
        parts.append(piece.split(OPEN)[0] if OPEN in piece else piece)
    return "".join(parts).strip()
