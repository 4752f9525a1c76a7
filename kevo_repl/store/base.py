"""The store seam: the applied key/value state of a node plus the last WAL sequence it reflects.

The WAL makes writes durable; a store only has to hold what has been applied and, in the same
transaction, the sequence number of the last applied entry, so a restart replays the WAL after it.
Every implementation runs the same contract suite (tests/test_store_contract.py).

The helpers here are the semantics shared by every implementation (which entries a batch applies,
which keys are legal, how a digest is computed), kept pure so the implementations cannot drift.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kevo_repl.errors import InvalidArgumentError, KevoReplError
from kevo_repl.wal.codec import MAX_SEQ, Entry, Op

# LMDB's compiled-in key limit (mdb_env_get_maxkeysize with the default MDB_MAXKEYSIZE). Every
# store enforces the same limit so a node behaves identically whichever store it runs on; the node
# validates keys against it before they reach the WAL.
MAX_KEY_BYTES = 511

_VALID_OPS = frozenset((Op.PUT, Op.DELETE, Op.MERGE))
_U32 = struct.Struct("<I")


class StoreError(KevoReplError):
    """The store failed (cannot open, disk full, corrupt metadata)."""


class StoreLockedError(StoreError):
    """Another process (or another open store in this one) holds the store directory."""


class StoreClosedError(StoreError):
    """The store was used after close()."""


@dataclass(frozen=True, slots=True)
class StoreStats:
    key_count: int
    size_bytes: int  # bytes used on disk (LMDB: pages in use) or in memory (keys plus values)


class StoreExport(Protocol):
    """A consistent image of a store at one applied sequence, begun by `Store.begin_export`.

    Holds a read snapshot until closed (LMDB: one read transaction; pages it sees are not
    reused meanwhile), so writes go on while the image is written.
    """

    applied_seq: int  # the image holds every entry up to here and none after
    format: str  # what opens the image: "lmdb" (a data.mdb) or "memory"
    size_estimate: int  # roughly how many bytes `write_to` writes

    def write_to(self, fd: int) -> None:
        """Write the whole image to `fd` (blocking; once). StoreError if that fails."""
        ...

    def close(self) -> None:
        """Release the snapshot; idempotent."""
        ...


class Store(Protocol):
    """Applied state of one node. Implementations are safe to call from several threads."""

    def applied_seq(self) -> int:
        """The last WAL sequence applied (0 for a new store): a restart replays after it."""
        ...

    def durable_seq(self) -> int:
        """The last applied sequence known to be on disk; the WAL must keep everything after it."""
        ...

    def apply(self, entries: Sequence[Entry], applied_seq: int) -> None:
        """Apply `entries` in order and set the applied sequence, as ONE atomic transaction.

        Put and Merge set the key, Delete removes it (a missing key is fine). Entries with
        seq <= the current applied sequence are skipped, so replaying is idempotent. Raises
        InvalidArgumentError, before changing anything, when applied_seq is below the current one
        or above 2**64-1, an entry's seq exceeds applied_seq, or a key is empty or longer than
        MAX_KEY_BYTES.
        """
        ...

    def get(self, key: bytes) -> bytes | None:
        """The value of `key` (b"" is a value), None when absent."""
        ...

    def scan(self, start: bytes, end: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to `limit` (> 0) items with start <= key < end (None: no end), ascending, from one
        consistent snapshot."""
        ...

    def stats(self) -> StoreStats:
        """Key count and size without scanning (the SDK asks on every connect)."""
        ...

    def checkpoint(self) -> int:
        """Make everything applied durable and return the durable sequence."""
        ...

    def digest(self) -> tuple[int, str]:
        """(applied_seq, content_digest) from one consistent snapshot."""
        ...

    def begin_export(self) -> StoreExport:
        """A consistent image of the store as it is now (replica bootstrap)."""
        ...

    def close(self) -> None:
        """Release the store; idempotent. Any later call raises StoreClosedError.

        Waits for open exports to be closed."""
        ...


def check_key(key: bytes) -> None:
    if not 0 < len(key) <= MAX_KEY_BYTES:
        raise InvalidArgumentError(f"key length {len(key)} is outside 1..{MAX_KEY_BYTES} bytes")


def check_limit(limit: int) -> None:
    if limit <= 0:
        raise InvalidArgumentError(f"scan limit must be positive, got {limit}")


def pending_entries(entries: Sequence[Entry], current_seq: int, applied_seq: int) -> list[Entry]:
    """Validate a batch completely and return the entries it still has to apply, in order.

    Validation covers every entry, skipped ones included, so a bad batch is rejected whole and
    never half-applied.
    """
    if not current_seq <= applied_seq <= MAX_SEQ:
        raise InvalidArgumentError(
            f"applied_seq {applied_seq} must be in {current_seq}..{MAX_SEQ} "
            f"(the store has applied up to {current_seq})"
        )
    todo = []
    for entry in entries:
        seq, op, key, _ = entry
        if not 0 < len(key) <= MAX_KEY_BYTES:
            check_key(key)
        if op not in _VALID_OPS:
            raise InvalidArgumentError(f"entry {seq} has invalid operation {op}")
        if seq > applied_seq:
            raise InvalidArgumentError(f"entry {seq} is beyond applied_seq {applied_seq}")
        if seq > current_seq:
            todo.append(entry)
    return todo


def content_digest(items: Iterable[tuple[bytes, bytes]]) -> str:
    """sha256 hex over u32-little-endian-length-prefixed key and value of each item, in order."""
    h = hashlib.sha256()
    pack = _U32.pack
    for key, value in items:
        h.update(b"".join((pack(len(key)), key, pack(len(value)), value)))
    return h.hexdigest()
