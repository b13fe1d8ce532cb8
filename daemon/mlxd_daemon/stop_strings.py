"""Stop strings for text generation, applied to the streamed text pieces (not to token ids).

A stop string can span several tokens, so text that could be the start of one is held back until the next
pieces decide: either the stop string completes (generation ends; the text stops just before it) or the held
text is released. Plain Python, shared by every decoder the models worker serves.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopStrings:
    """Feed text pieces in order; ``push`` returns what may be emitted now, ``stopped`` turns True at a match."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""  # the tail that is a prefix of some stop string
        self.stopped = False

    def push(self, piece: str) -> str:
        """The text to emit for ``piece``; after a match, the text before the stop string and nothing later."""
        if self.stopped:
            return ""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[: min(hits)]
        keep = self._partial(text)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held-back text, at the end of generation (it turned out not to be a stop string)."""
        text, self.held = self.held, ""
        return "" if self.stopped else text

    def _partial(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
