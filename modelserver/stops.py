"""Stop strings over streamed text. Pure.

Text arrives in pieces; a stop string may straddle pieces. ``StopFilter`` holds back the tail
that could still be the start of a stop string, and cuts the output right before the first stop
string found (which is never emitted).
"""

from __future__ import annotations

__all__ = ["StopFilter"]


class StopFilter:
    """Feeds text pieces in, gets the text that is safe to emit out."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Returns the text that can be emitted now; sets ``stopped`` on a stop string."""
        if self.stopped:
            return ""
        text = self._held + piece
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return text[:cut]
        keep = self._partial_len(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held-back text, at the end of generation (no stop string came)."""
        text, self._held = self._held, ""
        return "" if self.stopped else text

    def _partial_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
