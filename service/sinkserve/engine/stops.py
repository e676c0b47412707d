"""Stop strings over streamed text: emit only text that cannot be the start of a stop."""

from __future__ import annotations


class StopMatcher:
    """Fed text deltas; returns the part that is safe to emit and whether a stop matched.

    Invariant: the held-back text is the longest suffix of what was seen that is a proper
    prefix of some stop string, so a stop split across tokens is still caught and never
    shown to the client.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if s.startswith(buf[-k:]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Text held back when the turn ends for another reason."""
        held, self.held = self.held, ""
        return held
