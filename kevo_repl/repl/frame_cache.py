"""Frames the primary's streams share: each stretch of WAL is read and compressed once.

Replicas that keep up ask for the same sequence numbers at about the same moment: every stream
is woken by the same fsync. Without sharing, each stream joins, checksums and compresses the
same bytes again, and with four replicas the primary spends four times the CPU on one result.
The primary also builds frames ahead, from its tail window, as the WAL becomes durable
(`ReplicationService._produce`): this cache is then its replication backlog in memory, and a
replica a few seconds behind is sent frames from it instead of the primary reading the segments
back and scanning every record (about 1 us an entry in Python).

A frame is keyed by the sequence it starts at and its codec (the zstd level is the primary's
and fixed). A stream whose next sequence has a frame, finished or still being built, sends that
one. Whoever reaches a sequence first decides where its frame ends; a frame built for one
stream ends before the next frame held (`next_start`), so every stream soon meets the shared
boundaries and keeps hitting the cache.

Bounded by the bytes of the frames it holds, oldest dropped first: each frame's compressed
payload plus `ENTRY_OVERHEAD_BYTES` for the objects around it (measured at ~1,300 bytes a
frame; it dominates when light writes make one small frame per fsync). A frame still being
built is not counted: there is at most one per stream, and one built ahead. A stream holding a
frame that was dropped keeps it only until it has sent it.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kevo_repl.repl.frames import Codec, Frame

Key = tuple[int, Codec]
ENTRY_OVERHEAD_BYTES = 1536  # the task, Built, Frame, key, dict and list slots of one frame


@dataclass(frozen=True, slots=True)
class Built:
    frame: Frame
    live: bool  # from the tail window (memory), not read back from the segments


class FrameCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Key, asyncio.Future[Built | None]] = OrderedDict()
        self._starts: list[Key] = []  # the keys, sorted: where the next frame starts
        self._sizes: dict[Key, int] = {}  # what each settled frame counts for in `_bytes`
        self._bytes = 0
        self.hits = 0  # for tests and status: frames sent without building them again
        self.builds = 0

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: Key, build: Callable[[], Awaitable[Built | None]]) -> Built | None:
        """The frame starting at `key`: shared if one is held or being built, else `build()`.

        `build` returning None (nothing readable yet) or raising is not kept: each waiting
        stream gets the same outcome, and the next call builds again.
        """
        shared = self._entries.get(key)
        if shared is None:
            self.builds += 1
            shared = asyncio.ensure_future(build())
            self._entries[key] = shared
            bisect.insort(self._starts, key)
            shared.add_done_callback(lambda done: self._settled(key, done))
        else:
            self.hits += 1
        # shield: one stream going away (its replica disconnected) must not cancel the build
        # the other streams are waiting on.
        return await asyncio.shield(shared)

    def _settled(self, key: Key, done: asyncio.Future[Built | None]) -> None:
        if self._entries.get(key) is not done:
            return
        if done.cancelled() or done.exception() is not None:
            self._drop(key)
            return
        built = done.result()
        if built is None:
            self._drop(key)
            return
        size = len(built.frame.payload) + ENTRY_OVERHEAD_BYTES
        self._sizes[key] = size
        self._bytes += size
        self._evict()

    def _evict(self) -> None:
        """Drop the oldest frames until the held bytes fit (the newest always stays).

        Stops at a frame still being built: it is dropped by a later call, once it is done."""
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            key = next(iter(self._entries))
            if key not in self._sizes:  # still being built, or done but not settled yet
                return
            self._drop(key)

    def next_start(self, seq: int, codec: Codec) -> int | None:
        """The first sequence after `seq` where a frame held for `codec` starts, if any: a
        frame built from `seq` should end before it, so its stream meets the shared frames."""
        starts = self._starts
        for i in range(bisect.bisect_right(starts, (seq, codec)), len(starts)):
            start, other = starts[i]
            if other == codec and start > seq:
                return start
        return None

    def _drop(self, key: Key) -> None:
        del self._entries[key]
        self._bytes -= self._sizes.pop(key, 0)
        i = bisect.bisect_left(self._starts, key)
        if i < len(self._starts) and self._starts[i] == key:
            del self._starts[i]
