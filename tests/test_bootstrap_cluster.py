"""Lagging, new and interrupted replicas with real processes, at the sizes the issue names.

Each test ends with the digests of primary and replica equal. The primary runs with small
segments, no extra WAL retention and frequent checkpoints, so WAL no slot holds is gone within
a fraction of a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodeproc import NodeProcess, free_port, run_cli

from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.proto import service_pb2 as pb
from kevo_repl.proto import service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
WAIT_S = 60.0
ENTRIES = 200_000
TIGHT = (
    "--segment-bytes",
    str(1024 * 1024),
    "--wal-retain-bytes",
    "0",
    "--checkpoint-interval-ms",
    "100",
)
SNAPSHOT = "bootstrapping from a snapshot"


def write_entries(node: NodeProcess, tag: str, count: int) -> None:
    """`count` puts of ~60-byte values, 1000 to a batch."""
    stub = pb_grpc.KevoServiceStub(node.channel())  # type: ignore[no-untyped-call]
    for start in range(0, count, 1000):
        ops = [
            pb.Operation(type=pb.Operation.PUT, key=b"%s:%07d" % (tag.encode(), i), value=b"v" * 60)
            for i in range(start, min(start + 1000, count))
        ]
        stub.BatchWrite(pb.BatchWriteRequest(operations=ops), timeout=30)


def digest(node: NodeProcess) -> tuple[int, str]:
    out = run_cli("digest", "--addr", node.address, "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    return int(d["applied_sequence"]), str(d["sha256"])


def wait_same(primary: NodeProcess, replica: NodeProcess) -> None:
    deadline = time.monotonic() + WAIT_S
    while digest(primary) != digest(replica):
        assert time.monotonic() < deadline, f"no convergence:\n{replica.stderr()[-3000:]}"
        time.sleep(0.2)


def status(node: NodeProcess) -> rpb.ReplicationStatus:
    stub = rpb_grpc.WALReplicationServiceStub(node.channel())  # type: ignore[no-untyped-call]
    reply: rpb.ReplicationStatus = stub.GetReplicationStatus(
        rpb.ReplicationStatusRequest(), timeout=10
    )
    return reply


def start_replica(path: Path, primary: NodeProcess, *extra: str) -> NodeProcess:
    return NodeProcess(path, free_port(), "--role", "replica", "--primary", primary.address, *extra)


@contextlib.contextmanager
def pair(
    tmp_path: Path, *primary_args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """A primary (in tmp_path/p) and one replica of it (in tmp_path/r)."""
    args = ("--role", "primary", *primary_args)
    with contextlib.ExitStack() as stack:
        primary = stack.enter_context(NodeProcess(tmp_path / "p", free_port(), *args, env=env))
        replica = stack.enter_context(start_replica(tmp_path / "r", primary))
        yield primary, replica


def test_a_replica_down_while_200k_entries_are_written_catches_up_from_its_slot(
    tmp_path: Path,
) -> None:
    with pair(tmp_path, *TIGHT) as (primary, replica):
        write_entries(primary, "a", 1000)
        wait_same(primary, replica)
        replica.stop()
        write_entries(primary, "b", ENTRIES)
        time.sleep(0.5)  # checkpoints delete every segment no slot holds
        replica.start()
        wait_same(primary, replica)
        assert SNAPSHOT not in replica.stderr()  # the slot kept all it needed


def test_past_the_slot_cap_a_replica_down_for_200k_entries_catches_up_through_a_snapshot(
    tmp_path: Path,
) -> None:
    capped = (*TIGHT, "--slot-keep-bytes", str(2 * 1024 * 1024))
    with pair(tmp_path, *capped) as (primary, replica):
        write_entries(primary, "a", 1000)
        wait_same(primary, replica)
        replica.stop()
        write_entries(primary, "b", ENTRIES)
        time.sleep(0.5)
        replica.start()
        write_entries(primary, "c", 5000)  # writes go on during the bootstrap
        wait_same(primary, replica)
        assert SNAPSHOT in replica.stderr()
        assert "slot was lost" in replica.stderr()
        leftovers = {"bootstrap.partial", "bootstrap.ready"} & set(os.listdir(tmp_path / "r"))
        assert not leftovers


def test_a_new_replica_joins_a_primary_whose_early_segments_were_deleted(
    tmp_path: Path,
) -> None:
    with NodeProcess(tmp_path / "p", free_port(), "--role", "primary", *TIGHT) as primary:
        write_entries(primary, "a", 50_000)
        deadline = time.monotonic() + WAIT_S
        while "00000000000000000001" in "".join(os.listdir(tmp_path / "p" / "wal")):
            assert time.monotonic() < deadline, os.listdir(tmp_path / "p" / "wal")
            time.sleep(0.1)  # until retention deleted the first segment
        with start_replica(tmp_path / "r", primary) as replica:
            wait_same(primary, replica)
            assert SNAPSHOT in replica.stderr()
            replica.stop()  # its WAL is empty: it must restart at the snapshot's position
            replica.start()
            assert status(replica).last_sequence == digest(primary)[0]
            write_entries(primary, "b", 1000)  # and it streams from the snapshot's position on
            wait_same(primary, replica)
            assert SNAPSHOT not in replica.stderr()  # the restart needed no second snapshot


def test_an_interrupted_bootstrap_keeps_the_old_store_and_completes_after_restarts(
    tmp_path: Path,
) -> None:
    capped = (*TIGHT, "--slot-keep-bytes", str(1024 * 1024))
    slow = {"KEVO_REPL_FAILPOINTS": "snapshot_chunk_delay=1.0"}
    with pair(tmp_path, *capped, env=slow) as (primary, replica):
        write_entries(primary, "a", 1000)
        wait_same(primary, replica)
        old = digest(replica)
        replica.stop()
        write_entries(primary, "b", ENTRIES)  # an image of ~5 chunks: 5 s or more
        time.sleep(0.5)
        replica.start()
        _wait_bootstrap_bytes(replica)
        assert digest(replica) == old  # reads are served from the old store meanwhile
        assert "bootstrapping" in run_cli("status", "--addr", primary.address).stdout
        assert (tmp_path / "r" / "bootstrap.partial").is_dir()
        replica.kill()  # halfway
        replica.start()
        _wait_bootstrap_bytes(replica)  # started over
        assert digest(replica) == old
        stopping = time.monotonic()
        assert replica.stop(timeout=10) == 0  # SIGTERM does not wait for the snapshot
        assert time.monotonic() - stopping < 2.5
        replica.start()
        wait_same(primary, replica)
        assert not (tmp_path / "r" / "bootstrap.partial").exists()


def _wait_bootstrap_bytes(replica: NodeProcess) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        s = status(replica)
        if s.state == "BOOTSTRAPPING" and s.bootstrap_bytes > 0:
            assert s.bootstrap_total_bytes >= s.bootstrap_bytes
            return
        assert time.monotonic() < deadline, f"no bootstrap seen:\n{replica.stderr()[-3000:]}"
        time.sleep(0.05)


def test_promote_a_replica_and_repoint_the_others(tmp_path: Path) -> None:
    """Old primary P0 and replicas R1 (stopped early: behind) and R2 (up to date).

    R2 is promoted after P0 took writes neither replica has. R1's history is a prefix of R2's
    new one: it continues from its position. P0's is not (it holds entries past the fork): it is
    rebuilt from a snapshot. Every node ends with R2's data.
    """
    p0 = NodeProcess(tmp_path / "p0", free_port(), "--role", "primary", *TIGHT)
    r1 = start_replica(tmp_path / "r1", p0)
    r2 = start_replica(tmp_path / "r2", p0)
    nodes = [p0, r1, r2]
    try:
        write_entries(p0, "a", 2000)
        wait_same(p0, r1)
        wait_same(p0, r2)
        r1.stop()  # R1 falls behind
        write_entries(p0, "b", 3000)
        wait_same(p0, r2)
        r2.stop()
        write_entries(p0, "c", 500)  # only P0 has these
        p0.stop()
        r2.start()
        refused = run_cli("put", "--addr", r2.address, "k", "v")
        assert refused.returncode == 1 and "read-only replica" in refused.stderr
        out = run_cli("promote", "--addr", r2.address, "--json")
        assert out.returncode == 0, out.stderr
        promoted = json.loads(out.stdout)
        assert int(promoted["sequence"]) == 5000
        again = run_cli("promote", "--addr", r2.address)
        assert again.returncode == 1 and "this node is a primary node" in again.stderr
        write_entries(r2, "d", 1000)  # it takes writes now
        assert status(r2).role == "primary"
        assert status(r2).history_id == promoted["history_id"]

        r1.args[r1.args.index("--primary") + 1] = r2.address  # re-point R1
        r1.start()
        wait_same(r2, r1)
        assert SNAPSHOT not in r1.stderr()  # a prefix of the new history: it just continued

        p0.args[p0.args.index("primary")] = "replica"  # the old primary follows R2 now
        p0.args += ["--primary", r2.address]
        p0.start()
        wait_same(r2, p0)
        assert "diverged" in p0.stderr() and SNAPSHOT in p0.stderr()

        r2.stop()  # a restart keeps it a primary, whatever its config says
        r2.start()
        assert status(r2).role == "primary" and "was promoted" in r2.stderr()
        write_entries(r2, "e", 100)
        wait_same(r2, r1)
        wait_same(r2, p0)
    finally:
        for node in nodes:
            node.close()
