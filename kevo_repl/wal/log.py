"""The write-ahead log: segments, sync modes with group commit, recovery, readers and retention.

Invariants (each guarded by `_lock` unless said otherwise):

* Sequence numbers strictly increase across units, segments and restarts; a batch of n entries
  takes n consecutive numbers.
* A unit is appended whole and never spans two segments; a segment is cut before a unit that would
  overflow it (fsync the old file, create the new one as a temp file, rename, fsync the directory).
* Bytes reach the OS (`_written`) in order; readers never read past them. `durable_seq` only moves
  after an fsync that covered every byte of that sequence number.
* Only one fsync runs at a time (`_sync_lock`), which is what makes concurrent appenders share one:
  whoever gets the lock syncs everything appended so far, and the others find their work done.
* Retention deletes only a prefix of closed segments, never the active one, never a segment holding
  a sequence number at or above a hold, and never the newest closed segment while the active one
  holds no durable unit (the log would forget its last sequence number).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from kevo_repl import fsutil
from kevo_repl.errors import (
    CorruptionError,
    InvalidArgumentError,
    SequenceCompactedError,
    WalClosedError,
    WalError,
    WalLockedError,
)
from kevo_repl.wal.codec import (
    MAX_SEQ,
    MAX_UNIT_BYTES,
    BatchForm,
    Entry,
    Op,
    Unit,
    encode_batch,
    encode_entry,
)
from kevo_repl.wal.observer import ObserverHub, WalObserver
from kevo_repl.wal.segment import (
    READ_CHUNK_BYTES,
    Outcome,
    ReadEnd,
    SegmentReader,
    gap_reason,
    scan_directory,
    segment_name,
)
from kevo_repl.wal.tail import TailSlice, TailWindow

log = logging.getLogger(__name__)

SYNC_INTERVAL_MS_MAX = 3_600_000  # an hour: batch mode is about bounding loss, not avoiding it

_VALID_OPS = frozenset((Op.PUT, Op.DELETE, Op.MERGE))


class SyncMode(enum.Enum):
    NONE = "none"
    BATCH = "batch"
    IMMEDIATE = "immediate"


@dataclass(frozen=True, slots=True)
class WalOptions:
    sync_mode: SyncMode = SyncMode.IMMEDIATE
    sync_bytes: int = 1024 * 1024  # batch mode: fsync once this much was appended since the last
    sync_interval_ms: int = 100  # batch mode: and at least this often while anything is unsynced
    segment_bytes_max: int = 64 * 1024 * 1024
    buffer_bytes: int = 64 * 1024  # bytes kept in user space before a write(2)
    index_every_bytes: int = 64 * 1024  # sparse seq -> offset index granularity
    observer_queue_max: int = 65536
    tail_window_bytes: int = 0  # keep the newest units in memory for replication (0: off)


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    max_age_s: float | None = None  # delete closed segments last written longer ago than this
    max_total_bytes: int | None = None  # delete the oldest while the log is larger than this
    min_seq_keep: int | None = None  # delete segments whose every sequence is below this


@dataclass(frozen=True, slots=True)
class TornTail:
    path: str
    offset: int
    bytes_cut: int
    kept_at: str
    reason: str


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    segments: int
    last_seq: int
    torn: TornTail | None


@dataclass(slots=True)
class _Segment:
    name: str
    path: str
    first_seq: int  # first sequence it holds, or would hold if empty
    size: int  # logical size, including bytes still in the user-space buffer when active
    index: list[tuple[int, int]] = field(default_factory=list)  # (unit first seq, offset)
    index_complete: bool = False  # index covers the whole (closed) segment
    last_index_offset: int = -(1 << 62)


@dataclass(slots=True)
class _AsyncWaiter:
    seq: int
    future: asyncio.Future[int]
    loop: asyncio.AbstractEventLoop


class WAL:
    """A Kevo-compatible write-ahead log in one directory. Use `WAL.open`."""

    def __init__(self, directory: str, options: WalOptions, lock_fd: int) -> None:
        self.directory = directory
        self.options = options
        self._lock_fd = lock_fd
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._fd = -1  # active segment's write descriptor
        self._retired_fds: list[int] = []  # old active fds a sync leader may still be using
        self._leader_fd = -1  # the fd the running sync leader is fsyncing, if any
        self._sync_listeners: tuple[Callable[[int], None], ...] = ()
        self._buf = bytearray()
        self._written = 0  # bytes of the active segment handed to write(2)
        self._next_seq = 1
        self._last_seq = 0
        self._durable_seq = 0
        self._active_durable = False  # the active segment holds at least one durable unit
        self._unsynced_bytes = 0
        self._holds: dict[str, int] = {}
        self._closed = False
        self._failed: BaseException | None = None
        self._hub = ObserverHub(options.observer_queue_max)
        self._tail = TailWindow(options.tail_window_bytes) if options.tail_window_bytes else None
        self._waiters: list[_AsyncWaiter] = []
        self._waiters_lock = threading.Lock()
        self._wake = threading.Event()
        self._syncer: threading.Thread | None = None
        self.recovery = RecoveryReport(0, 0, None)
        # Read on every append: plain attributes are cheaper than walking `options`.
        self._immediate = options.sync_mode is SyncMode.IMMEDIATE
        self._batch_mode = options.sync_mode is SyncMode.BATCH
        self._segment_max = options.segment_bytes_max
        self._index_every = options.index_every_bytes
        self._buffer_max = options.buffer_bytes

    # ------------------------------------------------------------------ opening and recovery

    @classmethod
    def open(
        cls, directory: str, options: WalOptions | None = None, *, next_seq_floor: int = 1
    ) -> WAL:
        """Open (creating if needed) and recover the log in `directory`.

        `next_seq_floor` lets the owner of already-applied data (a store) forbid reusing sequence
        numbers the log itself may have lost, e.g. after retention removed every segment.
        """
        options = options or WalOptions()
        _validate_options(options)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        lock_fd = lock_directory(directory)
        wal = cls(directory, options, lock_fd)
        try:
            wal._recover(next_seq_floor)
        except BaseException:
            wal._release_lock()
            raise
        if options.sync_mode is SyncMode.BATCH:
            wal._start_syncer()
        return wal

    def _recover(self, next_seq_floor: int) -> None:
        names, strays = scan_directory(self.directory)  # one listing for both
        for stray in strays:
            os.unlink(os.path.join(self.directory, stray))
        self._segments = [self._closed_segment(n) for n in names[:-1]]
        torn: TornTail | None = None
        last_seq = 0
        if names:
            last, last_seq, torn = self._recover_last(names[-1])
            self._segments.append(last)
            if last_seq == 0 and len(self._segments) > 1:
                # A crash right after a segment cut leaves an empty last segment: the sequence
                # stands where the previous segment ends.
                last_seq = self._scan_last_seq(self._segments[-2])
        if last_seq == 0:
            # An empty log below a floor continues what its owner already holds (the snapshot
            # a replica switched to): it stands at floor - 1, as if it had written and synced
            # those, so last_seq and durable_seq give the node's true position.
            last_seq = next_seq_floor - 1
        self._last_seq = self._durable_seq = last_seq
        self._next_seq = max(next_seq_floor, last_seq + 1)
        if self._segments:
            active = self._segments[-1]
            self._active_durable = active.first_seq >= 0
            if not self._active_durable:
                active.first_seq = self._next_seq
        self._resolve_first_seqs()
        if self._segments:
            active = self._segments[-1]
            self._fd = os.open(active.path, os.O_WRONLY | os.O_APPEND)
            self._written = active.size
        self.recovery = RecoveryReport(len(self._segments), last_seq, torn)
        if torn is not None:
            log.warning(
                "recovered WAL: cut a torn tail of %d bytes at %s offset %d (%s); kept at %s",
                torn.bytes_cut,
                torn.path,
                torn.offset,
                torn.reason,
                torn.kept_at,
            )

    def _closed_segment(self, name: str) -> _Segment:
        """A non-final segment: only its first unit is read at open; it was fsynced when cut."""
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            reader = SegmentReader(fd, 0, min(size, 64 * 1024))
            first = next(iter(reader), None)
        finally:
            os.close(fd)
        if (
            first is None
            and size > 0
            and (reader.end is None or reader.end.outcome is not Outcome.CLEAN)
        ):
            # The first unit may be larger than the probe; read the whole file for a verdict.
            first = self._first_unit_full(path, size)
        seg = _Segment(name, path, first.first_seq if first else -1, size)
        if first is not None:
            seg.index.append((first.first_seq, 0))
            seg.last_index_offset = 0
        return seg

    def _first_unit_full(self, path: str, size: int) -> Unit | None:
        fd = os.open(path, os.O_RDONLY)
        try:
            reader = SegmentReader(fd, 0, size)
            first = next(iter(reader), None)
        finally:
            os.close(fd)
        if first is None and reader.end is not None and reader.end.outcome is not Outcome.CLEAN:
            raise CorruptionError(path, reader.end.bad_offset, reader.end.reason)
        return first

    def _recover_last(self, name: str) -> tuple[_Segment, int, TornTail | None]:
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDWR)
        try:
            seg = _Segment(name, path, -1, 0)
            reader = SegmentReader(fd)
            last_seq = 0
            for unit in reader:
                self._index_unit(seg, unit.first_seq, unit.offset)
                last_seq = unit.last_seq
                if seg.first_seq < 0:
                    seg.first_seq = unit.first_seq
            end = reader.end
            assert end is not None
            torn = None
            if end.outcome is Outcome.CORRUPT:
                raise CorruptionError(path, end.bad_offset, end.reason)
            if end.outcome is Outcome.TORN:
                torn = _cut_tail(fd, path, end)
            # Whatever the OS held for this file may not be on disk yet: make it so before we
            # call its last sequence durable.
            fsutil.fsync_fd(fd)
            seg.size = end.offset
            return seg, last_seq, torn
        finally:
            os.close(fd)

    def _scan_last_seq(self, seg: _Segment) -> int:
        fd = os.open(seg.path, os.O_RDONLY)
        try:
            reader = SegmentReader(fd)
            last = seg.first_seq - 1 if seg.first_seq > 0 else 0
            for unit in reader:
                self._index_unit(seg, unit.first_seq, unit.offset)
                last = unit.last_seq
        finally:
            os.close(fd)
        end = reader.end
        if end is None or end.outcome is not Outcome.CLEAN:
            raise CorruptionError(seg.path, end.bad_offset if end else 0, end.reason if end else "")
        seg.index_complete = True
        return last

    def _resolve_first_seqs(self) -> None:
        """Give empty segments the first sequence of their successor; check ordering."""
        following = -1
        for seg in reversed(self._segments):
            if seg.first_seq < 0:
                seg.first_seq = following if following >= 0 else 1
            following = seg.first_seq
        for prev, seg in zip(self._segments, self._segments[1:], strict=False):
            if seg.first_seq < prev.first_seq:
                raise WalError(
                    f"{seg.path}: sequence numbers go backwards ({seg.first_seq} after "
                    f"{prev.first_seq} in {prev.name}); a Kevo log that restarted sequences at "
                    "rotation cannot be appended to (it can still be dumped)"
                )

    # ------------------------------------------------------------------ properties

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    @property
    def first_seq(self) -> int:
        """The oldest sequence number still in the log (next_seq when the log is empty)."""
        with self._lock:
            return self._first_seq_locked()

    def _first_seq_locked(self) -> int:
        if not self._segments or self._last_seq < self._segments[0].first_seq:
            return self._next_seq
        return self._segments[0].first_seq

    def bytes_from(self, seq: int) -> int:
        """Bytes of log from `seq` to the end: what keeping `seq` costs, or how far behind a
        reader at `seq` is (all of the log when `seq` is older than its oldest entry; 0 past
        its end). Exact to the sparse index's granularity (`index_every_bytes`), never less."""
        with self._lock:
            if seq > self._last_seq or not self._segments:
                return 0
            pos = self._locate_locked(seq)
            assert pos is not None
            i, offset = pos
            return self._segments[i].size - offset + sum(s.size for s in self._segments[i + 1 :])

    def segment_paths(self) -> list[str]:
        with self._lock:
            return [s.path for s in self._segments]

    # ------------------------------------------------------------------ appending

    def append(self, op: Op, key: bytes, value: bytes = b"", *, sync: bool | None = None) -> int:
        """Append one entry; returns its sequence number once the sync mode is satisfied.

        `sync=True` waits for durability whatever the mode; `sync=None` follows the mode.
        """
        seq = self._append_entry(op, key, value)
        self._after_append(seq, sync)
        return seq

    def append_batch(
        self, ops: Sequence[tuple[Op, bytes, bytes]], *, sync: bool | None = None
    ) -> int:
        """Append an atomic batch (recovery keeps all of it or none); returns its first sequence."""
        start = self._append_batch(ops)
        self._after_append(start + len(ops) - 1, sync)
        return start

    async def append_async(
        self, op: Op, key: bytes, value: bytes = b"", *, sync: bool | None = None
    ) -> int:
        """`append` for asyncio: the fsync runs on the WAL's sync thread, shared by all tasks."""
        seq = self._append_entry(op, key, value)
        await self._after_append_async(seq, sync)
        return seq

    async def append_batch_async(
        self, ops: Sequence[tuple[Op, bytes, bytes]], *, sync: bool | None = None
    ) -> int:
        start = self._append_batch(ops)
        await self._after_append_async(start + len(ops) - 1, sync)
        return start

    def append_nowait(self, op: Op, key: bytes, value: bytes = b"") -> int:
        """Append without waiting for any sync; pair with `wait_durable` / `sync_to`."""
        return self._append_entry(op, key, value)

    def append_batch_nowait(self, ops: Sequence[tuple[Op, bytes, bytes]]) -> int:
        """Append an atomic batch without waiting for any sync; returns its first sequence."""
        return self._append_batch(ops)

    def append_units(self, units: Sequence[Unit]) -> int:
        """Append units that already carry their sequence numbers (a replica copying its primary).

        The first must continue this log exactly (`next_seq`) and each the one before it: a gap
        or an overlap is refused, so a replica's WAL holds the primary's numbering unchanged.
        Returns the last sequence number appended; durability follows the sync mode as usual.
        """
        last = self._append_units(units)
        self._after_append(last, None)
        return last

    def append_units_nowait(self, units: Sequence[Unit], raw: bytes | None = None) -> int:
        """`append_units` without any sync: the caller fsyncs (`sync_to`) when it decides.

        With `raw`, the bytes the units were decoded from (their offsets index into it), those
        bytes are written as they are instead of encoding the units again.
        """
        return self._append_units(units, raw)

    def _append_units(self, units: Sequence[Unit], raw: bytes | None = None) -> int:
        with self._lock:
            self._check_writable()
            expected = self._next_seq
            # All or nothing: a gap or an oversize unit anywhere refuses the whole call before a
            # byte is written (a refusal half way would leave units buffered under sequence
            # numbers `_next_seq` does not account for, and the next append would reuse them).
            encoded: list[bytes] = []
            for unit in units:
                if unit.first_seq != expected:
                    raise InvalidArgumentError(
                        f"unit starting at sequence {unit.first_seq} does not continue the WAL "
                        f"(next is {expected})"
                    )
                if raw is None:
                    encoded.append(_encode_unit(unit))
                size = unit.length if raw is not None else len(encoded[-1])
                if size > MAX_UNIT_BYTES:  # what _write_unit_locked would refuse half way
                    raise InvalidArgumentError(
                        f"WAL unit of {size} bytes at sequence {unit.first_seq} exceeds the "
                        f"limit of {MAX_UNIT_BYTES}"
                    )
                expected = unit.last_seq + 1
            tail = self._tail
            if raw is None:
                for unit, data in zip(units, encoded, strict=True):
                    self._write_unit_locked(data, unit.first_seq)
                    if tail is not None:
                        tail.add(unit.first_seq, unit.last_seq, data)
            else:
                self._write_raw_units_locked(units, memoryview(raw))
                if tail is not None:
                    for unit in units:
                        data = raw[unit.offset : unit.offset + unit.length]
                        tail.add(unit.first_seq, unit.last_seq, data)
            if units:
                self._next_seq = expected
                self._last_seq = expected - 1
            return self._last_seq

    def _write_raw_units_locked(self, units: Sequence[Unit], view: memoryview) -> None:
        """Units laid end to end in `view`: each run that fits the active segment is one copy.

        A replica appends thousands of units per frame; one buffer copy per run instead of one
        per unit is most of its WAL write cost.
        """
        i, count = 0, len(units)
        while i < count:
            j = self._write_run_locked(units, i, view)
            if j == i:  # the unit needs a new segment, or is over the limit: the general path
                unit = units[i]
                data = view[unit.offset : unit.offset + unit.length]
                self._write_unit_locked(data, unit.first_seq)
                j = i + 1
            i = j

    def _write_run_locked(self, units: Sequence[Unit], i: int, view: memoryview) -> int:
        """Write units[i:j] into the active segment as one slice; returns j (i if none fit)."""
        seg = self._segments[-1] if self._segments else None
        if seg is None:
            return i
        seg_max, every = self.options.segment_bytes_max, self._index_every
        start = units[i].offset
        size, last_index = seg.size, seg.last_index_offset
        j = i
        for unit in itertools.islice(units, i, None):
            n = unit.length
            if n > MAX_UNIT_BYTES or size + n > seg_max or unit.offset != start + size - seg.size:
                break
            if size - last_index >= every:
                seg.index.append((unit.first_seq, size))
                last_index = size
            size += n
            j += 1
        if j > i:
            run = size - seg.size
            self._buf += view[start : start + run]
            seg.size, seg.last_index_offset = size, last_index
            self._unsynced_bytes += run
            if len(self._buf) >= self.options.buffer_bytes:
                self._flush_locked()
        return j

    def add_sync_listener(self, listener: Callable[[int], None]) -> None:
        """Call `listener(durable_seq)` after every fsync round, on the thread that synced.

        Lighter than an observer: nothing is queued per append. The listener must be quick and
        must not block (hand the news to an event loop with call_soon_threadsafe).
        """
        with self._lock:
            self._sync_listeners = (*self._sync_listeners, listener)

    def _append_entry(self, op: Op, key: bytes, value: bytes) -> int:
        # The hot path of every write: kept flat on purpose (no helper calls in the common case).
        if op not in _VALID_OPS:
            raise InvalidArgumentError(f"invalid WAL operation {op!r}")
        with self._lock:
            if self._closed or self._failed is not None:
                self._check_writable()
            seq = self._next_seq
            if seq > MAX_SEQ:
                raise WalError("sequence numbers exhausted (u64)")
            data = encode_entry(seq, op, key, value)
            n = len(data)
            seg = self._segments[-1] if self._segments else None
            if seg is None or seg.size + n > self._segment_max or n > MAX_UNIT_BYTES:
                self._write_unit_locked(data, seq)
            else:
                off = seg.size
                if off - seg.last_index_offset >= self._index_every:
                    seg.index.append((seq, off))
                    seg.last_index_offset = off
                buf = self._buf
                buf += data
                seg.size = off + n
                self._unsynced_bytes += n
                if len(buf) >= self._buffer_max:
                    self._flush_locked()
            self._next_seq = seq + 1
            self._last_seq = seq
            if self._tail is not None:
                self._tail.add(seq, seq, data)
            if self._hub.observers:
                self._hub.publish("entry", Entry(seq, op, key, b"" if op == Op.DELETE else value))
        return seq

    def _append_batch(self, ops: Sequence[tuple[Op, bytes, bytes]]) -> int:
        if not ops:
            raise InvalidArgumentError("a WAL batch needs at least one operation")
        for op, _, _ in ops:
            if op not in _VALID_OPS:
                raise InvalidArgumentError(f"invalid WAL operation {op!r} in batch")
        with self._lock:
            self._check_writable()
            start = self._next_seq
            last = start + len(ops) - 1
            if last > MAX_SEQ:
                raise WalError("sequence numbers exhausted (u64)")
            data = encode_batch(start, ops)
            self._write_unit_locked(data, start)
            self._next_seq = last + 1
            self._last_seq = last
            if self._tail is not None:
                self._tail.add(start, last, data)
            if self._hub.observers:
                entries = [
                    Entry(start + i, op, k, b"" if op == Op.DELETE else v)
                    for i, (op, k, v) in enumerate(ops)
                ]
                self._hub.publish("batch", start, entries)
        return start

    def _write_unit_locked(self, data: bytes | memoryview, first_seq: int) -> None:
        if len(data) > MAX_UNIT_BYTES:
            raise InvalidArgumentError(
                f"WAL unit of {len(data)} bytes exceeds the limit of {MAX_UNIT_BYTES}"
            )
        seg = self._segments[-1] if self._segments else None
        if seg is None or (seg.size > 0 and seg.size + len(data) > self.options.segment_bytes_max):
            seg = self._cut_segment_locked(first_seq)
        self._index_unit(seg, first_seq, seg.size)
        self._buf += data
        seg.size += len(data)
        self._unsynced_bytes += len(data)
        if len(self._buf) >= self.options.buffer_bytes:
            self._flush_locked()

    def _index_unit(self, seg: _Segment, first_seq: int, offset: int) -> None:
        if offset - seg.last_index_offset >= self.options.index_every_bytes:
            seg.index.append((first_seq, offset))
            seg.last_index_offset = offset

    def _index_from_reader(self, seg: _Segment, first_seq: int, offset: int) -> None:
        # Readers may race each other (and the writer, on the active segment): the cheap check
        # runs unlocked, the append under the lock after checking again.
        if offset - seg.last_index_offset >= self._index_every:
            with self._lock:
                self._index_unit(seg, first_seq, offset)

    def _flush_locked(self) -> None:
        if self._buf:
            try:
                fsutil.write_all(self._fd, self._buf)
            except OSError as err:
                self._fail(err)
                raise WalError(f"write to {self._segments[-1].path} failed: {err}") from err
            self._written += len(self._buf)
            self._buf.clear()

    def _cut_segment_locked(self, first_seq: int) -> _Segment:
        """Close the active segment durably and start a new one holding `first_seq` onwards.

        Any failure marks the WAL failed: once the old descriptor is closed there is no active
        file to append to, and a failed fsync leaves the page cache untrustworthy.
        """
        if self._segments:
            self._flush_locked()
            self._fsync_locked(self._fd)
            self._durable_seq = max(self._durable_seq, self._last_seq)
            old_fd, self._fd = self._fd, -1  # never closed twice, whatever fails below
            self._segments[-1].index_complete = True
            if old_fd == self._leader_fd:
                self._retired_fds.append(old_fd)  # a sync leader is using it: it closes it
            else:
                try:
                    os.close(old_fd)
                except OSError as err:
                    self._fail(err)
                    raise WalError(f"close of {self._segments[-1].path} failed: {err}") from err
        prev = self._segments[-1].name if self._segments else None
        stamp = time.time_ns()
        if prev is not None:
            stamp = max(stamp, int(prev[:20]) + 1)
        name = segment_name(stamp)
        path = os.path.join(self.directory, name)
        tmp = path + ".tmp"
        fd = -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            fsutil.fsync_fd(fd)
            os.rename(tmp, path)
            fsutil.fsync_dir(self.directory)
        except OSError as err:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fail(err)  # a leftover .wal.tmp is removed by the next open's recovery
            raise WalError(f"cannot create WAL segment {path}: {err}") from err
        seg = _Segment(name, path, first_seq, 0)
        self._segments.append(seg)
        self._fd = fd
        self._written = 0
        self._active_durable = False
        return seg

    def _fsync_locked(self, fd: int) -> None:
        try:
            fsutil.fsync_fd(fd)
        except OSError as err:
            self._fail(err)
            raise WalError(f"fsync of the WAL failed: {err}") from err

    def _fail(self, err: BaseException) -> None:
        # After a failed fsync the page cache can no longer be trusted (the kernel may have
        # dropped the dirty pages): refuse further writes until a restart re-reads the disk.
        self._failed = err

    def _check_writable(self) -> None:
        if self._closed:
            raise WalClosedError("WAL is closed")
        if self._failed is not None:
            raise WalError(f"WAL failed earlier ({self._failed}); restart to recover")

    # ------------------------------------------------------------------ durability

    def _after_append(self, seq: int, sync: bool | None) -> None:
        if (
            sync
            or (sync is None and self._immediate)
            or (self._batch_mode and self._unsynced_bytes >= self.options.sync_bytes)
        ):
            self.sync_to(seq)

    async def _after_append_async(self, seq: int, sync: bool | None) -> None:
        mode = self.options.sync_mode
        if sync or (sync is None and mode is SyncMode.IMMEDIATE):
            await self.wait_durable(seq)
        elif mode is SyncMode.BATCH and self._unsynced_bytes >= self.options.sync_bytes:
            self._wake.set()

    def flush(self) -> int:
        """Hand buffered bytes to the OS (no fsync); returns the last sequence handed over.

        After this a process crash loses nothing appended so far; a power loss still may.
        """
        with self._lock:
            if not self._closed:
                self._flush_locked()
            return self._last_seq

    def sync(self) -> int:
        """Make everything appended so far durable; returns the durable sequence number."""
        self.sync_to(self._last_seq)
        return self._durable_seq

    def sync_to(self, seq: int) -> None:
        """Return once `seq` is durable. Concurrent callers share one fsync (group commit)."""
        if self._durable_seq >= seq:
            return
        with self._sync_lock:
            if self._durable_seq >= seq:
                return
            with self._lock:
                if self._failed is not None:
                    raise WalError(f"WAL failed earlier ({self._failed}); restart to recover")
                self._flush_locked()
                target = self._last_seq
                fd = self._leader_fd = self._fd
                self._unsynced_bytes = 0
            try:
                self._fsync_locked(fd)  # outside _lock: appenders keep going during the fsync
            finally:
                with self._lock:
                    self._leader_fd = -1
            with self._lock:
                if target > self._durable_seq:
                    self._durable_seq = target
                    self._active_durable = self._active_durable or target >= self._active_first()
                retired, self._retired_fds = self._retired_fds, []
                if self._hub.observers:
                    self._hub.publish("sync", self._durable_seq)
                durable = self._durable_seq
            for old in retired:
                os.close(old)
            for listener in self._sync_listeners:
                listener(durable)

    def _active_first(self) -> int:
        return self._segments[-1].first_seq if self._segments else self._next_seq

    async def wait_durable(self, seq: int) -> int:
        """Await durability of `seq` without blocking the event loop; returns the durable seq."""
        if self._durable_seq >= seq:
            return self._durable_seq
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        with self._waiters_lock:
            # Checked under the lock the sync thread resolves under: a waiter is either seen by
            # its last round or refused here, never left hanging.
            if self._closed:
                raise WalClosedError("WAL is closed")
            self._waiters.append(_AsyncWaiter(seq, fut, loop))
        self._start_syncer()
        self._wake.set()
        return await fut

    def _start_syncer(self) -> None:
        if self._syncer is None:
            with self._waiters_lock:
                if self._syncer is None:
                    self._syncer = threading.Thread(
                        target=self._sync_loop, name="kevo-wal-sync", daemon=True
                    )
                    self._syncer.start()

    def _sync_loop(self) -> None:
        interval_s = self.options.sync_interval_ms / 1000
        batch_mode = self.options.sync_mode is SyncMode.BATCH
        while not self._closed:
            self._wake.wait(interval_s if batch_mode else None)
            self._wake.clear()
            try:
                if self._waiters or (batch_mode and self._unsynced_bytes):
                    self.sync_to(self._last_seq)
                error: BaseException | None = None
            except WalError as err:
                error = err
            self._resolve_waiters(error)
        self._resolve_waiters(WalClosedError("WAL closed before the write became durable"))

    def _resolve_waiters(self, error: BaseException | None) -> None:
        durable = self._durable_seq
        done: list[_AsyncWaiter] = []
        keep: list[_AsyncWaiter] = []
        with self._waiters_lock:
            for w in self._waiters:
                (done if error is not None or w.seq <= durable else keep).append(w)
            self._waiters = keep
        by_loop: dict[asyncio.AbstractEventLoop, list[_AsyncWaiter]] = {}
        for w in done:
            by_loop.setdefault(w.loop, []).append(w)
        for loop, waiters in by_loop.items():
            # One wake-up per event loop per sync round, however many tasks were waiting.
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting
                loop.call_soon_threadsafe(_settle, waiters, durable, error)

    # ------------------------------------------------------------------ reading

    def entries_from(self, seq: int, max_seq: int | None = None) -> Iterator[Entry]:
        """Entries with sequence >= `seq` (the seed's GetEntriesFrom), lazily, in log order."""
        for unit in self.units_from(seq, max_seq):
            for entry in unit.entries:
                if entry.seq >= seq:
                    yield entry

    def units_from(
        self, seq: int, max_seq: int | None = None, *, raw: bool = False, light: bool = False
    ) -> Iterator[Unit]:
        """Whole units whose last sequence is >= `seq`, up to what was written when reached.

        Goes straight to the segment holding `seq` and, through the sparse index, near its offset.
        Raises SequenceCompactedError when `seq` is older than the oldest retained entry.
        With `raw`, each unit also carries its bytes as read (`Unit.raw`). `light` implies `raw`
        and leaves single-entry units without their entries (`codec.scan_unit`): for a reader
        that ships the bytes on.
        """
        seq = max(seq, 1)  # nothing below 1 ever existed, so 0 cannot have been compacted away
        with self._lock:
            if self._closed:
                raise WalClosedError("WAL is closed")
            self._flush_locked()
            oldest = self._first_seq_locked()
            if seq < oldest and seq <= self._last_seq:
                raise SequenceCompactedError(seq, oldest)
            pos = self._locate_locked(seq)
            name = self._segments[pos[0]].name if pos is not None else ""
        if pos is None:
            return
        yield from self._read_from(name, pos[1], seq, max_seq, raw, light)

    def tail_take(
        self, seq: int, max_seq: int, max_bytes: int, max_entries: int
    ) -> TailSlice | None:
        """Units from the in-memory tail window (`WalOptions.tail_window_bytes`), as `units_from`
        would return them but as the raw bytes written, up to `max_bytes`/`max_entries` (the
        first unit always). None when the window is off or does not hold `seq`: read segments.
        """
        with self._lock:
            if self._closed:
                raise WalClosedError("WAL is closed")
            if self._tail is None:
                return None
            return self._tail.take(seq, max_seq, max_bytes, max_entries)

    def _locate_locked(self, seq: int) -> tuple[int, int] | None:
        """(index in _segments, offset) where reading for `seq` starts; None without segments."""
        if not self._segments:
            return None
        firsts = [s.first_seq for s in self._segments]
        i = max(bisect.bisect_right(firsts, seq) - 1, 0)
        # Several segments can start at the same number (empty ones); take the first of them.
        while i > 0 and firsts[i - 1] == firsts[i] and firsts[i] >= seq:
            i -= 1
        seg = self._segments[i]
        # The last index point whose unit starts strictly before seq: units sharing seq (Kevo
        # HEAD's equal-seq batches) all come after it.
        j = bisect.bisect_left(seg.index, (seq, -1)) - 1
        return i, seg.index[j][1] if j >= 0 else 0

    def _read_from(
        self, name: str, offset: int, seq: int, max_seq: int | None, raw: bool, light: bool
    ) -> Iterator[Unit]:
        fd = self._open_segment(name, seq)
        prev_last = -1  # the last sequence of the segment before, once one was crossed
        last_seen = -1  # of the last unit read
        try:
            while True:
                with self._lock:
                    seg = self._find_locked(name)
                    active = seg is not None and seg is self._segments[-1]
                    limit = self._written if active else (seg.size if seg else os.fstat(fd).st_size)
                    nxt = self._next_name_locked(name)
                if offset < limit:
                    reader = SegmentReader(fd, offset, limit, keep_raw=raw, light=light)
                    for unit in reader:
                        if prev_last >= 0:
                            self._check_continues(name, prev_last, unit.first_seq)
                            prev_last = -1
                        last_seen = unit.last_seq
                        if seg is not None and not seg.index_complete:
                            self._index_from_reader(seg, unit.first_seq, unit.offset)
                        if max_seq is not None and unit.first_seq > max_seq:
                            return
                        if unit.last_seq >= seq:
                            yield unit
                    end = reader.end
                    assert end is not None
                    if end.outcome is not Outcome.CLEAN:
                        raise CorruptionError(
                            os.path.join(self.directory, name), end.bad_offset, end.reason
                        )
                    offset = end.offset
                    if seg is not None and not active:
                        seg.index_complete = True
                    continue  # the limit may have moved while we read
                if active or nxt is None:
                    return
                os.close(fd)
                fd = -1
                name, offset = nxt, 0
                prev_last = last_seen  # (an empty segment in between changes nothing)
                fd = self._open_segment(name, seq)
        finally:
            if fd >= 0:
                os.close(fd)

    def _check_continues(self, name: str, prev_last: int, first: int) -> None:
        """A segment must start where the one before it ended: a later start means entries
        are missing (a file lost or cut short), which a reader must not skip over. (A lower
        start is a Kevo-written log, whose numbers restart at rotation.)"""
        if first > prev_last + 1:
            raise CorruptionError(
                os.path.join(self.directory, name), 0, gap_reason(prev_last, first)
            )

    def _open_segment(self, name: str, seq: int) -> int:
        try:
            return os.open(os.path.join(self.directory, name), os.O_RDONLY)
        except FileNotFoundError:
            # Retention removed it between lookup and open.
            raise SequenceCompactedError(seq, self.first_seq) from None

    def _find_locked(self, name: str) -> _Segment | None:
        for seg in self._segments:
            if seg.name == name:
                return seg
        return None

    def _next_name_locked(self, name: str) -> str | None:
        for seg in self._segments:
            if seg.name > name:
                return seg.name
        return None

    # ------------------------------------------------------------------ observers and holds

    def add_observer(self, observer: WalObserver) -> None:
        self._hub.add(observer)

    def remove_observer(self, observer: WalObserver) -> None:
        self._hub.remove(observer)

    def hold(self, name: str, seq: int) -> None:
        """Keep every entry with sequence >= `seq` from retention until `release(name)`."""
        with self._lock:
            self._holds[name] = seq

    def release(self, name: str) -> None:
        with self._lock:
            self._holds.pop(name, None)

    # ------------------------------------------------------------------ retention

    def apply_retention(self, policy: RetentionPolicy, now: float | None = None) -> list[str]:
        """Delete the oldest closed segments the policy allows; returns the deleted paths."""
        now = time.time() if now is None else now
        with self._lock:
            doomed = self._retention_victims_locked(policy, now)
            self._segments = self._segments[len(doomed) :]
        error: WalError | None = None
        deleted: list[_Segment] = []
        for seg in doomed:
            try:
                os.unlink(seg.path)
            except FileNotFoundError:
                pass
            except OSError as err:
                # Stop at the first failure, oldest first: deleting a newer segment would leave
                # a gap in the files on disk. The ones left are no longer read; a restart lists
                # them again and a later retention deletes them.
                error = WalError(f"WAL retention cannot delete {seg.path}: {err}")
                error.__cause__ = err
                break
            deleted.append(seg)
        if deleted:
            try:
                fsutil.fsync_dir(self.directory)
            except OSError as err:
                # Only the deletions may not be durable: a restart would find the segments
                # again, an older prefix of the log, which is harmless.
                if error is None:
                    error = WalError(f"fsync of {self.directory} after WAL retention failed: {err}")
                    error.__cause__ = err
            log.info("WAL retention deleted %d segment(s) up to %s", len(deleted), deleted[-1].name)
        if error is not None:
            raise error
        return [s.path for s in deleted]

    def _retention_victims_locked(self, policy: RetentionPolicy, now: float) -> list[_Segment]:
        floor = min(self._holds.values(), default=MAX_SEQ + 1)
        closed = self._segments[:-1]
        if closed and not self._active_durable:
            closed = closed[:-1]  # keep the last durable record of where the sequence stands
        total = sum(s.size for s in self._segments)
        doomed: list[_Segment] = []
        for i, seg in enumerate(closed):
            last_seq = self._segments[i + 1].first_seq - 1
            if last_seq >= floor:
                break
            by_seq = policy.min_seq_keep is not None and last_seq < policy.min_seq_keep
            by_size = policy.max_total_bytes is not None and total > policy.max_total_bytes
            by_age = policy.max_age_s is not None and now - _mtime(seg.path) > policy.max_age_s
            if not (by_seq or by_size or by_age):
                break
            doomed.append(seg)
            total -= seg.size
        return doomed

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Flush and fsync everything, stop the helper threads, release the directory."""
        with self._lock:
            if self._closed:
                return
            # Refuse new appends before the final sync, so none can slip in after it.
            self._closed = True
        try:
            if self._failed is None:
                self.sync()
        finally:
            self._wake.set()
            if self._syncer is not None:
                self._syncer.join(5)
            self._resolve_waiters(WalClosedError("WAL closed before the write became durable"))
            self._hub.close()
            for fd in [self._fd, *self._retired_fds]:
                if fd >= 0:
                    os.close(fd)
            self._fd = -1
            self._retired_fds = []
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = -1

    def __enter__(self) -> WAL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode_unit(unit: Unit) -> bytes:
    if unit.form == BatchForm.SINGLE:
        (e,) = unit.entries
        return encode_entry(e.seq, e.op, e.key, e.value)
    return encode_batch(unit.first_seq, [(e.op, e.key, e.value) for e in unit.entries])


def _settle(waiters: list[_AsyncWaiter], durable: int, error: BaseException | None) -> None:
    for w in waiters:
        if w.future.done():
            continue
        if w.seq <= durable:  # durable is durable, even if the WAL failed or closed since
            w.future.set_result(durable)
        else:
            w.future.set_exception(error or WalError("write not durable"))


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return 0.0
    except OSError as err:
        raise WalError(f"cannot stat WAL segment {path}: {err}") from err


def lock_directory(directory: str) -> int:
    return fsutil.lock_directory(directory, WalLockedError, WalError)


def _cut_tail(fd: int, path: str, end: ReadEnd) -> TornTail:
    """Truncate a torn tail at `end.offset`, keeping the cut bytes in NAME.wal.torn-OFFSET."""
    size = os.fstat(fd).st_size
    kept_at = f"{path}.torn-{end.offset}"
    suffix = 0
    while os.path.exists(kept_at):  # never overwrite bytes kept by an earlier repair
        suffix += 1
        kept_at = f"{path}.torn-{end.offset}.{suffix}"
    cut = _copy_range_durably(fd, end.offset, size, kept_at)
    os.ftruncate(fd, end.offset)
    fsutil.fsync_fd(fd)
    return TornTail(path, end.offset, cut, kept_at, end.reason)


def _copy_range_durably(fd: int, start: int, stop: int, dest: str) -> int:
    """Copy bytes `start..stop` of `fd` to a new file `dest` as `fsutil.atomic_write` would, a
    chunk at a time: a torn tail can be hundreds of megabytes of zeros. Returns bytes copied."""
    tmp = f"{dest}.tmp"
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pos = start
    try:
        while pos < stop:
            chunk = os.pread(fd, min(READ_CHUNK_BYTES, stop - pos), pos)
            if not chunk:
                break  # the file is shorter than it was: nothing more to keep
            fsutil.write_all(out, chunk)
            pos += len(chunk)
        fsutil.fsync_fd(out)
    finally:
        os.close(out)
    os.replace(tmp, dest)
    fsutil.fsync_dir(os.path.dirname(os.path.abspath(dest)))
    return pos - start


def repair_segment(path: str) -> TornTail | None:
    """Cut a torn tail off one segment file (for `wal repair`); corruption is not repaired."""
    fd = os.open(path, os.O_RDWR)
    try:
        reader = SegmentReader(fd)
        for _ in reader:
            pass
        end = reader.end
        assert end is not None
        if end.outcome is Outcome.CORRUPT:
            raise CorruptionError(path, end.bad_offset, end.reason)
        if end.outcome is Outcome.CLEAN:
            return None
        return _cut_tail(fd, path, end)
    finally:
        os.close(fd)


def _validate_options(options: WalOptions) -> None:
    if options.segment_bytes_max < 4096:
        raise InvalidArgumentError("segment_bytes_max must be at least 4096")
    if options.sync_bytes < 1 or options.sync_interval_ms < 1:
        raise InvalidArgumentError("sync_bytes and sync_interval_ms must be positive")
    if options.sync_interval_ms > SYNC_INTERVAL_MS_MAX:
        # Beyond threading.TIMEOUT_MAX the sync thread's wait would raise and the thread die.
        raise InvalidArgumentError(f"sync_interval_ms must be at most {SYNC_INTERVAL_MS_MAX}")
    if options.buffer_bytes < 0 or options.index_every_bytes < 1 or options.observer_queue_max < 1:
        raise InvalidArgumentError("buffer_bytes, index_every_bytes, observer_queue_max invalid")
