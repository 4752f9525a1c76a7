"""Catch-up progress: how fast a position moves and when it will reach a target. Pure."""

from __future__ import annotations

from collections import deque


class ProgressMeter:
    """Entries per second over the last `window_s` seconds of (position, time) samples.

    A position that stopped moving reads as rate 0 once its newest sample is a window old, so a
    stalled replica never shows the speed it had before it stalled.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[int, float]] = deque()

    def observe(self, position: int, now: float) -> None:
        self._samples.append((position, now))
        while len(self._samples) > 2 and now - self._samples[1][1] >= self.window_s:
            self._samples.popleft()

    def rate(self, now: float) -> float:
        if len(self._samples) < 2 or now - self._samples[-1][1] >= self.window_s:
            return 0.0
        (first, t0), (last, t1) = self._samples[0], self._samples[-1]
        return max(0.0, (last - first) / (t1 - t0)) if t1 > t0 else 0.0

    def eta_s(self, remaining: int, now: float) -> float | None:
        """Seconds until `remaining` more entries are done at the current rate; None if stalled."""
        if remaining <= 0:
            return 0.0
        rate = self.rate(now)
        return remaining / rate if rate > 0 else None
