"""Log histories: positions on a history, the file, and divergence with real processes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from nodeproc import NodeProcess, digest, free_port, run_cli, wait_same

from kevo_repl.errors import StateFileError
from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.proto import service_pb2 as pb
from kevo_repl.proto import service_pb2_grpc as pb_grpc
from kevo_repl.repl.history import History
from kevo_repl.repl.state_files import load_history, save_history


def test_positions_on_a_history() -> None:
    h = History((("a", 1), ("b", 100), ("c", 250)))
    assert h.current == "c"
    assert [h.id_at(s) for s in (0, 1, 99, 100, 249, 250, 10**9)] == [
        None,
        "a",
        "a",
        "b",
        "b",
        "c",
        "c",
    ]
    assert h.contains("a", 99) and not h.contains("a", 100) and h.contains("b", 100)
    assert h.contains("anything", 0)  # a replica holding nothing is on every history
    assert not h.contains("z", 5)
    assert History.from_json(h.to_json()) == h
    assert History.new() != History.new() and History.new().entries[0][1] == 1


@pytest.mark.parametrize(
    "text",
    [
        '{"version": 2, "entries": [["a", 1]]}',
        '{"version": 1, "entries": []}',
        '{"version": 1, "entries": [["a", 5]]}',
        '{"version": 1, "entries": [["a", 1], ["b", 1]]}',
        '{"version": 1}',
        "[1]",
    ],
)
def test_bad_history_files_name_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "HISTORY"
    path.write_text(text)
    with pytest.raises(StateFileError, match="not a history file") as info:
        load_history(str(path))
    assert str(path) in str(info.value)


def test_history_file_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "HISTORY")
    assert load_history(path) is None
    h = History((("a", 1), ("b", 7)))
    save_history(path, h)
    assert load_history(path) == h


def _put(node: NodeProcess, n: int, tag: str) -> None:
    stub = pb_grpc.KevoServiceStub(node.channel())  # type: ignore[no-untyped-call]
    for i in range(n):
        stub.Put(pb.PutRequest(key=b"%s%d" % (tag.encode(), i), value=b"v"), timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["rebootstrap", "refuse"])
def test_a_replica_of_a_rebuilt_primary_never_applies_onto_its_diverged_store(
    tmp_path: Path, policy: str
) -> None:
    port = free_port()
    primary = NodeProcess(tmp_path / "p", port, "--role", "primary")
    replica = NodeProcess(
        tmp_path / "r",
        free_port(),
        "--role",
        "replica",
        "--primary",
        primary.address,
        "--on-divergence",
        policy,
    )
    try:
        _put(primary, 20, "old")
        wait_same(primary, replica)
        before = digest(replica)
        assert load_history(str(tmp_path / "r" / "HISTORY")) == load_history(
            str(tmp_path / "p" / "HISTORY")
        )  # the replica adopted its primary's history
        replica.stop()
        primary.stop()
        shutil.rmtree(tmp_path / "p")  # the primary is rebuilt from nothing, same address
        primary.start()
        _put(primary, 40, "new")  # more entries than the replica has: numbers alone would fit
        replica.start()
        if policy == "rebootstrap":
            wait_same(primary, replica)  # rebuilt from a snapshot of the new primary
            assert "diverged" in replica.stderr()
            assert load_history(str(tmp_path / "r" / "HISTORY")) == load_history(
                str(tmp_path / "p" / "HISTORY")
            )
            return
        stub = rpb_grpc.WALReplicationServiceStub(replica.channel())  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + 30
        while "diverged" not in (
            error := stub.GetReplicationStatus(
                rpb.ReplicationStatusRequest(), timeout=10
            ).last_error
        ):
            assert time.monotonic() < deadline, error
            time.sleep(0.1)
        assert "FAILED_PRECONDITION" in error and "on_divergence = 'refuse'" in error
        time.sleep(0.5)
        assert digest(replica) == before  # nothing of the new log was applied
    finally:
        replica.close()
        primary.close()


def test_unreadable_state_files_are_clear_errors(tmp_path: Path) -> None:
    """Bad bytes, a directory in the file's place, an unwritable directory: never a traceback."""
    from kevo_repl.repl.state_files import load_or_create_node_id, load_slots, write_state

    history = tmp_path / "HISTORY"
    history.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(StateFileError, match="not a history file"):
        load_history(str(history))
    (tmp_path / "slots.json").mkdir()
    with pytest.raises(StateFileError, match="cannot read it"):
        load_slots(str(tmp_path / "slots.json"))
    (tmp_path / "NODE_ID").write_bytes(b"two words\n")
    with pytest.raises(StateFileError, match="not a node id"):
        load_or_create_node_id(str(tmp_path / "NODE_ID"))
    with pytest.raises(StateFileError, match="cannot write it"):
        write_state(str(tmp_path / "missing-dir" / "x"), b"{}")


def test_a_node_with_a_corrupt_history_exits_with_the_file_named(tmp_path: Path) -> None:
    (tmp_path / "HISTORY").write_text('{"version": 1, "entries": []}')
    out = run_cli(
        "serve", "--data-dir", str(tmp_path), "--role", "primary", "--listen", "127.0.0.1:0"
    )
    assert out.returncode == 1
    assert f"{tmp_path / 'HISTORY'}: corrupt state file" in out.stderr
    assert "Traceback" not in out.stderr


def test_fork_starts_a_new_line_of_writes() -> None:
    from kevo_repl.repl.history import fork

    old = History((("a", 1), ("b", 10)))
    new = fork(old, 25)
    assert new.entries[:2] == old.entries and new.entries[2][1] == 25
    assert new.contains("b", 24) and not new.contains("b", 25)
    assert new.contains(new.current, 25)
    again = fork(old, 10)  # nothing was written under "b": it is replaced, not kept empty
    assert again.entries[0] == ("a", 1) and again.entries[1][1] == 10 and len(again.entries) == 2
    assert fork(None, 1).entries[0][1] == 1
    assert History.from_json(new.to_json()) == new
