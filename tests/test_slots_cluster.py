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
from nodeproc import NodeProcess, free_port, run_cli

from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.proto import service_pb2 as pb
from kevo_repl.proto import service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
WAIT_S = 30.0
TIGHT = ("--segment-bytes", "4096", "--wal-retain-bytes", "0", "--checkpoint-interval-ms", "100")


def _write(node: NodeProcess, tag: str, batches: int) -> None:
    stub = pb_grpc.KevoServiceStub(node.channel())  # type: ignore[no-untyped-call]
    for b in range(batches):
        ops = [
            pb.Operation(
                type=pb.Operation.PUT, key=b"%s:%d:%d" % (tag.encode(), b, j), value=b"v" * 60
            )
            for j in range(20)
        ]
        stub.BatchWrite(pb.BatchWriteRequest(operations=ops), timeout=10)


def _digest(node: NodeProcess) -> tuple[str, str]:
    out = run_cli("digest", "--addr", node.address, "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    return d["applied_sequence"], d["sha256"]


def _wait_same(primary: NodeProcess, replica: NodeProcess) -> None:
    deadline = time.monotonic() + WAIT_S
    while _digest(primary) != _digest(replica):
        assert time.monotonic() < deadline, "replica did not converge"
        time.sleep(0.1)


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
        _write(primary, "a", 20)
        _wait_same(primary, replica)
        replica.stop()
        _write(primary, "b", 200)  # ~300 KB: about 75 segments, none needed by the store
        primary.stop()  # the slot must survive a restart of the primary too
        primary.start()
        _write(primary, "c", 50)
        time.sleep(0.5)  # several checkpoints, each applying retention
        (slot,) = _slots(primary)
        assert slot["active"] is False and slot["lost"] is False
        assert int(str(slot["held_bytes"])) > 200_000
        status = run_cli("status", "--addr", primary.address)
        assert "disconnected" in status.stdout
        replica.start()
        _wait_same(primary, replica)  # from the slot: no entry was deleted under it
        time.sleep(0.5)  # acks move the slot; retention then releases what it held
        (slot,) = _slots(primary)
        assert slot["active"] is True and int(str(slot["held_bytes"])) < 50_000
    finally:
        replica.close()
        primary.close()


def test_past_the_cap_the_slot_is_lost_then_bootstrapped(tmp_path: Path) -> None:
    primary = NodeProcess(
        tmp_path / "p", free_port(), "--role", "primary", *TIGHT, "--slot-keep-bytes", "40000"
    )
    replica = _replica(tmp_path, primary)
    try:
        _write(primary, "a", 10)
        _wait_same(primary, replica)
        busy = run_cli(
            "slots", "--addr", primary.address, "--drop", str(_slots(primary)[0]["node_id"])
        )
        assert busy.returncode == 1 and "FAILED_PRECONDITION" in busy.stderr
        replica.stop()
        _write(primary, "b", 200)
        time.sleep(0.5)
        (slot,) = _slots(primary)
        assert slot["lost"] is True and int(str(slot.get("held_bytes", 0))) == 0
        assert "lost" in run_cli("status", "--addr", primary.address).stdout
        assert "is lost" in primary.stderr()  # the operator is told, once
        replica.start()
        _wait_same(primary, replica)  # through a snapshot: the WAL it needed is gone
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
