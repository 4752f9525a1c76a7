"""Replication slots: the pure table, its file, and what a slot costs in WAL bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kevo_repl.errors import StateFileError
from kevo_repl.repl.slots import SlotTable
from kevo_repl.repl.state_files import load_slots, save_slots
from kevo_repl.wal import WAL, Op, SyncMode, WalOptions


def test_positions_only_move_forward_and_the_hold_is_the_oldest_need() -> None:
    table = SlotTable()
    assert table.hold_seq() is None
    table.connect("a", "h:1", start_seq=5, oldest_seq=1, now=1.0)
    table.connect("b", "h:2", start_seq=9, oldest_seq=1, now=1.0)
    assert table.hold_seq() == 5 and table.dirty
    table.advance("a", flushed_seq=20, now=2.0)
    table.advance("a", flushed_seq=10, now=3.0)  # an old ack arriving late
    slot = table.get("a")
    assert slot is not None and slot.restart_seq == 21 and slot.updated_unix == 2.0
    assert table.hold_seq() == 9
    table.advance("nobody", 100, 4.0)  # no slot, nothing created
    assert [s.node_id for s in table] == ["a", "b"]
    assert table.drop("b") and not table.drop("b")
    assert table.hold_seq() == 21


def test_reconnect_takes_the_replicas_word_for_where_it_is() -> None:
    table = SlotTable()
    table.connect("a", "h:1", start_seq=50, oldest_seq=1, now=1.0)
    table.connect("a", "", start_seq=30, oldest_seq=1, now=2.0)  # it lost a tail: needs 30
    slot = table.get("a")
    assert slot is not None and slot.restart_seq == 30 and slot.client_address == "h:1"


def test_cap_marks_lost_and_a_lost_slot_holds_nothing_until_found_again() -> None:
    table = SlotTable()
    table.connect("far", "h:1", start_seq=1, oldest_seq=1, now=0.0)
    table.connect("near", "h:2", start_seq=900, oldest_seq=1, now=0.0)
    table.dirty = False
    cost = {1: 10_000, 900: 100}
    lost = table.enforce_cap(lambda seq: cost[seq], cap_bytes=5_000)
    assert [s.node_id for s in lost] == ["far"] and table.dirty
    assert table.hold_seq() == 900
    assert table.enforce_cap(lambda seq: cost[seq], cap_bytes=5_000) == []  # lost only once
    table.connect("far", "h:1", start_seq=1, oldest_seq=500, now=1.0)  # WAL no longer reaches
    far = table.get("far")
    assert far is not None and far.lost
    table.connect("far", "h:1", start_seq=600, oldest_seq=500, now=2.0)  # it does now
    assert not far.lost and table.hold_seq() == 600


def test_file_round_trip_and_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "slots.json")
    assert len(load_slots(path)) == 0
    table = SlotTable()
    table.connect("a", "h:1", start_seq=7, oldest_seq=1, now=1.5)
    table.enforce_cap(lambda seq: 10, cap_bytes=1)
    save_slots(path, table)
    assert not table.dirty
    again = load_slots(path)
    assert [
        (s.node_id, s.client_address, s.restart_seq, s.updated_unix, s.lost) for s in again
    ] == [("a", "h:1", 7, 1.5, True)]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"version": 1, "slots": [', "at offset 25: not valid JSON"),
        (b'{"version": 2, "slots": []}', "unknown format version 2"),
        (b'{"version": 1}', "not a slot table"),
        (b'{"version": 1, "slots": [{"node_id": "a"}]}', "not a slot table"),
        (
            b'{"version": 1, "slots": [{"node_id": "a", "client_address": "", '
            b'"restart_seq": 0, "updated_unix": 1, "lost": false}]}',
            "bad restart_seq 0",
        ),
        (b"[]", "not a slot table"),
    ],
)
def test_a_bad_file_names_itself(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "slots.json"
    path.write_bytes(content)
    with pytest.raises(StateFileError, match=reason) as info:
        load_slots(str(path))
    assert str(path) in str(info.value)


def test_wal_bytes_from_is_what_keeping_a_sequence_costs(tmp_path: Path) -> None:
    options = WalOptions(sync_mode=SyncMode.NONE, segment_bytes_max=4096)
    with WAL.open(str(tmp_path), options) as wal:
        for i in range(300):
            wal.append(Op.PUT, b"k%d" % i, b"v" * 50)
        wal.flush()
        total = wal.bytes_from(1)
        assert total == sum(Path(p).stat().st_size for p in wal.segment_paths())
        assert wal.bytes_from(0) == total  # older than the log: all of it
        assert 0 < wal.bytes_from(wal.last_seq) < 4096 + 100  # only the segment holding it
        assert wal.bytes_from(150) < total
        assert wal.bytes_from(150) >= wal.bytes_from(250)
