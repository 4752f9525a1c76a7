"""Replication slots with real processes: a replica that was down finds the WAL it needs kept
for it (across a primary restart), unless it fell further behind than slot_keep_bytes allows;
then it catches up through a snapshot.

The primary runs with tiny segments, no extra WAL retention and frequent checkpoints, so any WAL
not held by a slot is deleted within a fraction of a second.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from nodeproc import NodeProcess, free_port, run_cli, wait_same, write_batches

from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc

pytestmark = pytest.mark.slow
WAIT_S = 30.0
TIGHT = ("--segment-bytes", "4096", "--wal-retain-bytes", "0", "--checkpoint-interval-ms", "100")


def _slots(primary: NodeProcess) -> list[dict[str, object]]:
    out = run_cli("slots", "--addr", primary.address, "--json")
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout)["slots"])


def _replica(tmp_path: Path, primary: NodeProcess) -> NodeProcess:
    return NodeProcess(
        tmp_path / "r", free_port(), "--role", "replica", "--primary", primary.address
    )


def test_a_replica_that_was_down_catches_up_from_its_slot(tmp_path: Path) -> None:
    primary = NodeProcess(tmp_path / "p", free_port(), "--role", "primary", *TIGHT)
    replica = _replica(tmp_path, primary)
    try:
        write_batches(primary, "a", 400, batch=20)
        wait_same(primary, replica, WAIT_S)
        replica.stop()
        # ~300 KB: about 75 segments, none needed by the store
        write_batches(primary, "b", 4000, batch=20)
        primary.stop()  # the slot must survive a restart of the primary too
        primary.start()
        write_batches(primary, "c", 1000, batch=20)
        time.sleep(0.5)  # several checkpoints, each applying retention
        (slot,) = _slots(primary)
        assert slot["active"] is False and slot["lost"] is False
        assert int(str(slot["held_bytes"])) > 200_000
        status = run_cli("status", "--addr", primary.address)
        assert "disconnected" in status.stdout
        replica.start()
        wait_same(primary, replica, WAIT_S)  # from the slot: no entry was deleted under it
        # Acks move the slot; retention then releases what it held.
        deadline = time.monotonic() + WAIT_S
        while True:
            (slot,) = _slots(primary)
            if slot["active"] is True and int(str(slot["held_bytes"])) < 50_000:
                break
            assert time.monotonic() < deadline, f"the slot still holds its WAL: {slot}"
            time.sleep(0.1)
    finally:
        replica.close()
        primary.close()


def test_past_the_cap_the_slot_is_lost_then_bootstrapped(tmp_path: Path) -> None:
    primary = NodeProcess(
        tmp_path / "p", free_port(), "--role", "primary", *TIGHT, "--slot-keep-bytes", "40000"
    )
    replica = _replica(tmp_path, primary)
    try:
        write_batches(primary, "a", 200, batch=20)
        wait_same(primary, replica, WAIT_S)
        busy = run_cli(
            "slots", "--addr", primary.address, "--drop", str(_slots(primary)[0]["node_id"])
        )
        assert busy.returncode == 1 and "FAILED_PRECONDITION" in busy.stderr
        replica.stop()
        write_batches(primary, "b", 4000, batch=20)
        time.sleep(0.5)
        (slot,) = _slots(primary)
        assert slot["lost"] is True and int(str(slot.get("held_bytes", 0))) == 0
        assert "lost" in run_cli("status", "--addr", primary.address).stdout
        assert "is lost" in primary.stderr()  # the operator is told, once
        replica.start()
        wait_same(primary, replica, WAIT_S)  # through a snapshot: the WAL it needed is gone
        log = replica.stderr()
        assert "slot was lost" in log and "bootstrapping from a snapshot" in log
        (slot,) = _slots(primary)
        assert slot["lost"] is False  # found again at the snapshot's position
        replica.stop()
        node_id = str(slot["node_id"])
        dropped = run_cli("slots", "--addr", primary.address, "--drop", node_id)
        assert dropped.returncode == 0 and node_id in dropped.stdout
        assert _slots(primary) == []
        again = run_cli("slots", "--addr", primary.address, "--drop", node_id)
        assert again.returncode == 1 and "NOT_FOUND" in again.stderr
    finally:
        replica.close()
        primary.close()


def test_slot_snapshot_and_promote_calls_on_a_standalone_node_are_refused(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "s", free_port()) as node:
        out = run_cli("slots", "--addr", node.address)
        assert out.returncode == 1
        assert "only a primary has replication slots; this node is a standalone node" in out.stderr
        stub = rpb_grpc.WALReplicationServiceStub(node.channel())  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as info:
            stub.DropSlot(rpb.DropSlotRequest(node_id="x"), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamSnapshot(rpb.SnapshotRequest(), timeout=10))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "only a primary sends snapshots" in str(info.value.details())
        promote = run_cli("promote", "--addr", node.address)
        assert promote.returncode == 1
        assert "only a replica can be promoted; this node is a standalone node" in promote.stderr
