"""The in-memory WAL tail window (`kevo_repl.wal.tail.TailWindow`, `WAL.tail_take`).

Covered: the window's memory bound, eviction and consecutiveness; `take`'s contract (None outside
the window, whole units, the first unit always, limits checked after each unit, `max_seq`);
compaction of evicted slots; a model check of `TailWindow` against `take_units` over the same
units; byte-for-byte equivalence of `WAL.tail_take` with what the segment path
(`units_from(raw=True)` + `take_units`) would ship, over random logs with fragmented records,
batches and segment rotation; every append path feeding the window; a replica's WAL fed by
`append_units[_nowait]` serving the same tail as its source; and the window off / closed WAL.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kevo_repl.errors import WalClosedError
from kevo_repl.repl.frames import Codec, decode_frame_raw, encode_frame, encode_raw_frame
from kevo_repl.repl.primary import StreamLimits, take_units
from kevo_repl.wal import WAL, BatchForm, Entry, Op, SyncMode, Unit, WalOptions
from kevo_repl.wal.codec import encode_batch, encode_entry
from kevo_repl.wal.tail import UNIT_OVERHEAD_BYTES, TailSlice, TailWindow

BIG = 1 << 60  # "no limit" for take's max_bytes / max_entries

# ---------------------------------------------------------------------------------------------
# Helpers


def _unit_bytes(first: int, last: int, size: int = 20) -> bytes:
    """Arbitrary bytes standing for a unit (the window never decodes them)."""
    return (b"%d-%d:" % (first, last)).ljust(size, b".")


def _fake_unit(first: int, last: int, data: bytes) -> Unit:
    """A Unit as take_units sees it: entries, length and raw are all it reads."""
    entries = tuple(Entry(s, Op.PUT, b"k") for s in range(first, last + 1))
    form = BatchForm.SINGLE if first == last else BatchForm.SEED_HEADER
    return Unit(entries, 0, len(data), form, first, last, data)


def _fill_window(window: TailWindow, sizes: Sequence[tuple[int, int]], start: int = 1) -> int:
    """Add units of (entry count, byte size); returns the next sequence."""
    seq = start
    for count, size in sizes:
        window.add(seq, seq + count - 1, _unit_bytes(seq, seq + count - 1, size))
        seq += count
    return seq


def _held_units(window: TailWindow, newest: int) -> list[tuple[int, int]]:
    """(first, last) of every unit the window holds, by walking take one unit at a time."""
    first = window.first_seq
    held: list[tuple[int, int]] = []
    seq = first if first is not None else newest + 1
    while seq <= newest:
        got = window.take(seq, BIG, 0, 0)  # limits of 0: the first unit only
        assert got is not None, f"seq {seq} missing inside the window"
        assert got.first_seq == seq, "units held are not consecutive"
        held.append((got.first_seq, got.last_seq))
        seq = got.last_seq + 1
    return held


def _model_take(
    units: Sequence[Unit], seq: int, max_seq: int, max_bytes: int, max_entries: int
) -> TailSlice | None:
    """What the contract says take returns for the held `units`, via take_units itself."""
    if not units or seq < units[0].first_seq or seq > units[-1].last_seq or max_seq < seq:
        return None
    start = next(i for i, u in enumerate(units) if u.last_seq >= seq)
    candidates: Iterator[Unit] = iter(
        [u for u in units[start:] if u is units[start] or u.first_seq <= max_seq]
    )
    limits = StreamLimits(frame_bytes_max=max_bytes, frame_entries_max=max_entries)
    taken = take_units(candidates, limits)
    return TailSlice(
        taken[0].first_seq,
        taken[-1].last_seq,
        b"".join(u.raw for u in taken),
        sum(len(u.entries) for u in taken),
    )


def _fitting_suffix(units: Sequence[Unit], max_bytes: int) -> list[Unit]:
    """The longest suffix of `units` whose bytes plus overhead fit `max_bytes`: what FIFO
    eviction after every add must leave."""
    kept: list[Unit] = []
    total = 0
    for unit in reversed(units):
        total += unit.length + UNIT_OVERHEAD_BYTES
        if total > max_bytes:
            break
        kept.append(unit)
    kept.reverse()
    return kept


# ---------------------------------------------------------------------------------------------
# TailWindow on its own


def test_eviction_keeps_memory_bounded_and_units_consecutive() -> None:
    window = TailWindow(1000)
    sizes: list[int] = []  # byte size of every unit added, oldest first
    seq = 1
    for i in range(200):
        count, size = 1 + i % 3, 10 + (i * 37) % 300
        window.add(seq, seq + count - 1, _unit_bytes(seq, seq + count - 1, size))
        sizes.append(size)
        seq += count
        assert window.bytes_held <= window.max_bytes
        held = _held_units(window, seq - 1)  # asserts they are consecutive
        assert held, "a unit that fits the bound on its own is always kept"
        assert held[-1][1] == seq - 1  # the newest unit is held
        assert len(window) == len(held)
        assert window.bytes_held == sum(sizes[-len(held) :]) + UNIT_OVERHEAD_BYTES * len(held)
        # Only as much is evicted as needed: one more older unit would not have fitted.
        if len(held) < len(sizes):
            older = sizes[-len(held) - 1] + UNIT_OVERHEAD_BYTES
            assert window.bytes_held + older > window.max_bytes


def _bytes_referenced(window: TailWindow) -> int:
    """Bytes of every bytes-like object the window's attributes reach (its real footprint)."""
    total, seen = 0, set()
    stack: list[object] = [vars(window)]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, bytes | bytearray | memoryview):
            total += len(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple):
            stack.extend(obj)
    return total


def test_evicted_units_release_their_bytes_before_compaction() -> None:
    """Eviction lets go of a unit's bytes at once, not when the slots are compacted (4096 of
    them later): what the window references stays within `max_bytes`."""
    window = TailWindow(100_000)
    seq = 1
    for i in range(3000):  # fewer than the compaction threshold of evicted slots
        window.add(seq, seq, bytes([i % 251]) * 10_000)  # a distinct object every time
        seq += 1
        if i % 97 == 0 or i == 2999:
            assert _bytes_referenced(window) <= window.max_bytes
            assert _bytes_referenced(window) == window.bytes_held - UNIT_OVERHEAD_BYTES * len(
                window
            )
    assert window.first_seq is not None and len(window) == 9
    got = window.take(window.first_seq, BIG, BIG, BIG)
    assert got is not None and got.last_seq == seq - 1 and len(got.raw) == 9 * 10_000


def test_unit_larger_than_the_bound_empties_the_window() -> None:
    window = TailWindow(1000)
    nxt = _fill_window(window, [(1, 50)] * 4)
    assert len(window) == 4 and window.first_seq == 1
    window.add(nxt, nxt + 2, b"x" * 1000)  # 1000 + overhead > 1000
    assert len(window) == 0
    assert window.bytes_held == 0
    assert window.first_seq is None
    for seq in range(0, nxt + 5):
        assert window.take(seq, BIG, BIG, BIG) is None
    # The next unit starts the window again.
    window.add(nxt + 3, nxt + 3, b"y" * 10)
    assert window.first_seq == nxt + 3
    assert window.take(nxt + 3, BIG, BIG, BIG) == TailSlice(nxt + 3, nxt + 3, b"y" * 10, 1)
    assert window.take(nxt + 2, BIG, BIG, BIG) is None  # inside the evicted unit


def test_take_outside_the_window_or_below_max_seq_is_none() -> None:
    window = TailWindow(10 * (20 + UNIT_OVERHEAD_BYTES))
    _fill_window(window, [(1, 20)] * 15)  # seqs 1..15, the window keeps 6..15
    assert window.first_seq == 6
    assert window.take(5, BIG, BIG, BIG) is None  # older than the oldest held
    assert window.take(0, BIG, BIG, BIG) is None
    assert window.take(16, BIG, BIG, BIG) is None  # newer than the newest
    assert window.take(10, 9, BIG, BIG) is None  # max_seq < seq
    got = window.take(10, 10, BIG, BIG)
    assert got is not None and (got.first_seq, got.last_seq) == (10, 10)
    assert TailWindow(10_000).take(1, BIG, BIG, BIG) is None  # empty


def test_take_inside_a_batch_returns_the_whole_unit() -> None:
    window = TailWindow(100_000)
    window.add(1, 1, b"a" * 10)
    window.add(2, 6, b"batch" * 5)
    window.add(7, 7, b"c" * 10)
    for seq in range(2, 7):
        assert window.take(seq, BIG, 0, 0) == TailSlice(2, 6, b"batch" * 5, 5)
    # max_seq inside the batch: the unit holding seq is whole anyway, nothing after it.
    assert window.take(4, 5, BIG, BIG) == TailSlice(2, 6, b"batch" * 5, 5)
    # Starting mid-batch, later units follow.
    assert window.take(3, BIG, BIG, BIG) == TailSlice(2, 7, b"batch" * 5 + b"c" * 10, 6)


def test_first_unit_is_taken_even_over_the_limits() -> None:
    window = TailWindow(100_000)
    window.add(1, 3, b"x" * 5000)
    window.add(4, 4, b"y")
    assert window.take(1, BIG, 100, 1) == TailSlice(1, 3, b"x" * 5000, 3)
    assert window.take(2, BIG, 1, BIG) == TailSlice(1, 3, b"x" * 5000, 3)


def test_limits_stop_after_the_unit_that_reaches_them() -> None:
    window = TailWindow(100_000)
    _fill_window(window, [(1, 100), (2, 100), (1, 100), (3, 100), (1, 100)])  # seqs 1..8
    # Bytes: 100 < 250, 200 < 250, 300 >= 250 -> three units, stop.
    got = window.take(1, BIG, 250, BIG)
    assert got is not None and (got.first_seq, got.last_seq, got.entries) == (1, 4, 4)
    assert len(got.raw) == 300
    # Exactly reaching the byte limit stops too (>=, as take_units).
    got = window.take(1, BIG, 200, BIG)
    assert got is not None and (got.last_seq, len(got.raw)) == (3, 200)
    # Entries: 1, 3 (>= 2) -> stop after the batch, even though it went past 2.
    got = window.take(1, BIG, BIG, 2)
    assert got is not None and (got.last_seq, got.entries) == (3, 3)
    got = window.take(1, BIG, BIG, 4)
    assert got is not None and (got.last_seq, got.entries) == (4, 4)
    got = window.take(1, BIG, BIG, 5)
    assert got is not None and (got.last_seq, got.entries) == (7, 7)


def test_units_starting_after_max_seq_are_not_taken() -> None:
    window = TailWindow(100_000)
    _fill_window(window, [(1, 10), (3, 10), (1, 10), (1, 10)])  # 1 | 2..4 | 5 | 6
    got = window.take(1, 1, BIG, BIG)
    assert got is not None and got.last_seq == 1
    # A unit that starts at or before max_seq is taken whole, even past max_seq.
    got = window.take(1, 2, BIG, BIG)
    assert got is not None and (got.last_seq, got.entries) == (4, 4)
    got = window.take(1, 5, BIG, BIG)
    assert got is not None and got.last_seq == 5


def test_clear_empties_and_the_window_restarts() -> None:
    window = TailWindow(10_000)
    _fill_window(window, [(1, 10)] * 5)
    window.clear()
    assert (len(window), window.bytes_held, window.first_seq) == (0, 0, None)
    assert window.take(3, BIG, BIG, BIG) is None
    window.add(100, 101, b"z" * 7)
    assert window.take(101, BIG, BIG, BIG) == TailSlice(100, 101, b"z" * 7, 2)


def test_compaction_keeps_take_working() -> None:
    bound = 8 * (16 + UNIT_OVERHEAD_BYTES)
    window = TailWindow(bound)
    added: list[Unit] = []
    seq = 1
    for i in range(4096 * 2 + 777):
        count = 1 + i % 2
        data = _unit_bytes(seq, seq + count - 1, 16)
        window.add(seq, seq + count - 1, data)
        added.append(_fake_unit(seq, seq + count - 1, data))
        seq += count
        if i % 1000 == 0 or i > 4096 * 2 - 5:
            assert window.bytes_held <= bound
            kept = _fitting_suffix(added, bound)
            assert window.first_seq == kept[0].first_seq
            assert len(window) == len(kept)
    kept = _fitting_suffix(added, bound)
    for s in range(kept[0].first_seq - 3, seq + 2):
        for max_bytes, max_entries in ((BIG, BIG), (40, BIG), (BIG, 3)):
            expected = _model_take(kept, s, seq - 1, max_bytes, max_entries)
            assert window.take(s, seq - 1, max_bytes, max_entries) == expected


_unit_spec = st.tuples(st.integers(1, 4), st.integers(1, 400))


@given(
    bound=st.integers(50, 2500),
    plan=st.lists(
        st.one_of(
            _unit_spec.map(lambda u: ("add", u)),
            st.tuples(st.integers(0, 6), st.integers(0, 700), st.integers(0, 5)).map(
                lambda t: ("take", t)
            ),
            st.just(("clear", None)),
        ),
        max_size=60,
    ),
)
@settings(max_examples=150, deadline=None)
def test_window_matches_a_model(
    bound: int, plan: list[tuple[str, tuple[int, int] | tuple[int, int, int] | None]]
) -> None:
    """Random adds, takes and clears against the contract (FIFO eviction + take_units rule)."""
    window = TailWindow(bound)
    added: list[Unit] = []  # since the last clear
    seq = 1
    for action, arg in plan:
        if action == "add":
            assert arg is not None and len(arg) == 2
            count, size = arg
            data = _unit_bytes(seq, seq + count - 1, size)
            window.add(seq, seq + count - 1, data)
            added.append(_fake_unit(seq, seq + count - 1, data))
            seq += count
            assert window.bytes_held <= bound
        elif action == "clear":
            window.clear()
            added.clear()
            seq += 3  # a restarted window need not continue the old numbering
        else:
            assert arg is not None and len(arg) == 3
            back, max_bytes, max_entries = arg
            kept = _fitting_suffix(added, bound)
            assert len(window) == len(kept)
            assert window.first_seq == (kept[0].first_seq if kept else None)
            assert window.bytes_held == sum(u.length + UNIT_OVERHEAD_BYTES for u in kept)
            for s in range(seq - 20, seq + 1):
                for max_seq in (seq - 1, s + back, s - 1):
                    got = window.take(s, max_seq, max_bytes, max_entries)
                    assert got == _model_take(kept, s, max_seq, max_bytes, max_entries), (
                        s,
                        max_seq,
                    )


# ---------------------------------------------------------------------------------------------
# The WAL's window against its segments

# One operation: ("put" | "del", key, value size, nowait) or ("batch", [(op, key, size)], nowait).
_value_size = st.one_of(
    st.integers(0, 200),
    st.integers(0, 200),
    st.integers(0, 200),
    st.integers(0, 1500),
    st.integers(32 * 1024 - 30, 70_000),  # fragmented (FIRST/MIDDLE/LAST records)
)
_key = st.binary(min_size=0, max_size=12)
_single = st.tuples(st.sampled_from(["put", "del"]), _key, _value_size, st.booleans())
_batch_op = st.tuples(st.sampled_from([Op.PUT, Op.DELETE, Op.MERGE]), _key, _value_size)
_batch = st.tuples(st.just("batch"), st.lists(_batch_op, min_size=1, max_size=5), st.booleans())
_operations = st.lists(st.one_of(_single, _single, _batch), min_size=1, max_size=30)


def _value(size: int, salt: int) -> bytes:
    return bytes((salt + i) % 251 for i in range(min(size, 251))) * (size // 251) + bytes(
        (salt + i) % 251 for i in range(size % 251)
    )


def _apply(wal: WAL, operations: Sequence[tuple[object, ...]]) -> None:
    for n, operation in enumerate(operations):
        if operation[0] == "batch":
            _, raw_ops, nowait = operation
            assert isinstance(raw_ops, list)
            ops = [(op, key, _value(size, n + j)) for j, (op, key, size) in enumerate(raw_ops)]
            if nowait:
                wal.append_batch_nowait(ops)
            else:
                wal.append_batch(ops)
        else:
            kind, key, size, nowait = operation
            assert isinstance(key, bytes) and isinstance(size, int)
            op = Op.PUT if kind == "put" else Op.DELETE
            if nowait:
                wal.append_nowait(op, key, _value(size, n))
            else:
                wal.append(op, key, _value(size, n))


def _segment_take(wal: WAL, seq: int, max_seq: int, max_bytes: int, max_entries: int) -> list[Unit]:
    limits = StreamLimits(frame_bytes_max=max_bytes, frame_entries_max=max_entries)
    return take_units(wal.units_from(seq, max_seq=max_seq, raw=True), limits)


def _check_tail_matches_segments(
    wal: WAL, window_bytes: int, limits: Sequence[tuple[int, int]], max_seq_back: int
) -> None:
    """Every seq the window holds is served exactly as the segment path would serve it; the
    window holds exactly the longest suffix of units that fits its bound."""
    last = wal.last_seq
    all_units = list(wal.units_from(1, raw=True))
    assert all_units and all_units[-1].last_seq == last
    kept = _fitting_suffix(all_units, window_bytes)
    held_from = kept[0].first_seq if kept else last + 1
    assert wal.tail_take(last + 1, last + 1, BIG, BIG) is None  # newer than the newest
    for seq in range(1, last + 1):
        got = wal.tail_take(seq, last, BIG, BIG)
        if seq < held_from:
            assert got is None, f"seq {seq} is older than the window (held from {held_from})"
            served = _segment_take(wal, seq, last, 1, 1)  # the segments still serve it
            assert served and served[0].first_seq <= seq <= served[0].last_seq
            continue
        assert got is not None, f"seq {seq} should be in the window (held from {held_from})"
        for max_bytes, max_entries in limits:
            for max_seq in (last, min(last, seq + max_seq_back)):
                got = wal.tail_take(seq, max_seq, max_bytes, max_entries)
                units = _segment_take(wal, seq, max_seq, max_bytes, max_entries)
                assert got is not None and units
                where = (seq, max_seq, max_bytes, max_entries)
                assert got.raw == b"".join(u.raw for u in units), where
                assert (got.first_seq, got.last_seq) == (units[0].first_seq, units[-1].last_seq)
                assert got.entries == sum(len(u.entries) for u in units), where
        assert wal.tail_take(seq, seq - 1, BIG, BIG) is None  # max_seq < seq


@given(
    operations=_operations,
    window_bytes=st.integers(2000, 20_000),
    limits=st.lists(st.tuples(st.integers(1, 9000), st.integers(1, 12)), min_size=1, max_size=3),
    max_seq_back=st.integers(0, 6),
)
@settings(max_examples=40, deadline=None)
def test_tail_take_equals_the_segment_path(
    operations: list[tuple[object, ...]],
    window_bytes: int,
    limits: list[tuple[int, int]],
    max_seq_back: int,
) -> None:
    options = WalOptions(
        sync_mode=SyncMode.NONE, tail_window_bytes=window_bytes, segment_bytes_max=4096
    )
    with tempfile.TemporaryDirectory() as tmp, WAL.open(tmp, options) as wal:
        _apply(wal, operations)
        _check_tail_matches_segments(wal, window_bytes, [*limits, (BIG, BIG)], max_seq_back)


def _small_log(wal: WAL, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        if i % 7 == 3:
            wal.append_batch([(Op.PUT, b"b%d" % i, b"x" * (i % 50)), (Op.DELETE, b"d", b"")])
        elif i % 23 == 11:
            wal.append(Op.PUT, b"big%d" % i, _value(40_000 + i, i))  # fragmented, > the window
        else:
            wal.append(Op.MERGE if i % 5 == 0 else Op.PUT, b"k%d" % i, _value(i % 120, i))


def test_tail_take_equals_the_segment_path_with_rotation(tmp_path: Path) -> None:
    """A deterministic case: many rotations, windows that hold nothing, some and a lot."""
    for window_bytes in (2000, 9000, 200_000):
        options = WalOptions(
            sync_mode=SyncMode.NONE, tail_window_bytes=window_bytes, segment_bytes_max=4096
        )
        with WAL.open(str(tmp_path / str(window_bytes)), options) as wal:
            _small_log(wal, 60)
            assert len(wal.segment_paths()) > 5
            _check_tail_matches_segments(wal, window_bytes, [(1, 1), (700, 4), (BIG, BIG)], 3)


def test_every_append_path_feeds_the_window(tmp_path: Path) -> None:
    src_options = WalOptions(sync_mode=SyncMode.NONE, segment_bytes_max=4096)
    with WAL.open(str(tmp_path / "src"), src_options) as src:
        _small_log(src, 12)
        units = list(src.units_from(1, raw=True))
    options = WalOptions(
        sync_mode=SyncMode.BATCH, tail_window_bytes=1 << 20, segment_bytes_max=4096
    )

    async def async_appends(wal: WAL) -> None:
        await wal.append_async(Op.PUT, b"async", b"1")
        await wal.append_batch_async([(Op.PUT, b"ab1", b"2"), (Op.DELETE, b"ab2", b"")])

    with WAL.open(str(tmp_path / "dst"), options) as wal:
        third = len(units) // 3
        wal.append_units(units[:third])
        wal.append_units_nowait(units[third : 2 * third])
        frame = encode_frame(units[2 * third :], Codec.NONE)
        raw, decoded = decode_frame_raw(frame)
        wal.append_units_nowait(decoded, raw)
        wal.append(Op.PUT, b"a", b"1")
        wal.append_nowait(Op.DELETE, b"b")
        wal.append_batch([(Op.PUT, b"c", b"3"), (Op.MERGE, b"d", b"4")])
        wal.append_batch_nowait([(Op.PUT, b"e", b"5")])
        asyncio.run(async_appends(wal))
        got = wal.tail_take(1, wal.last_seq, BIG, BIG)
        on_disk = list(wal.units_from(1, raw=True))
        assert got is not None
        assert (got.first_seq, got.last_seq) == (1, wal.last_seq)
        assert got.raw == b"".join(u.raw for u in on_disk)
        assert got.entries == sum(len(u.entries) for u in on_disk) == wal.last_seq
        # The copied part is the source's bytes exactly.
        assert got.raw.startswith(b"".join(u.raw for u in units))


def test_window_starts_empty_after_reopen(tmp_path: Path) -> None:
    options = WalOptions(sync_mode=SyncMode.NONE, tail_window_bytes=50_000)
    with WAL.open(str(tmp_path), options) as wal:
        _small_log(wal, 10)
        before = wal.last_seq
        assert wal.tail_take(before, before, BIG, BIG) is not None
    with WAL.open(str(tmp_path), options) as wal:
        assert wal.tail_take(before, before, BIG, BIG) is None  # not in memory any more
        wal.append(Op.PUT, b"after", b"reopen")
        got = wal.tail_take(before, wal.last_seq, BIG, BIG)
        assert got is None
        got = wal.tail_take(before + 1, wal.last_seq, BIG, BIG)
        assert got is not None and got.raw == encode_entry(before + 1, Op.PUT, b"after", b"reopen")


# ---------------------------------------------------------------------------------------------
# A replica's WAL fed by frames


def _copy_by_frames(src: WAL, dst: WAL, frame_bytes: int, frame_entries: int, raw: bool) -> None:
    seq = 1
    limits = StreamLimits(frame_bytes_max=frame_bytes, frame_entries_max=frame_entries)
    while seq <= src.last_seq:
        units = take_units(src.units_from(seq, max_seq=src.last_seq, raw=True), limits)
        payload, decoded = decode_frame_raw(encode_frame(units, Codec.NONE))
        if raw:
            dst.append_units_nowait(decoded, payload)
        else:
            dst.append_units(decoded)
        seq = decoded[-1].last_seq + 1


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("window_bytes", [2000, 12_000])
def test_replica_copy_serves_the_same_tail(tmp_path: Path, raw: bool, window_bytes: int) -> None:
    options = WalOptions(
        sync_mode=SyncMode.NONE, tail_window_bytes=window_bytes, segment_bytes_max=4096
    )
    with (
        WAL.open(str(tmp_path / "src"), options) as src,
        WAL.open(str(tmp_path / "dst"), options) as dst,
    ):
        _small_log(src, 70)
        _copy_by_frames(src, dst, frame_bytes=3000, frame_entries=9, raw=raw)
        assert dst.last_seq == src.last_seq
        held = 0
        for seq in range(1, src.last_seq + 2):
            for max_bytes, max_entries in ((1, 1), (900, 5), (BIG, BIG)):
                want = src.tail_take(seq, src.last_seq, max_bytes, max_entries)
                assert dst.tail_take(seq, dst.last_seq, max_bytes, max_entries) == want
                held += want is not None
        assert held > 0
        _check_tail_matches_segments(dst, window_bytes, [(900, 5), (BIG, BIG)], 2)


def test_replica_copy_of_the_window_itself(tmp_path: Path) -> None:
    """A replica fed straight from the primary's window (the live path) keeps the same bytes."""
    options = WalOptions(sync_mode=SyncMode.NONE, tail_window_bytes=1 << 20)
    with (
        WAL.open(str(tmp_path / "src"), options) as src,
        WAL.open(str(tmp_path / "dst"), options) as dst,
    ):
        _small_log(src, 40)
        seq = 1
        while seq <= src.last_seq:
            got = src.tail_take(seq, src.last_seq, 2000, 7)
            assert got is not None
            payload, decoded = decode_frame_raw(
                encode_raw_frame(got.first_seq, got.last_seq, got.raw, Codec.NONE)
            )
            dst.append_units_nowait(decoded, payload)
            seq = got.last_seq + 1
        whole = src.tail_take(1, src.last_seq, BIG, BIG)
        assert whole is not None
        assert dst.tail_take(1, dst.last_seq, BIG, BIG) == whole
        assert b"".join(u.raw for u in dst.units_from(1, raw=True)) == whole.raw


# ---------------------------------------------------------------------------------------------
# Window off, WAL closed


def test_tail_take_without_the_window_is_none(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.NONE)) as wal:
        wal.append(Op.PUT, b"a", b"1")
        wal.append_batch([(Op.PUT, b"b", b"2"), (Op.PUT, b"c", b"3")])
        for seq in range(0, 5):
            assert wal.tail_take(seq, wal.last_seq, BIG, BIG) is None
        assert list(wal.units_from(1))  # the segments serve them


@pytest.mark.parametrize("window_bytes", [0, 10_000])
def test_tail_take_after_close_raises(tmp_path: Path, window_bytes: int) -> None:
    options = WalOptions(sync_mode=SyncMode.NONE, tail_window_bytes=window_bytes)
    wal = WAL.open(str(tmp_path), options)
    wal.append(Op.PUT, b"a", b"1")
    wal.close()
    with pytest.raises(WalClosedError):
        wal.tail_take(1, 1, BIG, BIG)


def test_batch_bytes_in_the_window_are_the_encoded_batch(tmp_path: Path) -> None:
    options = WalOptions(sync_mode=SyncMode.NONE, tail_window_bytes=10_000)
    ops = [(Op.PUT, b"x", b"1"), (Op.DELETE, b"y", b""), (Op.MERGE, b"z", b"3")]
    with WAL.open(str(tmp_path), options) as wal:
        wal.append(Op.PUT, b"first", b"0")
        start = wal.append_batch(ops)
        for seq in range(start, start + 3):
            got = wal.tail_take(seq, wal.last_seq, BIG, BIG)
            assert got == TailSlice(start, start + 2, encode_batch(start, ops), 3)


def test_empty_batch_counts_like_the_segment_path(tmp_path: Path) -> None:
    """A replica fed a frame holding an empty batch (Kevo can write one; frames accept it)."""
    raw = (
        encode_entry(1, Op.PUT, b"a", b"1")
        + encode_batch(2, [])
        + encode_entry(3, Op.PUT, b"b", b"2")
    )
    payload, units = decode_frame_raw(encode_raw_frame(1, 3, raw, Codec.NONE))
    assert [len(u.entries) for u in units] == [1, 0, 1]
    options = WalOptions(sync_mode=SyncMode.NONE, tail_window_bytes=10_000)
    with WAL.open(str(tmp_path), options) as wal:
        wal.append_units_nowait(units, payload)
        got = wal.tail_take(2, 3, BIG, 1)
        taken = _segment_take(wal, 2, 3, BIG, 1)
        assert got is not None and taken
        # Both count a unit's sequences, so the empty batch counts 1 on either path.
        assert got.entries == sum(u.last_seq - u.first_seq + 1 for u in taken) == 1
        assert (got.first_seq, got.last_seq) == (taken[0].first_seq, taken[-1].last_seq)
        assert got.raw == b"".join(u.raw for u in taken)
