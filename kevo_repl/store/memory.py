"""MemoryStore: the in-memory Store, for tests and simulations (nothing survives the process)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

from kevo_repl.store.base import (
    StoreClosedError,
    StoreStats,
    check_key,
    check_limit,
    content_digest,
    pending_entries,
)
from kevo_repl.wal.codec import Entry, Op


class MemoryStore:
    """A dict for lookups plus a sorted key list for O(log n + k) scans, behind one lock.

    Holding the lock for every call gives each read a consistent snapshot, as LMDB's read
    transactions do. `durable_seq` only moves on checkpoint, so callers exercise the same
    retention logic as with a disk store.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []  # invariant: sorted, and the same set as self._data
        self._size_bytes = 0  # invariant: sum of len(key) + len(value) over self._data
        self._applied = 0
        self._durable = 0  # invariant: <= self._applied
        self._closed = False

    def applied_seq(self) -> int:
        with self._lock:
            self._check_open()
            return self._applied

    def durable_seq(self) -> int:
        with self._lock:
            self._check_open()
            return self._durable

    def apply(self, entries: Sequence[Entry], applied_seq: int) -> None:
        with self._lock:
            self._check_open()
            for _seq, op, key, value in pending_entries(entries, self._applied, applied_seq):
                if op == Op.DELETE:
                    self._remove(key)
                else:
                    self._set(key, value)
            self._applied = applied_seq

    def get(self, key: bytes) -> bytes | None:
        check_key(key)
        with self._lock:
            self._check_open()
            return self._data.get(key)

    def scan(self, start: bytes, end: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        check_limit(limit)
        with self._lock:
            self._check_open()
            keys = self._keys
            lo = bisect.bisect_left(keys, start)
            hi = len(keys) if end is None else bisect.bisect_left(keys, end, lo)
            return [(k, self._data[k]) for k in keys[lo : min(hi, lo + limit)]]

    def stats(self) -> StoreStats:
        with self._lock:
            self._check_open()
            return StoreStats(key_count=len(self._data), size_bytes=self._size_bytes)

    def checkpoint(self) -> int:
        with self._lock:
            self._check_open()
            self._durable = self._applied
            return self._durable

    def digest(self) -> tuple[int, str]:
        with self._lock:
            self._check_open()
            return self._applied, content_digest((k, self._data[k]) for k in self._keys)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._data = {}
            self._keys = []

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("memory store is closed")

    def _set(self, key: bytes, value: bytes) -> None:
        old = self._data.get(key)
        if old is None:
            bisect.insort(self._keys, key)
            self._size_bytes += len(key)
        else:
            self._size_bytes -= len(old)
        self._data[key] = value
        self._size_bytes += len(value)

    def _remove(self, key: bytes) -> None:
        old = self._data.pop(key, None)
        if old is None:
            return
        del self._keys[bisect.bisect_left(self._keys, key)]
        self._size_bytes -= len(key) + len(old)
