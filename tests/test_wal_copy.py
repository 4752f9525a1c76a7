"""WAL APIs for replication: copying units with their sequence numbers, and sync listeners."""

from __future__ import annotations

from pathlib import Path

import pytest

from kevo_repl.errors import InvalidArgumentError
from kevo_repl.wal import WAL, Op, SyncMode, WalOptions


def _source(path: Path) -> WAL:
    wal = WAL.open(str(path), WalOptions(sync_mode=SyncMode.NONE, segment_bytes_max=4096))
    for i in range(30):
        wal.append(Op.PUT, b"k%d" % i, b"v" * (i * 3))
    wal.append_batch([(Op.PUT, b"b1", b"x"), (Op.DELETE, b"b2", b""), (Op.MERGE, b"b3", b"m")])
    wal.append(Op.PUT, b"big", b"z" * 70_000)  # fragmented
    return wal


def test_append_units_copies_a_log_byte_for_byte(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    units = list(src.units_from(1))
    with WAL.open(str(tmp_path / "dst"), WalOptions(segment_bytes_max=4096)) as dst:
        assert dst.append_units(units[:10]) == units[9].last_seq
        assert dst.append_units(units[10:]) == src.last_seq
        assert dst.durable_seq == src.last_seq  # immediate mode: durable on return
        copied = list(dst.entries_from(1))
    assert copied == list(src.entries_from(1))
    batch = next(u for u in units if u.is_batch)
    with WAL.open(str(tmp_path / "dst")) as dst:
        again = [u for u in dst.units_from(batch.first_seq) if u.first_seq == batch.first_seq]
        assert again[0].is_batch and again[0].entries == batch.entries  # still one atomic unit
        assert dst.next_seq == src.next_seq
    src.close()


def test_append_units_refuses_gaps_and_overlaps(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    units = list(src.units_from(1))
    src.close()
    with WAL.open(str(tmp_path / "dst")) as dst:
        with pytest.raises(InvalidArgumentError, match="does not continue the WAL"):
            dst.append_units([units[1]])  # a gap: 2 before 1
        dst.append_units(units[:3])
        with pytest.raises(InvalidArgumentError, match=r"next is 4"):
            dst.append_units([units[2]])  # an overlap
        assert dst.last_seq == 3


def test_sync_listener_hears_every_round(tmp_path: Path) -> None:
    heard: list[int] = []
    with WAL.open(str(tmp_path), WalOptions(sync_mode=SyncMode.NONE)) as wal:
        wal.add_sync_listener(heard.append)
        wal.append(Op.PUT, b"a", b"1")
        wal.append(Op.PUT, b"b", b"2")
        assert heard == []  # mode none: no fsync yet, nothing heard
        wal.sync()
        assert heard == [2]
        wal.append(Op.PUT, b"c", b"3", sync=True)
        assert heard == [2, 3]


def test_append_units_from_a_frames_raw_bytes(tmp_path: Path) -> None:
    from kevo_repl.repl.frames import Codec, decode_frame_raw, encode_frame

    src = _source(tmp_path / "src")
    units = list(src.units_from(1))
    raw, decoded = decode_frame_raw(encode_frame(units, Codec.ZSTD))
    with WAL.open(str(tmp_path / "dst"), WalOptions(segment_bytes_max=4096)) as dst:
        assert dst.append_units_nowait(decoded[:5], raw) == decoded[4].last_seq
        assert dst.append_units_nowait(decoded[5:], raw) == src.last_seq
        dst.sync()
        assert list(dst.entries_from(1)) == list(src.entries_from(1))
        assert len(dst.segment_paths()) > 1  # raw units still never span segments
    src.close()


def test_units_read_raw_frame_to_the_same_bytes(tmp_path: Path) -> None:
    from kevo_repl.repl.frames import encode_units

    src = _source(tmp_path / "src")
    raw_units = list(src.units_from(1, raw=True))
    plain = list(src.units_from(1))
    assert all(u.raw for u in raw_units) and not any(u.raw for u in plain)
    assert [u.entries for u in raw_units] == [u.entries for u in plain]
    assert encode_units(raw_units) == encode_units(plain)  # the primary ships the same bytes
    src.close()


def test_raw_copy_indexes_every_position_and_refuses_a_gap_whole(tmp_path: Path) -> None:
    """Runs of raw units are written in one copy: the sparse index must still find every seq."""
    from kevo_repl.repl.frames import Codec, decode_frame_raw, encode_frame

    src = _source(tmp_path / "src")
    raw, decoded = decode_frame_raw(encode_frame(list(src.units_from(1)), Codec.NONE))
    opts = WalOptions(sync_mode=SyncMode.NONE, segment_bytes_max=4096, index_every_bytes=64)
    with WAL.open(str(tmp_path / "dst"), opts) as dst:
        with pytest.raises(InvalidArgumentError, match="does not continue"):
            dst.append_units_nowait([decoded[0], decoded[2]], raw)
        assert dst.last_seq == 0  # nothing of the refused call was written
        dst.append_units_nowait(decoded, raw)
        for seq in range(1, src.last_seq + 1):
            assert next(dst.entries_from(seq)) == next(src.entries_from(seq))
    src.close()


@pytest.mark.parametrize("from_raw", [False, True])
def test_append_units_refuses_an_oversize_unit_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, from_raw: bool
) -> None:
    """An oversize unit after a good one refuses the whole call: nothing is written, and the
    next append takes sequence 1 (it used to get it again after the good unit was buffered)."""
    from kevo_repl.repl.frames import Codec, decode_frame_raw, encode_frame
    from kevo_repl.wal import log as wal_log

    with WAL.open(str(tmp_path / "src"), WalOptions(sync_mode=SyncMode.NONE)) as src:
        src.append(Op.PUT, b"ok", b"small")
        src.append(Op.PUT, b"big", b"x" * 2000)
        units = list(src.units_from(1))
    raw, decoded = decode_frame_raw(encode_frame(units, Codec.NONE))
    monkeypatch.setattr(wal_log, "MAX_UNIT_BYTES", 1000)  # the real limit is 256 MiB
    with WAL.open(str(tmp_path / "dst")) as dst:
        with pytest.raises(InvalidArgumentError, match="exceeds the limit of 1000"):
            if from_raw:
                dst.append_units_nowait(decoded, raw)
            else:
                dst.append_units(units)
        assert (dst.last_seq, dst.next_seq) == (0, 1)
        assert dst.append(Op.PUT, b"after", b"1") == 1
        assert dst.append_units_nowait([]) == 1
        assert [(e.seq, e.key) for e in dst.entries_from(1)] == [(1, b"after")]
    with WAL.open(str(tmp_path / "dst")) as dst:
        assert [(e.seq, e.key) for e in dst.entries_from(1)] == [(1, b"after")]
        assert dst.next_seq == 2
