"""MemoryStore: the in-memory Store, for tests and simulations (nothing survives the process)."""

from __future__ import annotations

import bisect
import os
import struct
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

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


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

    def begin_export(self) -> MemoryExport:
        with self._lock:
            self._check_open()
            items = [(k, self._data[k]) for k in self._keys]
            return MemoryExport(items, self._applied, self._size_bytes)

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


class MemoryExport:
    """A copy of the items taken under the lock; the image is u64 applied_seq, then each key
    and value with a u32 length prefix (read back by `load_image`)."""

    format = "memory"

    def __init__(self, items: list[tuple[bytes, bytes]], applied: int, size: int) -> None:
        self._items = items
        self.applied_seq = applied
        self.size_estimate = size

    def write_to(self, fd: int) -> None:
        parts = [_U64.pack(self.applied_seq)]
        for key, value in self._items:
            parts += (_U32.pack(len(key)), key, _U32.pack(len(value)), value)
        view = memoryview(b"".join(parts))
        while view:
            view = view[os.write(fd, view) :]

    def close(self) -> None:
        self._items = []


def load_image(image: bytes) -> MemoryStore:
    """The store a MemoryExport image holds; ValueError if it is not one."""
    if len(image) < _U64.size:
        raise ValueError("a memory store image starts with an 8-byte applied sequence")
    applied = _U64.unpack_from(image)[0]
    pos = _U64.size
    store = MemoryStore()
    while pos < len(image):
        key, pos = _field(image, pos)
        value, pos = _field(image, pos)
        check_key(key)
        store._set(key, value)
    store._applied = store._durable = applied
    return store


def _field(image: bytes, pos: int) -> tuple[bytes, int]:
    if pos + _U32.size > len(image):
        raise ValueError(f"truncated length at offset {pos}")
    (size,) = _U32.unpack_from(image, pos)
    start = pos + _U32.size
    if start + size > len(image):
        raise ValueError(f"field at offset {pos} runs past the end of the image")
    return image[start : start + size], start + size
