"""The virtual clock of a simulation: simulated seconds, advanced by events, never slept."""

from __future__ import annotations


class VirtualClock:
    def __init__(self, start: float = 0.0):
        self.now = float(start)

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError(f"the clock cannot go back ({seconds} s)")
        self.now += float(seconds)
        return self.now
