"""The node's storage engine: the WAL makes a write durable, the store makes it visible.

Write path: validate, append to the WAL (honouring the sync mode or the request's `sync` flag),
then apply to the store. Appends happen on the event loop thread, so the order of `_pending`
is sequence order. Whoever applies takes every pending unit that the WAL made durable (or, with
no durability wait, merely wrote) and applies them in one store transaction, together with the
new applied position. A WAL batch is one unit, so it becomes visible all at once.

Recovery: the store knows the last sequence it applied; the WAL is opened with that as its floor
(no sequence number is ever reused) and every unit after it is applied again. Applying is
idempotent, because the store skips entries at or below its applied position.

Retention: WAL segments behind the store's *durable* (checkpointed) position may go; a hold keeps
everything after it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from kevo_repl.errors import InvalidArgumentError, KevoReplError
from kevo_repl.store.base import Store
from kevo_repl.wal import WAL, Entry, Op, RetentionPolicy, SyncMode, WalOptions
from kevo_repl.wal.codec import BatchForm, Unit

log = logging.getLogger(__name__)

KEVO_KEY_BYTES_MAX = 4096
VALUE_BYTES_MAX = 10 * 1024 * 1024
BATCH_OPS_MAX = 1000
APPLY_ENTRIES_MAX = 20_000  # per store transaction: bounds latency of one apply
INLINE_APPLY_ENTRIES_MAX = 64
STORE_HOLD = "store"

WriteOp = tuple[Op, bytes, bytes]


class RecoveryError(KevoReplError):
    """The WAL no longer holds entries the store has not applied."""


@dataclass(frozen=True, slots=True)
class Limits:
    key_bytes_max: int
    value_bytes_max: int = VALUE_BYTES_MAX
    batch_ops_max: int = BATCH_OPS_MAX

    def check_count(self, count: int) -> None:
        if count > self.batch_ops_max:
            raise InvalidArgumentError(
                f"batch size exceeds maximum allowed ({self.batch_ops_max}): {count} operations"
            )

    def check_key(self, key: bytes) -> None:
        if not 1 <= len(key) <= self.key_bytes_max:
            raise InvalidArgumentError(
                f"invalid key size {len(key)}: keys must be 1..{self.key_bytes_max} bytes"
            )

    def check_value(self, value: bytes) -> None:
        if len(value) > self.value_bytes_max:
            raise InvalidArgumentError(
                f"value too large: {len(value)} bytes, the limit is {self.value_bytes_max}"
            )

    def check_ops(self, ops: Sequence[WriteOp]) -> None:
        self.check_count(len(ops))
        for _, key, value in ops:
            self.check_key(key)
            self.check_value(value)


class Engine:
    """WAL + store. Every public coroutine must run on one event loop (the node's)."""

    def __init__(self, wal: WAL, store: Store, limits: Limits, retention: RetentionPolicy) -> None:
        self.wal = wal
        self.store = store
        self.limits = limits
        self.retention = retention
        self._pending: collections.deque[Unit] = collections.deque()
        self._apply_lock = asyncio.Lock()
        # Held by checkpoints and by `replace_parts`: a checkpoint never runs on a closed WAL.
        self._parts_lock = asyncio.Lock()
        # Run at the start of every checkpoint, before retention (a primary's slots move their
        # WAL hold there). Failures propagate: a checkpoint without them must not delete WAL.
        self.before_checkpoint: list[Callable[[], Awaitable[None]]] = []
        self.recovered_entries = 0
        self.recovery_ms = 0

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls, wal_open: WalOpener, store: Store, retention: RetentionPolicy, key_bytes_max: int
    ) -> Engine:
        """Open the WAL past the store's position and replay what the store has not applied."""
        started = time.perf_counter()
        applied = store.applied_seq()
        wal = wal_open(applied + 1)
        try:
            limits = Limits(key_bytes_max=min(KEVO_KEY_BYTES_MAX, key_bytes_max))
            engine = cls(wal, store, limits, retention)
            engine.recovered_entries = engine._replay(applied)
        except BaseException:
            wal.close()
            raise
        engine.recovery_ms = int((time.perf_counter() - started) * 1000)
        wal.hold(STORE_HOLD, store.durable_seq() + 1)
        return engine

    def _replay(self, applied: int) -> int:
        if applied >= self.wal.last_seq:
            return 0
        if self.wal.first_seq > applied + 1:
            raise RecoveryError(
                f"the store has applied up to {applied} but the WAL starts at "
                f"{self.wal.first_seq}: entries {applied + 1}..{self.wal.first_seq - 1} are lost"
            )
        count = 0
        batch: list[Entry] = []
        last = applied
        for unit in self.wal.units_from(applied + 1):
            batch.extend(unit.entries)
            last = unit.last_seq
            if len(batch) >= APPLY_ENTRIES_MAX:
                self.store.apply(batch, last)
                count += len(batch)
                batch = []
        if batch:
            self.store.apply(batch, last)
            count += len(batch)
        log.info("replayed %d WAL entries up to sequence %d", count, last)
        return count

    async def checkpoint(self) -> int:
        """Make the store durable, move the WAL hold and apply retention; returns durable seq."""
        async with self._parts_lock:
            return await self._checkpoint()

    async def _checkpoint(self) -> int:
        for hook in self.before_checkpoint:
            await hook()
        if self.wal.options.sync_mode is SyncMode.IMMEDIATE:
            # Everything applied is already durable in the WAL, so writes may go on while the
            # store fsyncs (tens of ms on a large store): holding the lock here stalled them.
            await asyncio.to_thread(self.wal.sync)
            durable = await asyncio.to_thread(self.store.checkpoint)
        else:
            async with self._apply_lock:  # the store must never be durable ahead of the WAL
                await asyncio.to_thread(self.wal.sync)
                durable = await asyncio.to_thread(self.store.checkpoint)
        self.wal.hold(STORE_HOLD, durable + 1)
        await asyncio.to_thread(self.wal.apply_retention, self.retention)
        return durable

    async def replay_wal(self) -> int:
        """Apply what the WAL holds beyond the store (a replica about to be promoted)."""
        async with self._apply_lock:
            return await asyncio.to_thread(self._replay, self.store.applied_seq())

    async def replace_parts(self, reopen: Callable[[], tuple[WAL, Store]]) -> None:
        """Close the WAL and the store, then run `reopen` (on a worker thread) and use the WAL
        and store it opens: a replica switching to a snapshot. Writes must not be running (a
        replica takes none). If `reopen` fails the engine is left closed: the error is fatal.
        """
        async with self._parts_lock, self._apply_lock:
            self._pending.clear()
            await asyncio.to_thread(self._close_parts)
            self.wal, self.store = await asyncio.to_thread(reopen)

    def _close_parts(self) -> None:
        try:
            self.wal.close()
        finally:
            self.store.close()

    async def close(self) -> None:
        try:
            await self.checkpoint()
        finally:
            self._close_parts()

    # ------------------------------------------------------------------ writes

    async def put(self, key: bytes, value: bytes, sync: bool = False) -> int:
        self.limits.check_key(key)
        self.limits.check_value(value)
        return await self._write_one(Op.PUT, key, value, sync)

    async def delete(self, key: bytes, sync: bool = False) -> int:
        self.limits.check_key(key)
        return await self._write_one(Op.DELETE, key, b"", sync)

    async def write_batch(self, ops: Sequence[WriteOp], sync: bool = False) -> int:
        """Append `ops` as one atomic WAL batch and apply it; returns the last sequence number."""
        self.limits.check_ops(ops)
        if not ops:
            return self.wal.last_seq
        return await self.write_checked_batch(ops, sync)

    async def write_checked_batch(self, ops: Sequence[WriteOp], sync: bool) -> int:
        """For callers that validated `ops` themselves (transactions have their own limits)."""
        start = self.wal.append_batch_nowait(ops)
        unit = Unit(
            tuple(Entry(start + i, op, k, v) for i, (op, k, v) in enumerate(ops)),
            -1,
            0,
            BatchForm.SEED_HEADER,
            start,
            start + len(ops) - 1,
        )
        self._pending.append(unit)
        return await self._settle(unit.last_seq, sync)

    async def _write_one(self, op: Op, key: bytes, value: bytes, sync: bool) -> int:
        seq = self.wal.append_nowait(op, key, value)
        self._pending.append(Unit((Entry(seq, op, key, value),), -1, 0, BatchForm.SINGLE, seq, seq))
        return await self._settle(seq, sync)

    async def _settle(self, seq: int, sync: bool) -> int:
        """Wait for what the sync mode (or `sync`) asks, then make `seq` visible."""
        if sync or self.wal.options.sync_mode is SyncMode.IMMEDIATE:
            await self.wal.wait_durable(seq)
        await self._apply_through(seq)
        return seq

    async def _apply_through(self, seq: int) -> None:
        if self.store.applied_seq() >= seq:
            return
        async with self._apply_lock:
            while self.store.applied_seq() < seq and self._pending:
                units, entries, last = self._take_pending(self._applicable_seq())
                if not entries:
                    return  # nothing the WAL holds yet; whoever waits for it applies it
                try:
                    if len(entries) <= INLINE_APPLY_ENTRIES_MAX:
                        # A small transaction takes microseconds: less than a hop to a thread.
                        self.store.apply(entries, last)
                    else:
                        await asyncio.to_thread(self.store.apply, entries, last)
                except BaseException:
                    # Put the same units back in front: a failed apply is retried, never
                    # skipped, and a batch stays one unit (visible all at once).
                    self._pending.extendleft(reversed(units))
                    raise

    def _applicable_seq(self) -> int:
        """The last sequence the store may apply: never ahead of the WAL.

        In immediate mode only what is durable (a power loss cannot leave the store holding a
        write the WAL lost); otherwise what the OS holds (a process crash cannot).
        """
        if self.wal.options.sync_mode is SyncMode.IMMEDIATE:
            return self.wal.durable_seq
        return self.wal.flush()

    def _take_pending(self, limit_seq: int) -> tuple[list[Unit], list[Entry], int]:
        units: list[Unit] = []
        entries: list[Entry] = []
        last = 0
        while (
            self._pending
            and len(entries) < APPLY_ENTRIES_MAX
            and self._pending[0].last_seq <= limit_seq
        ):
            unit = self._pending.popleft()
            units.append(unit)
            entries.extend(unit.entries)
            last = unit.last_seq
        return units, entries, last

    # ------------------------------------------------------------------ reads

    def get(self, key: bytes) -> bytes | None:
        self.limits.check_key(key)
        return self.store.get(key)


@dataclass(frozen=True, slots=True)
class WalOpener:
    """Opens the node's WAL given the first sequence number it may use."""

    directory: str
    options: WalOptions

    def __call__(self, next_seq_floor: int) -> WAL:
        return WAL.open(self.directory, self.options, next_seq_floor=next_seq_floor)
