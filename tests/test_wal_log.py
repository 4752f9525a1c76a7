"""Behaviour of the WAL class (kevo_repl/wal/log.py).

Sequence numbers, rotation, readers and the sparse index, sync modes and group commit, recovery of
torn tails and corruption, the directory lock, retention and holds, observers, and misuse. Every
test works in its own tmp_path; nothing asserts on wall-clock timings.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

import pytest

from kevo_repl import fsutil, walcli
from kevo_repl.errors import (
    CorruptionError,
    InvalidArgumentError,
    SequenceCompactedError,
    WalClosedError,
    WalError,
    WalLockedError,
)
from kevo_repl.wal import WAL, Entry, Op, RetentionPolicy, SyncMode, Unit, WalOptions
from kevo_repl.wal.codec import RECORD_FIRST, encode_batch, encode_entry
from kevo_repl.wal.segment import (
    READ_CHUNK_BYTES,
    Outcome,
    ReadEnd,
    SegmentReader,
    list_segments,
    segment_name,
)

SMALL = 4096  # the smallest segment_bytes_max the WAL accepts
NAME_RE = re.compile(r"^\d{20}\.wal$")
NONE_SMALL = WalOptions(sync_mode=SyncMode.NONE, segment_bytes_max=SMALL)


# --------------------------------------------------------------------------------------- helpers


def read_file_units(path: str | Path) -> tuple[list[Unit], ReadEnd]:
    """Decode one segment file on its own."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        reader = SegmentReader(fd)
        units = list(reader)
    finally:
        os.close(fd)
    assert reader.end is not None
    return units, reader.end


def seqs(it: Iterator[Entry]) -> list[int]:
    return [e.seq for e in it]


def fill(wal: WAL, n: int, value_size: int = 200, prefix: bytes = b"k") -> list[int]:
    return [wal.append(Op.PUT, prefix + b"%d" % i, b"v" * value_size) for i in range(n)]


def build_log(
    path: Path, n: int = 300, *, value_size: int = 200, index_every_bytes: int = 64 * 1024
) -> tuple[WAL, list[int]]:
    """An open NONE-mode log of n entries in small segments, synced (the active one is durable)."""
    options = WalOptions(
        sync_mode=SyncMode.NONE, segment_bytes_max=SMALL, index_every_bytes=index_every_bytes
    )
    wal = WAL.open(str(path), options)
    got = fill(wal, n, value_size)
    wal.sync()
    return wal, got


def seg_ranges(wal: WAL) -> list[tuple[str, int, int, int]]:
    """(path, first seq, last seq, size) of every segment, read straight from the files."""
    out = []
    for p in wal.segment_paths():
        units, end = read_file_units(p)
        assert end.outcome is Outcome.CLEAN
        assert units, p
        out.append((p, units[0].first_seq, units[-1].last_seq, os.path.getsize(p)))
    return out


def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


class Recorder:
    """A WalObserver that records what it gets (called from the dispatcher thread)."""

    def __init__(self, sleep_s: float = 0.0) -> None:
        self.sleep_s = sleep_s
        self.entries: list[Entry] = []
        self.batches: list[tuple[int, list[Entry]]] = []
        self.synced: list[int] = []
        self.missed = 0
        self.calls = 0

    def _tick(self) -> None:
        self.calls += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)

    def on_entry_written(self, entry: Entry) -> None:
        self._tick()
        self.entries.append(entry)

    def on_batch_written(self, start_seq: int, entries: Sequence[Entry]) -> None:
        self._tick()
        self.batches.append((start_seq, list(entries)))

    def on_synced(self, up_to_seq: int) -> None:
        self._tick()
        self.synced.append(up_to_seq)

    def on_missed(self) -> None:
        self._tick()
        self.missed += 1


class Exploding(Recorder):
    def on_entry_written(self, entry: Entry) -> None:
        super().on_entry_written(entry)
        raise RuntimeError("observer bug")


# --------------------------------------------------------------------------- 1. sequence numbers


def test_sequences_increase_across_rotation_and_reopen(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path), NONE_SMALL) as wal:
        assert wal.next_seq == 1 and wal.last_seq == 0
        got = fill(wal, 200)
        assert got == list(range(1, 201))
        assert wal.last_seq == 200 and wal.next_seq == 201
        assert len(wal.segment_paths()) > 5  # it really rotated
        assert seqs(wal.entries_from(1)) == list(range(1, 201))
    with WAL.open(str(tmp_path), WalOptions(segment_bytes_max=SMALL)) as wal:
        assert wal.recovery.last_seq == 200
        assert wal.last_seq == 200 and wal.next_seq == 201
        assert wal.append(Op.DELETE, b"k1") == 201
        start = wal.append_batch(
            [(Op.PUT, b"a", b"1"), (Op.MERGE, b"b", b"2"), (Op.PUT, b"c", b"")]
        )
        assert start == 202
        assert wal.last_seq == 204 and wal.next_seq == 205
        assert wal.append(Op.PUT, b"after", b"x") == 205
    with WAL.open(str(tmp_path)) as wal:
        assert wal.next_seq == 206
        assert seqs(wal.entries_from(1)) == list(range(1, 206))
        entries = list(wal.entries_from(201))
    assert [(e.seq, e.op, e.key, e.value) for e in entries] == [
        (201, Op.DELETE, b"k1", b""),
        (202, Op.PUT, b"a", b"1"),
        (203, Op.MERGE, b"b", b"2"),
        (204, Op.PUT, b"c", b""),
        (205, Op.PUT, b"after", b"x"),
    ]


def test_batch_takes_consecutive_numbers(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.NONE)) as wal:
        assert wal.append(Op.PUT, b"x", b"1") == 1
        ops = [(Op.PUT, b"k%d" % i, b"v%d" % i) for i in range(7)]
        assert wal.append_batch(ops) == 2
        assert wal.last_seq == 8 and wal.next_seq == 9
        assert wal.append(Op.PUT, b"y", b"2") == 9
        entries = list(wal.entries_from(2, max_seq=8))
    assert [e.seq for e in entries] == list(range(2, 9))
    assert [e.key for e in entries] == [b"k%d" % i for i in range(7)]


def test_next_seq_floor(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path), next_seq_floor=1000) as wal:
        assert wal.next_seq == 1000
        # Empty, it stands where its owner is (a replica just switched to a snapshot at 999).
        assert (wal.last_seq, wal.durable_seq, wal.first_seq) == (999, 999, 1000)
        assert list(wal.entries_from(1000)) == []
        assert wal.append(Op.PUT, b"a", b"1") == 1000
        assert wal.append_batch([(Op.PUT, b"b", b"2"), (Op.PUT, b"c", b"3")]) == 1001
    with WAL.open(str(tmp_path), next_seq_floor=5) as wal:  # a lower floor changes nothing
        assert wal.next_seq == 1003
    with WAL.open(str(tmp_path), next_seq_floor=5000) as wal:
        assert wal.next_seq == 5000
        assert wal.last_seq == 1002
        assert wal.append(Op.PUT, b"d", b"4") == 5000
        assert seqs(wal.entries_from(1000)) == [1000, 1001, 1002, 5000]
    with WAL.open(str(tmp_path)) as wal:
        assert wal.next_seq == 5001


def test_numbering_continues_after_retention_leaves_only_active(tmp_path: Path) -> None:
    wal, got = build_log(tmp_path, 300)
    try:
        paths = wal.segment_paths()
        assert len(paths) > 3
        deleted = wal.apply_retention(RetentionPolicy(min_seq_keep=got[-1] + 1))
        assert deleted == paths[:-1]
        assert wal.segment_paths() == paths[-1:]
        assert [n for n in os.listdir(tmp_path) if NAME_RE.match(n)] == [Path(paths[-1]).name]
    finally:
        wal.close()
    with WAL.open(str(tmp_path)) as wal:
        assert wal.last_seq == 300
        assert wal.next_seq == 301
        assert wal.append(Op.PUT, b"z", b"z") == 301
        assert wal.first_seq > 1
        assert seqs(wal.entries_from(wal.first_seq))[-2:] == [300, 301]


# ------------------------------------------------------------------------------------ 2. rotation


def test_rotation_names_order_and_units_never_span(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path), NONE_SMALL) as wal:
        for i in range(150):
            if i % 10 == 0:
                wal.append_batch([(Op.PUT, b"b%d-%d" % (i, j), b"w" * 150) for j in range(4)])
            else:
                wal.append(Op.PUT, b"k%d" % i, b"v" * (50 + 3 * i))
        paths = wal.segment_paths()
        last = wal.last_seq
    names = [Path(p).name for p in paths]
    assert len(names) > 10
    assert all(NAME_RE.match(n) for n in names)
    assert names == sorted(names) and len(set(names)) == len(names)
    assert list_segments(str(tmp_path)) == names
    expected = 1
    for p in paths:
        units, end = read_file_units(p)
        assert end.outcome is Outcome.CLEAN, p
        assert end.offset == os.path.getsize(p)
        assert units, p
        assert os.path.getsize(p) <= SMALL
        for u in units:
            assert u.first_seq == expected
            assert [e.seq for e in u.entries] == list(range(u.first_seq, u.last_seq + 1))
            expected = u.last_seq + 1
    assert expected == last + 1


def test_unit_larger_than_segment_gets_its_own_segment(tmp_path: Path) -> None:
    big = os.urandom(10_000)
    with WAL.open(str(tmp_path), NONE_SMALL) as wal:
        wal.append(Op.PUT, b"a", b"1")
        big_seq = wal.append(Op.PUT, b"big", big)
        wal.append(Op.PUT, b"b", b"2")
        batch = wal.append_batch([(Op.PUT, b"c%d" % i, os.urandom(3000)) for i in range(3)])
        wal.append(Op.PUT, b"d", b"3")
        paths = wal.segment_paths()
        assert [e.value for e in wal.entries_from(big_seq, max_seq=big_seq)] == [big]
    per_file = [read_file_units(p)[0] for p in paths]
    assert [[u.first_seq for u in units] for units in per_file] == [[1], [2], [3], [4], [7]]
    assert os.path.getsize(paths[1]) > SMALL and os.path.getsize(paths[3]) > SMALL
    assert per_file[3][0].last_seq == batch + 2
    with WAL.open(str(tmp_path)) as wal:
        got = list(wal.entries_from(1))
    assert [e.seq for e in got] == [1, 2, 3, 4, 5, 6, 7]
    assert got[1].value == big


# ---------------------------------------------------------------------------- 3. entries / units


def test_entries_and_units_from_positions(tmp_path: Path) -> None:
    options = WalOptions(sync_mode=SyncMode.NONE, segment_bytes_max=SMALL, index_every_bytes=200)
    with WAL.open(str(tmp_path), options) as wal:
        fill(wal, 100)
        start = wal.append_batch([(Op.PUT, b"b%d" % i, b"x" * 100) for i in range(5)])
        assert start == 101
        fill(wal, 100, prefix=b"t")
        last = wal.last_seq
        assert last == 205
        assert seqs(wal.entries_from(1)) == list(range(1, last + 1))
        for s in (2, 37, 50, 99, 100, 150, 204, 205):
            assert seqs(wal.entries_from(s)) == list(range(s, last + 1)), s
        # inside a batch: entries_from starts at the seq, units_from returns the whole unit
        assert seqs(wal.entries_from(103)) == list(range(103, last + 1))
        units = list(wal.units_from(103))
        assert units[0].first_seq == 101 and units[0].last_seq == 105 and units[0].is_batch
        assert [e.seq for e in units[0].entries] == [101, 102, 103, 104, 105]
        assert units[1].first_seq == 106
        assert next(wal.units_from(100)).first_seq == 100
        # nothing at or past next_seq
        assert list(wal.entries_from(wal.next_seq)) == []
        assert list(wal.units_from(wal.next_seq + 10)) == []
        assert seqs(wal.entries_from(40, max_seq=45)) == [40, 41, 42, 43, 44, 45]


def test_reads_after_reopen_build_the_index_lazily(tmp_path: Path) -> None:
    wal, _ = build_log(tmp_path, 400, index_every_bytes=300)
    wal.close()
    options = WalOptions(segment_bytes_max=SMALL, index_every_bytes=300)
    with WAL.open(str(tmp_path), options) as wal:
        closed = wal._segments[:-1]
        assert len(closed) > 5
        assert all(len(s.index) == 1 for s in closed)  # open reads only each first unit
        for s in range(1, 401, 13):
            got = seqs(wal.entries_from(s))
            assert got == list(range(s, 401)), s
        assert all(len(s.index) > 1 for s in closed)  # built while reading
        for s in range(400, 0, -17):  # and correct when used
            assert seqs(wal.entries_from(s)) == list(range(s, 401)), s
        assert [u.first_seq for u in wal.units_from(1)] == list(range(1, 401))


def test_reading_while_another_thread_appends(tmp_path: Path) -> None:
    options = WalOptions(
        sync_mode=SyncMode.NONE, segment_bytes_max=SMALL, index_every_bytes=64, buffer_bytes=0
    )
    total_units = 1500
    errors: list[BaseException] = []
    with WAL.open(str(tmp_path), options) as wal:
        halfway = threading.Event()

        def writer() -> None:
            try:
                for i in range(total_units):
                    if i == total_units // 2:
                        # Let the reader catch up with a live log before writing the rest.
                        halfway.wait(10)
                    if i % 7 == 0:
                        wal.append_batch([(Op.PUT, b"b%d" % i, b"x" * 40)] * 3)
                    else:
                        wal.append(Op.PUT, b"k%d" % i, b"v" * (20 + i % 90))
            except BaseException as err:
                errors.append(err)

        t = threading.Thread(target=writer)
        t.start()
        pos = 1
        full_reads = 0
        rounds = 0
        deadline = time.monotonic() + 30
        try:
            while t.is_alive() or pos <= wal.last_seq:
                assert time.monotonic() < deadline, "reader did not catch up"
                before = pos
                rounds += 1
                for e in wal.entries_from(pos):  # tail-follow: must be exactly pos, pos+1, ...
                    assert e.seq == pos
                    pos += 1
                if pos > total_units // 2 and not halfway.is_set():
                    assert t.is_alive()
                    halfway.set()
                if full_reads < 20 and rounds % 3 == 1:
                    snapshot = seqs(wal.entries_from(1))
                    assert snapshot == list(range(1, len(snapshot) + 1))
                    full_reads += 1
                if pos == before:
                    time.sleep(0.001)
        finally:
            t.join()
        assert errors == []
        assert halfway.is_set()
        assert pos == wal.next_seq
        assert pos - 1 == total_units + 2 * len(range(0, total_units, 7))
        assert full_reads > 0


def test_sequence_compacted_after_retention(tmp_path: Path) -> None:
    wal, _ = build_log(tmp_path, 300)
    try:
        ranges = seg_ranges(wal)
        keep = ranges[3][1] + 1  # the second entry of the fourth segment
        deleted = wal.apply_retention(RetentionPolicy(min_seq_keep=keep))
        assert deleted == [r[0] for r in ranges[:3]]
        assert wal.first_seq == ranges[3][1]
        with pytest.raises(SequenceCompactedError) as info:
            list(wal.entries_from(1))
        assert info.value.requested == 1 and info.value.oldest == ranges[3][1]
        with pytest.raises(SequenceCompactedError):
            list(wal.units_from(ranges[3][1] - 1))
        assert seqs(wal.entries_from(ranges[3][1])) == list(range(ranges[3][1], 301))
    finally:
        wal.close()


def test_large_fragmented_values_round_trip(tmp_path: Path) -> None:
    values = [os.urandom(n) for n in (32 * 1024 + 1, 100_000, 70_000)]
    with WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.NONE)) as wal:
        wal.append(Op.PUT, b"small", b"s")
        s1 = wal.append(Op.PUT, b"v1", values[0])
        s2 = wal.append(Op.MERGE, b"v2", values[1])
        s3 = wal.append_batch([(Op.PUT, b"v3", values[2]), (Op.DELETE, b"gone", b"")])
        live = list(wal.entries_from(s1))
        path = wal.segment_paths()[-1]
    assert [(e.seq, e.value) for e in live[:3]] == list(zip([s1, s2, s3], values, strict=True))
    units, end = read_file_units(path)
    assert end.outcome is Outcome.CLEAN
    raw = Path(path).read_bytes()
    assert raw[units[1].offset + 6] == RECORD_FIRST  # really fragmented on disk
    assert units[1].length > 32 * 1024 + 7
    with WAL.open(str(tmp_path)) as wal:
        again = list(wal.entries_from(1))
    assert [e.value for e in again] == [b"s", *values, b""]
    assert again[4].op == Op.DELETE and again[4].key == b"gone"


def test_closed_segments_starting_with_a_huge_unit(tmp_path: Path) -> None:
    # open() probes only the head of a closed segment; a first unit larger than the probe must
    # still be found (and its sequence used to place the segment).
    values = [os.urandom(90_000 + i) for i in range(3)]
    with WAL.open(str(tmp_path), NONE_SMALL) as wal:
        for i, v in enumerate(values):
            wal.append(Op.PUT, b"big%d" % i, v)
            wal.append(Op.PUT, b"small%d" % i, b"s")
        paths = wal.segment_paths()
    assert [[u.first_seq for u in read_file_units(p)[0]] for p in paths] == [
        [1],
        [2],
        [3],
        [4],
        [5],
        [6],
    ]
    with WAL.open(str(tmp_path), WalOptions(segment_bytes_max=SMALL)) as wal:
        assert wal.last_seq == 6
        assert [e.value for e in wal.entries_from(3, max_seq=3)] == [values[1]]
        assert [e.seq for e in wal.entries_from(4)] == [4, 5, 6]
        assert [e.value for e in wal.entries_from(1) if e.key.startswith(b"big")] == values


# -------------------------------------------------------------------------------- 4. sync modes


@pytest.mark.parametrize("mode", list(SyncMode))
def test_every_sync_mode_persists_across_clean_close(tmp_path: Path, mode: SyncMode) -> None:
    with WAL.open(str(tmp_path), WalOptions(sync_mode=mode)) as wal:
        for i in range(20):
            wal.append(Op.PUT, b"k%d" % i, b"v%d" % i)
        wal.append_batch([(Op.DELETE, b"k0", b""), (Op.PUT, b"k1", b"new")])
    with WAL.open(str(tmp_path), WalOptions(sync_mode=mode)) as wal:
        entries = list(wal.entries_from(1))
        assert wal.durable_seq == 22
    assert [(e.seq, e.key, e.value) for e in entries[:20]] == [
        (i + 1, b"k%d" % i, b"v%d" % i) for i in range(20)
    ]
    assert [(e.seq, e.op, e.value) for e in entries[20:]] == [
        (21, Op.DELETE, b""),
        (22, Op.PUT, b"new"),
    ]


def test_immediate_mode_is_durable_on_return(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.IMMEDIATE)) as wal:
        for i in range(10):
            seq = wal.append(Op.PUT, b"k%d" % i, b"v")
            assert wal.durable_seq == seq == wal.last_seq
        start = wal.append_batch([(Op.PUT, b"a", b"1"), (Op.PUT, b"b", b"2")])
        assert wal.durable_seq == start + 1 == wal.last_seq


def test_none_mode_lags_until_sync(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.NONE)) as wal:
        for i in range(10):
            wal.append(Op.PUT, b"k%d" % i, b"v")
        assert wal.last_seq == 10
        assert wal.durable_seq == 0
        assert wal.sync() == 10
        assert wal.durable_seq == 10
        wal.append(Op.PUT, b"x", b"y")
        assert wal.durable_seq == 10
        seq = wal.append(Op.PUT, b"z", b"w", sync=True)
        assert wal.durable_seq == seq == 12
        start = wal.append_batch([(Op.PUT, b"p", b"q")] * 2, sync=True)
        assert wal.durable_seq == start + 1


def test_batch_mode_syncs_by_itself(tmp_path: Path) -> None:
    options = WalOptions(sync_mode=SyncMode.BATCH, sync_interval_ms=2, sync_bytes=1 << 30)
    with WAL.open(str(tmp_path), options) as wal:
        for i in range(5):
            wal.append(Op.PUT, b"k%d" % i, b"v")
        assert wal.last_seq == 5
        assert wait_for(lambda: wal.durable_seq == 5)
        wal.append(Op.PUT, b"more", b"v")
        assert wait_for(lambda: wal.durable_seq == 6)


def test_batch_mode_syncs_after_sync_bytes(tmp_path: Path) -> None:
    options = WalOptions(sync_mode=SyncMode.BATCH, sync_interval_ms=60_000, sync_bytes=1000)
    with WAL.open(str(tmp_path), options) as wal:
        wal.append(Op.PUT, b"a", b"1")
        seq = wal.append(Op.PUT, b"b", b"x" * 2000)  # crosses sync_bytes: synced before return
        assert wal.durable_seq == seq


# ------------------------------------------------------------------------------ 5. group commit


def test_group_commit_threads(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.IMMEDIATE)) as wal:
        before = fsutil.SYNC_STATS.count
        errors: list[BaseException] = []
        got: list[list[int]] = [[] for _ in range(16)]
        barrier = threading.Barrier(16)

        def work(n: int) -> None:
            try:
                barrier.wait()
                for i in range(50):
                    seq = wal.append(Op.PUT, b"t%d-%d" % (n, i), b"v")
                    assert wal.durable_seq >= seq
                    got[n].append(seq)
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        fsyncs = fsutil.SYNC_STATS.count - before
        assert errors == []
        assert fsyncs < 800
        assert sorted(s for g in got for s in g) == list(range(1, 801))
        assert all(g == sorted(g) for g in got)
        keys = {e.key for e in wal.entries_from(1)}
    assert keys == {b"t%d-%d" % (n, i) for n in range(16) for i in range(50)}


def test_group_commit_asyncio(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.IMMEDIATE)) as wal:
        before = fsutil.SYNC_STATS.count

        async def task(n: int) -> list[int]:
            out = []
            for i in range(50):
                seq = await wal.append_async(Op.PUT, b"a%d-%d" % (n, i), b"v")
                assert wal.durable_seq >= seq
                out.append(seq)
            return out

        async def main() -> list[list[int]]:
            return list(await asyncio.gather(*(task(n) for n in range(16))))

        got = asyncio.run(main())
        fsyncs = fsutil.SYNC_STATS.count - before
        assert fsyncs < 800
        assert sorted(s for g in got for s in g) == list(range(1, 801))
        keys = {e.key for e in wal.entries_from(1)}
        batch_start = asyncio.run(wal.append_batch_async([(Op.PUT, b"x", b"1")] * 3))
        assert batch_start == 801 and wal.durable_seq == 803
    assert keys == {b"a%d-%d" % (n, i) for n in range(16) for i in range(50)}


# ---------------------------------------------------------------------------------- 6. recovery


def test_torn_tail_is_cut_kept_and_idempotent(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path), NONE_SMALL) as wal:
        fill(wal, 60)
        path = wal.segment_paths()[-1]
    good_size = os.path.getsize(path)
    partial = encode_entry(61, Op.PUT, b"torn-key", b"torn-value" * 5)[:25]
    with open(path, "ab") as f:
        f.write(partial)
    with WAL.open(str(tmp_path)) as wal:
        torn = wal.recovery.torn
        assert torn is not None
        assert torn.path == path and torn.offset == good_size and torn.bytes_cut == len(partial)
        assert torn.kept_at == f"{path}.torn-{good_size}"
        assert wal.recovery.last_seq == 60 and wal.last_seq == 60 and wal.next_seq == 61
        assert seqs(wal.entries_from(1)) == list(range(1, 61))
    assert os.path.getsize(path) == good_size
    assert Path(f"{path}.torn-{good_size}").read_bytes() == partial
    listing = sorted(os.listdir(tmp_path))
    with WAL.open(str(tmp_path)) as wal:
        assert wal.recovery.torn is None
        assert wal.last_seq == 60 and wal.next_seq == 61
    assert sorted(os.listdir(tmp_path)) == listing
    assert os.path.getsize(path) == good_size


def test_partial_batch_at_tail_is_dropped_whole(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.NONE)) as wal:
        fill(wal, 3)
        path = wal.segment_paths()[-1]
    good_size = os.path.getsize(path)
    ops = [(int(Op.PUT), b"b%d" % i, b"val%d" % i) for i in range(5)]
    full = encode_batch(4, ops)
    keep = 7 + 13 + sum(len(encode_entry(4 + i, *ops[i])) for i in range(2))
    partial = full[:keep]
    with open(path, "ab") as f:
        f.write(partial)
    with WAL.open(str(tmp_path)) as wal:
        assert wal.last_seq == 3 and wal.next_seq == 4
        assert [e.key for e in wal.entries_from(1)] == [b"k0", b"k1", b"k2"]
        torn = wal.recovery.torn
        assert torn is not None and torn.offset == good_size and torn.bytes_cut == len(partial)
        assert wal.append(Op.PUT, b"reused", b"x") == 4
    assert Path(f"{path}.torn-{good_size}").read_bytes() == partial
    with WAL.open(str(tmp_path)) as wal:
        assert [(e.seq, e.key) for e in wal.entries_from(4)] == [(4, b"reused")]


def test_partial_batch_alone_in_new_last_segment(tmp_path: Path) -> None:
    wal, _ = build_log(tmp_path, 100)
    last_name = Path(wal.segment_paths()[-1]).name
    wal.close()
    new = tmp_path / segment_name(int(last_name[:20]) + 1)
    full = encode_batch(101, [(int(Op.PUT), b"b%d" % i, b"v") for i in range(4)])
    new.write_bytes(full[:-3])
    with WAL.open(str(tmp_path), WalOptions(segment_bytes_max=SMALL)) as wal:
        assert wal.last_seq == 100 and wal.next_seq == 101
        assert new.stat().st_size == 0
        assert wal.segment_paths()[-1] == str(new)
        # A unit larger than a segment goes into the empty active segment, no new cut.
        assert wal.append(Op.PUT, b"x", b"y" * (2 * SMALL)) == 101
        assert wal.segment_paths()[-1] == str(new)
        assert wal.append(Op.PUT, b"z", b"z") == 102
        assert seqs(wal.entries_from(99)) == [99, 100, 101, 102]
    assert [u.first_seq for u in read_file_units(new)[0]] == [101]


def test_zero_filled_tail_counts_as_torn(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.NONE)) as wal:
        fill(wal, 10)
        path = wal.segment_paths()[-1]
    good_size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)
    with WAL.open(str(tmp_path)) as wal:
        torn = wal.recovery.torn
        assert torn is not None and torn.offset == good_size and torn.bytes_cut == 4096
        assert wal.last_seq == 10
        assert wal.append(Op.PUT, b"after", b"zeros") == 11
    assert Path(torn.kept_at).read_bytes() == b"\0" * 4096
    with WAL.open(str(tmp_path)) as wal:
        assert seqs(wal.entries_from(1)) == list(range(1, 12))
        assert wal.recovery.torn is None


def test_large_torn_tail_is_kept_a_chunk_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cut bytes are copied to the kept file in bounded reads, never read whole."""
    with WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.NONE)) as wal:
        fill(wal, 10)
        path = wal.segment_paths()[-1]
    good_size = os.path.getsize(path)
    tail = 3 * READ_CHUNK_BYTES + 123
    with open(path, "ab") as f:
        f.write(b"\0" * tail)
    reads: list[int] = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    with WAL.open(str(tmp_path)) as wal:
        torn = wal.recovery.torn
        assert torn is not None and torn.offset == good_size and torn.bytes_cut == tail
        assert wal.last_seq == 10
    monkeypatch.undo()
    assert reads and max(reads) <= READ_CHUNK_BYTES
    kept = Path(torn.kept_at).read_bytes()
    assert len(kept) == tail and kept.count(0) == tail
    assert os.path.getsize(path) == good_size
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def _flip_payload_byte(path: str, unit: Unit) -> None:
    raw = bytearray(Path(path).read_bytes())
    at = unit.offset + unit.length - 2  # inside the value: the CRC no longer matches
    raw[at] ^= 0xFF
    Path(path).write_bytes(bytes(raw))


def test_corruption_in_closed_segment_found_by_reader(tmp_path: Path) -> None:
    wal, _ = build_log(tmp_path, 200)
    paths = wal.segment_paths()
    wal.close()
    assert len(paths) >= 4
    victim = paths[1]
    units, _ = read_file_units(victim)
    assert len(units) >= 4
    bad = units[len(units) // 2]
    _flip_payload_byte(victim, bad)
    # open() reads only the first unit of each closed segment: it does not see the damage.
    with WAL.open(str(tmp_path), WalOptions(segment_bytes_max=SMALL)) as wal:
        assert wal.last_seq == 200
        got: list[int] = []
        with pytest.raises(CorruptionError) as info:
            for e in wal.entries_from(1):
                got.append(e.seq)
        assert info.value.path == victim
        assert info.value.offset == bad.offset
        assert victim in str(info.value) and str(bad.offset) in str(info.value)
        assert got == list(range(1, bad.first_seq))  # everything before the damage, no skip
        with pytest.raises(CorruptionError):
            list(wal.entries_from(bad.first_seq + 1))
        # Past the damaged segment reads are fine.
        later = read_file_units(paths[2])[0][0].first_seq
        assert seqs(wal.entries_from(later)) == list(range(later, 201))


def test_corruption_in_middle_of_last_segment_fails_open(tmp_path: Path) -> None:
    wal, _ = build_log(tmp_path, 100)
    wal.close()
    with WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.NONE)) as wal:  # big segments now
        fill(wal, 10, prefix=b"tail")
        paths = wal.segment_paths()
        path = paths[-1]
    assert len(paths) > 2
    units, _ = read_file_units(path)
    assert len(units) >= 10
    bad = units[1]
    _flip_payload_byte(path, bad)
    before = Path(path).read_bytes()
    with pytest.raises(CorruptionError) as info:
        WAL.open(str(tmp_path))
    assert info.value.path == path and info.value.offset == bad.offset
    assert path in str(info.value)
    assert Path(path).read_bytes() == before  # nothing cut
    assert not [n for n in os.listdir(tmp_path) if ".torn-" in n]
    with pytest.raises(CorruptionError):  # the lock was released: same verdict, not WalLocked
        WAL.open(str(tmp_path))


def test_stray_temp_segment_removed_on_open(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path)) as wal:
        wal.append(Op.PUT, b"a", b"1")
    stray = tmp_path / (segment_name(time.time_ns() + 10**9) + ".tmp")
    stray.write_bytes(b"junk")
    with WAL.open(str(tmp_path)) as wal:
        assert wal.last_seq == 1
        assert len(wal.segment_paths()) == 1
    assert not stray.exists()


def test_directory_named_like_a_segment_is_not_one(tmp_path: Path) -> None:
    """Only regular files are segments: the WAL, `wal verify` and `wal dump` skip directories
    named like one (reading one used to fail with EISDIR, naming no path)."""
    with WAL.open(str(tmp_path)) as wal:
        fill(wal, 5)
        real = [os.path.basename(p) for p in wal.segment_paths()]
    (tmp_path / segment_name(1)).mkdir()  # sorts before the real segment
    (tmp_path / segment_name(9 * 10**19)).mkdir()  # sorts after it: would be the active one
    (tmp_path / (segment_name(9 * 10**19 + 1) + ".tmp")).mkdir()  # not a stray temp file
    assert list_segments(str(tmp_path)) == real
    with WAL.open(str(tmp_path)) as wal:
        assert wal.last_seq == 5 and seqs(wal.entries_from(1)) == [1, 2, 3, 4, 5]
        assert [os.path.basename(p) for p in wal.segment_paths()] == real
    out = io.StringIO()
    assert walcli.verify(str(tmp_path), out) == walcli.EXIT_OK
    assert out.getvalue().count("clean, 5 units") == 1
    out = io.StringIO()
    assert walcli.dump(str(tmp_path), 1, False, out) == walcli.EXIT_OK
    assert len(out.getvalue().splitlines()) == 5
    assert (tmp_path / segment_name(1)).is_dir()  # left alone


# ------------------------------------------------------------------------------------- 7. lock


def test_directory_lock(tmp_path: Path) -> None:
    wal = WAL.open(str(tmp_path))
    try:
        with pytest.raises(WalLockedError):
            WAL.open(str(tmp_path))
        wal.append(Op.PUT, b"a", b"1")  # the failed open did not disturb the owner
    finally:
        wal.close()
    with WAL.open(str(tmp_path)) as again:
        assert again.last_seq == 1


def test_invalid_options_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        WAL.open(str(tmp_path), WalOptions(segment_bytes_max=4095))
    with pytest.raises(InvalidArgumentError):
        WAL.open(str(tmp_path), WalOptions(sync_interval_ms=0))
    with WAL.open(str(tmp_path)) as wal:  # the failed opens released the lock
        assert wal.next_seq == 1


# --------------------------------------------------------------------------------- 8. retention


def test_retention_by_min_seq_keep(tmp_path: Path) -> None:
    wal, _ = build_log(tmp_path, 300)
    try:
        ranges = seg_ranges(wal)
        keep = ranges[4][2]  # the last seq of the fifth segment
        deleted = wal.apply_retention(RetentionPolicy(min_seq_keep=keep))
        assert deleted == [r[0] for r in ranges[:4]]
        assert all(not os.path.exists(p) for p in deleted)
        assert wal.segment_paths() == [r[0] for r in ranges[4:]]
        assert seqs(wal.entries_from(keep)) == list(range(keep, 301))
        assert wal.apply_retention(RetentionPolicy(min_seq_keep=keep)) == []
    finally:
        wal.close()


def test_retention_by_total_bytes_deletes_oldest_prefix(tmp_path: Path) -> None:
    wal, _ = build_log(tmp_path, 300)
    try:
        ranges = seg_ranges(wal)
        total = sum(r[3] for r in ranges)
        limit = total // 2
        deleted = wal.apply_retention(RetentionPolicy(max_total_bytes=limit))
        k = len(deleted)
        assert k > 0
        assert deleted == [r[0] for r in ranges[:k]]  # a prefix, oldest first
        remaining = sum(r[3] for r in ranges[k:])
        assert remaining <= limit
        assert remaining + ranges[k - 1][3] > limit  # not one segment more than needed
        assert wal.segment_paths() == [r[0] for r in ranges[k:]]
        # A limit met exactly keeps the log as it is.
        assert wal.apply_retention(RetentionPolicy(max_total_bytes=remaining)) == []
        exact = sum(r[3] for r in ranges[k + 2 :])
        assert wal.apply_retention(RetentionPolicy(max_total_bytes=exact)) == [
            r[0] for r in ranges[k : k + 2]
        ]
        # A limit of zero removes every closed segment but never the active one.
        wal.apply_retention(RetentionPolicy(max_total_bytes=0))
        assert wal.segment_paths() == [ranges[-1][0]]
        assert os.path.exists(ranges[-1][0])
        assert wal.append(Op.PUT, b"still", b"works") == 301
    finally:
        wal.close()


def test_retention_by_age(tmp_path: Path) -> None:
    wal, _ = build_log(tmp_path, 200)
    try:
        paths = wal.segment_paths()
        assert wal.apply_retention(RetentionPolicy(max_age_s=3600), now=time.time()) == []
        assert wal.apply_retention(RetentionPolicy(max_total_bytes=None)) == []
        deleted = wal.apply_retention(RetentionPolicy(max_age_s=3600), now=time.time() + 10**7)
        assert deleted == paths[:-1]
        assert wal.segment_paths() == paths[-1:]
    finally:
        wal.close()


def test_retention_respects_holds(tmp_path: Path) -> None:
    wal, _ = build_log(tmp_path, 300)
    try:
        ranges = seg_ranges(wal)
        held = ranges[3][1] + 2  # inside the fourth segment
        wal.hold("replica-1", held)
        wal.hold("replica-2", ranges[6][1])
        deleted = wal.apply_retention(RetentionPolicy(max_total_bytes=0))
        assert deleted == [r[0] for r in ranges[:3]]
        assert wal.first_seq <= held
        assert seqs(wal.entries_from(held))[0] == held
        wal.release("replica-1")
        deleted = wal.apply_retention(RetentionPolicy(max_total_bytes=0))
        assert deleted == [r[0] for r in ranges[3:6]]  # replica-2 still holds the seventh
        wal.release("replica-2")
        wal.release("unknown")  # harmless
        deleted = wal.apply_retention(RetentionPolicy(max_total_bytes=0))
        assert deleted == [r[0] for r in ranges[6:-1]]
    finally:
        wal.close()


def test_hold_on_the_first_seq_of_a_segment_keeps_it(tmp_path: Path) -> None:
    wal, _ = build_log(tmp_path, 200)
    try:
        ranges = seg_ranges(wal)
        wal.hold("r", ranges[2][1])
        deleted = wal.apply_retention(RetentionPolicy(min_seq_keep=10**9))
        assert deleted == [r[0] for r in ranges[:2]]
        wal.hold("r", ranges[2][2])  # moving a hold replaces it
        deleted = wal.apply_retention(RetentionPolicy(min_seq_keep=10**9))
        assert deleted == []  # the third segment still holds ranges[2][2]
        wal.hold("r", ranges[2][2] + 1)
        assert wal.apply_retention(RetentionPolicy(min_seq_keep=10**9)) == [ranges[2][0]]
    finally:
        wal.close()


def test_newest_closed_kept_while_active_not_durable(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path), NONE_SMALL) as wal:
        while len(wal.segment_paths()) < 4:
            wal.append(Op.PUT, b"k", b"v" * 200)
        assert wal.durable_seq < wal.last_seq  # the active segment's unit is only buffered
        paths = wal.segment_paths()
        deleted = wal.apply_retention(RetentionPolicy(max_total_bytes=0))
        assert deleted == paths[:2]
        assert wal.segment_paths() == paths[2:]
        wal.sync()
        assert wal.apply_retention(RetentionPolicy(max_total_bytes=0)) == [paths[2]]
        last = wal.last_seq
    with WAL.open(str(tmp_path)) as wal:
        assert wal.next_seq == last + 1


def test_retention_failure_is_a_wal_error_naming_the_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wal, _ = build_log(tmp_path, 300)
    try:
        ranges = seg_ranges(wal)
        stuck = ranges[1][0]
        real_unlink = os.unlink

        def unlink(path: str) -> None:
            if path == stuck:
                raise PermissionError(errno.EACCES, "Permission denied")
            real_unlink(path)

        monkeypatch.setattr(os, "unlink", unlink)
        with pytest.raises(WalError, match=re.escape(stuck)) as info:
            wal.apply_retention(RetentionPolicy(min_seq_keep=ranges[4][2]))
        assert isinstance(info.value.__cause__, PermissionError)
        monkeypatch.undo()
        # Oldest first, stopping at the failure: no gap in the files left on disk.
        assert not os.path.exists(ranges[0][0])
        assert all(os.path.exists(r[0]) for r in ranges[1:])
        assert wal.segment_paths() == [r[0] for r in ranges[4:]]
        assert wal.append(Op.PUT, b"still", b"writable") == 301  # the WAL is not failed
    finally:
        wal.close()
    with WAL.open(str(tmp_path), NONE_SMALL) as wal:
        assert wal.first_seq == ranges[1][1]  # the undeleted segments are back, in order
        assert seqs(wal.entries_from(ranges[1][1])) == list(range(ranges[1][1], 302))
        deleted = wal.apply_retention(RetentionPolicy(min_seq_keep=ranges[4][2]))
        assert deleted == [r[0] for r in ranges[1:4]]


@pytest.mark.parametrize("step", ["open", "rename", "fsync_dir"])
def test_segment_cut_failure_is_a_wal_error_and_fails_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    def no_space(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    real_open = os.open

    def open_tmp_fails(path: str, flags: int, mode: int = 0o777) -> int:
        if path.endswith(".wal.tmp"):
            no_space()
        return real_open(path, flags, mode)

    wal = WAL.open(str(tmp_path), NONE_SMALL)
    try:
        fill(wal, 3)
        if step == "open":
            monkeypatch.setattr(os, "open", open_tmp_fails)
        elif step == "rename":
            monkeypatch.setattr(os, "rename", no_space)
        else:
            monkeypatch.setattr(fsutil, "fsync_dir", no_space)
        with pytest.raises(WalError, match="cannot create WAL segment") as info:
            while True:
                failed_seq = wal.next_seq
                wal.append(Op.PUT, b"k", b"v" * 200)
        assert str(tmp_path) in str(info.value) and "No space left" in str(info.value)
        assert isinstance(info.value.__cause__, OSError)
        assert wal.last_seq == failed_seq - 1 and wal.next_seq == failed_seq
        with pytest.raises(WalError, match="failed earlier"):
            wal.append(Op.PUT, b"k", b"v")
        with pytest.raises(WalError, match="failed earlier"):
            wal.append_batch([(Op.PUT, b"k", b"v")])
        monkeypatch.undo()
    finally:
        wal.close()  # no double close of the retired descriptor, the lock released
    with WAL.open(str(tmp_path), NONE_SMALL) as wal:
        assert wal.last_seq == failed_seq - 1
        assert seqs(wal.entries_from(1)) == list(range(1, failed_seq))
        assert wal.append(Op.PUT, b"after", b"restart") == failed_seq
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# --------------------------------------------------------------------------------- 9. observers


def test_observer_sees_entries_batches_and_syncs(tmp_path: Path) -> None:
    rec = Recorder()
    wal = WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.NONE))
    wal.add_observer(rec)
    wal.append(Op.PUT, b"a", b"1")
    wal.append(Op.DELETE, b"b", b"ignored")
    start = wal.append_batch(
        [(Op.PUT, b"c", b"3"), (Op.DELETE, b"d", b"x"), (Op.MERGE, b"e", b"5")]
    )
    wal.sync()
    wal.append(Op.PUT, b"f", b"6", sync=True)
    wal.close()  # drains the dispatcher
    assert [(e.seq, e.op, e.key, e.value) for e in rec.entries] == [
        (1, Op.PUT, b"a", b"1"),
        (2, Op.DELETE, b"b", b""),
        (6, Op.PUT, b"f", b"6"),
    ]
    assert start == 3
    assert len(rec.batches) == 1
    bstart, bentries = rec.batches[0]
    assert bstart == 3
    assert [(e.seq, e.op, e.key, e.value) for e in bentries] == [
        (3, Op.PUT, b"c", b"3"),
        (4, Op.DELETE, b"d", b""),
        (5, Op.MERGE, b"e", b"5"),
    ]
    assert rec.synced[:2] == [5, 6]
    assert rec.missed == 0


def test_observer_that_raises_does_not_break_appends(tmp_path: Path) -> None:
    bad = Exploding()
    good = Recorder()
    wal = WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.NONE))
    wal.add_observer(bad)
    wal.add_observer(good)
    got = [wal.append(Op.PUT, b"k%d" % i, b"v") for i in range(50)]
    wal.close()
    assert got == list(range(1, 51))
    assert [e.seq for e in good.entries] == got
    assert len(bad.entries) == 50  # it kept being called after raising
    with WAL.open(str(tmp_path)) as wal:
        assert wal.last_seq == 50


def test_slow_observer_does_not_block_writers(tmp_path: Path) -> None:
    slow = Recorder(sleep_s=0.005)
    wal = WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.NONE, observer_queue_max=4))
    wal.add_observer(slow)
    for i in range(1000):
        wal.append(Op.PUT, b"k%d" % i, b"v")
    calls_when_done = slow.calls
    # Had writers waited for the observer, it would have been called ~1000 times by now.
    assert calls_when_done < 200
    assert wait_for(lambda: slow.missed >= 1)
    wal.close()  # returns although the observer is slow
    assert slow.missed >= 1
    assert len(slow.entries) < 100
    assert wal.last_seq == 1000
    with WAL.open(str(tmp_path)) as again:
        assert again.last_seq == 1000


# ------------------------------------------------------------------------------ 10. misuse


def test_closed_wal_and_invalid_arguments(tmp_path: Path) -> None:
    wal = WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.NONE))
    wal.append(Op.PUT, b"a", b"1")
    with pytest.raises(InvalidArgumentError):
        wal.append(cast(Op, 4), b"k", b"v")
    with pytest.raises(InvalidArgumentError):
        wal.append(cast(Op, 0), b"k", b"v")
    with pytest.raises(InvalidArgumentError):
        wal.append_batch([])
    with pytest.raises(InvalidArgumentError):
        wal.append_batch([(Op.PUT, b"a", b"1"), (cast(Op, 9), b"b", b"2")])
    with pytest.raises(InvalidArgumentError):
        asyncio.run(wal.append_batch_async([]))
    assert wal.next_seq == 2 and wal.last_seq == 1  # nothing consumed a number
    wal.close()
    wal.close()  # idempotent
    with pytest.raises(WalClosedError):
        wal.append(Op.PUT, b"b", b"2")
    with pytest.raises(WalClosedError):
        wal.append_batch([(Op.PUT, b"b", b"2")])
    with pytest.raises(WalClosedError):
        asyncio.run(wal.append_async(Op.PUT, b"b", b"2"))
    with pytest.raises(WalClosedError):
        list(wal.entries_from(1))
    with WAL.open(str(tmp_path)) as again:
        assert seqs(again.entries_from(1)) == [1]


# ------------------------------------------------------------------ 11. Kevo HEAD equal-seq form


def _write_equal_seq_segments(directory: Path) -> tuple[Path, Path]:
    a = directory / segment_name(1_700_000_000_000_000_000)
    b = directory / segment_name(1_700_000_000_000_000_001)
    a.write_bytes(
        encode_entry(1, Op.PUT, b"one", b"1" * 30)
        + encode_entry(2, Op.PUT, b"two", b"2" * 30)
        + encode_entry(3, Op.PUT, b"x", b"a" * 30)
        + encode_entry(3, Op.DELETE, b"y")
        + encode_entry(3, Op.PUT, b"z", b"c" * 30)
        + encode_entry(4, Op.PUT, b"four", b"4")
    )
    b.write_bytes(encode_entry(5, Op.PUT, b"five", b"5"))
    return a, b


def test_head_equal_seq_units_in_closed_segment(tmp_path: Path) -> None:
    _write_equal_seq_segments(tmp_path)
    options = WalOptions(sync_mode=SyncMode.NONE, index_every_bytes=1)
    with WAL.open(str(tmp_path), options) as wal:
        assert wal.last_seq == 5 and wal.next_seq == 6
        expected = [(3, b"x"), (3, b"y"), (3, b"z"), (4, b"four"), (5, b"five")]
        first = [(e.seq, e.key) for e in wal.entries_from(3)]  # builds the index while reading
        assert first == expected
        second = [(e.seq, e.key) for e in wal.entries_from(3)]  # now uses it
        assert second == expected
        assert [(e.seq, e.key) for e in wal.entries_from(4)] == expected[3:]
        assert [u.first_seq for u in wal.units_from(2)] == [2, 3, 3, 3, 4, 5]
        assert wal.append(Op.PUT, b"six", b"6") == 6
    with WAL.open(str(tmp_path), options) as wal:
        assert [(e.seq, e.key) for e in wal.entries_from(3)][:3] == expected[:3]


def test_head_equal_seq_units_in_last_segment(tmp_path: Path) -> None:
    _, b = _write_equal_seq_segments(tmp_path)
    b.unlink()  # the equal-seq segment is the last one: indexed during recovery
    options = WalOptions(sync_mode=SyncMode.NONE, index_every_bytes=1)
    with WAL.open(str(tmp_path), options) as wal:
        assert wal.last_seq == 4
        assert [(e.seq, e.key) for e in wal.entries_from(3)] == [
            (3, b"x"),
            (3, b"y"),
            (3, b"z"),
            (4, b"four"),
        ]
        assert wal.append(Op.PUT, b"five", b"5") == 5
        assert [e.key for e in wal.entries_from(3)] == [b"x", b"y", b"z", b"four", b"five"]


# ---------------------------------------------------------------- bugs found in review (fixed)


def test_append_racing_close_is_not_lost(tmp_path: Path) -> None:
    wal = WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.NONE))
    wal.append(Op.PUT, b"a", b"1")
    real_sync = wal.sync
    refused: list[BaseException] = []

    def sync_then_concurrent_append() -> int:
        # What another thread can do while close() runs its final sync.
        durable = real_sync()
        try:
            wal.append(Op.PUT, b"late", b"2")
        except WalClosedError as err:
            refused.append(err)
        return durable

    wal.sync = sync_then_concurrent_append  # type: ignore[method-assign]
    wal.close()
    # The append was refused rather than acknowledged and then lost.
    assert len(refused) == 1
    with WAL.open(str(tmp_path)) as again:
        assert [e.key for e in again.entries_from(1)] == [b"a"]


def test_rotation_without_sync_does_not_leak_fds(tmp_path: Path) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with WAL.open(str(tmp_path), NONE_SMALL) as wal:
        before = open_fds()
        while len(wal.segment_paths()) < 60:
            wal.append(Op.PUT, b"k", b"v" * 500)
        assert open_fds() - before < 10


def test_wait_durable_after_close_fails_fast(tmp_path: Path) -> None:
    wal = WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.IMMEDIATE))
    asyncio.run(wal.append_async(Op.PUT, b"a", b"1"))  # starts the sync thread
    wal.close()

    async def wait() -> int:
        return await asyncio.wait_for(wal.wait_durable(wal.last_seq + 1), 1.0)

    # Without the sync thread ever started the same call raises WalClosedError at once.
    with pytest.raises(WalClosedError):
        asyncio.run(wait())


def test_entries_from_zero_on_uncompacted_log(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path)) as wal:
        wal.append(Op.PUT, b"a", b"1")
        wal.append(Op.PUT, b"b", b"2")
        assert seqs(wal.entries_from(0)) == [1, 2]
