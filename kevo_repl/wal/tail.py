"""The tail window: the newest WAL units in memory, as the bytes that were written.

A primary streams a caught-up replica from here: no segment read, no decoding, no worker thread
(the hop to a thread and back cost milliseconds of replication lag under load). A replica that
has fallen out of the window is served from the segments on disk instead, so the window bounds
memory, never correctness.

The units held are consecutive: each starts right after the one before it, from the oldest one
kept to the newest appended. Memory is bounded by `max_bytes`, which counts each unit's bytes
plus `UNIT_OVERHEAD_BYTES` for the Python objects that hold it; a unit that alone exceeds the
bound empties the window (the next unit starts it again).

Not thread-safe: the WAL calls it under its own lock.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

UNIT_OVERHEAD_BYTES = 128  # a tuple, its ints and a bytes header, roughly, per unit
_COMPACT_AFTER = 4096  # evicted slots kept before the lists are shifted down
# What an evicted slot holds until compaction: its bytes are let go at eviction, so the memory
# bound holds however many slots wait to be compacted (only `take`, from `_head` on, reads them).
_EVICTED: tuple[int, int, bytes] = (0, 0, b"")


class TailSlice(NamedTuple):
    """Whole consecutive units: sequences `first_seq..last_seq`, `raw` their bytes end to end."""

    first_seq: int
    last_seq: int
    raw: bytes
    entries: int


class TailWindow:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._firsts: list[int] = []
        self._units: list[tuple[int, int, bytes]] = []  # (first_seq, last_seq, data)
        self._head = 0  # index of the oldest unit still held
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._units) - self._head

    @property
    def bytes_held(self) -> int:
        return self._bytes

    @property
    def first_seq(self) -> int | None:
        """The oldest sequence held, None when empty."""
        return self._firsts[self._head] if len(self) else None

    def add(self, first_seq: int, last_seq: int, data: bytes) -> None:
        self._firsts.append(first_seq)
        self._units.append((first_seq, last_seq, data))
        self._bytes += len(data) + UNIT_OVERHEAD_BYTES
        units = self._units
        while self._bytes > self.max_bytes and self._head < len(units):
            self._bytes -= len(units[self._head][2]) + UNIT_OVERHEAD_BYTES
            units[self._head] = _EVICTED  # drop the bytes now, not at compaction
            self._head += 1
        if self._head >= _COMPACT_AFTER and self._head * 2 >= len(self._units):
            del self._firsts[: self._head]
            del self._units[: self._head]
            self._head = 0

    def clear(self) -> None:
        self._firsts.clear()
        self._units.clear()
        self._head = 0
        self._bytes = 0

    def take(self, seq: int, max_seq: int, max_bytes: int, max_entries: int) -> TailSlice | None:
        """Units from the one holding `seq`, none starting after `max_seq`, up to the limits.

        The first unit is always taken, however large. None when `seq` is not in the window
        (older than its oldest unit, or newer than its newest) or `max_seq < seq`.
        """
        head = self._head
        if head >= len(self._units) or seq < self._firsts[head] or max_seq < seq:
            return None
        i = bisect.bisect_right(self._firsts, seq, head) - 1
        units = self._units
        first, last, data = units[i]
        if last < seq:
            return None  # beyond the newest unit
        parts = [data]
        size, entries = len(data), last - first + 1
        for j in range(i + 1, len(units)):
            if size >= max_bytes or entries >= max_entries:
                break
            nxt_first, nxt_last, data = units[j]
            if nxt_first > max_seq:
                break
            parts.append(data)
            size += len(data)
            entries += nxt_last - nxt_first + 1
            last = nxt_last
        return TailSlice(first, last, b"".join(parts), entries)
