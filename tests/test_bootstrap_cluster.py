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
from nodeproc import NodeProcess, digest, free_port, run_cli, wait_same, write_batches

from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.repl.bootstrap import PARTIAL_DIR, STORE_DIR
from kevo_repl.store.lmdb_store import IMAGE_FILE

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
# A snapshot chunk this slow makes any snapshot of two chunks or more take 30 s or longer; it stays
# below the replica's CHUNK_TIMEOUT_S (30 s), so the primary is slow, not dead.
SLOW_CHUNK_S = 15.0


def status(node: NodeProcess) -> rpb.ReplicationStatus:
    with node.channel() as channel:
        stub = rpb_grpc.WALReplicationServiceStub(channel)  # type: ignore[no-untyped-call]
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
        write_batches(primary, "a", 1000)
        wait_same(primary, replica, WAIT_S)
        replica.stop()
        write_batches(primary, "b", ENTRIES)
        time.sleep(0.5)  # checkpoints delete every segment no slot holds
        replica.start()
        wait_same(primary, replica, WAIT_S)
        assert SNAPSHOT not in replica.stderr()  # the slot kept all it needed


def test_past_the_slot_cap_a_replica_down_for_200k_entries_catches_up_through_a_snapshot(
    tmp_path: Path,
) -> None:
    capped = (*TIGHT, "--slot-keep-bytes", str(2 * 1024 * 1024))
    with pair(tmp_path, *capped) as (primary, replica):
        write_batches(primary, "a", 1000)
        wait_same(primary, replica, WAIT_S)
        replica.stop()
        write_batches(primary, "b", ENTRIES)
        time.sleep(0.5)
        replica.start()
        write_batches(primary, "c", 5000)  # writes go on during the bootstrap
        wait_same(primary, replica, WAIT_S)
        assert SNAPSHOT in replica.stderr()
        assert "slot was lost" in replica.stderr()
        leftovers = {"bootstrap.partial", "bootstrap.ready"} & set(os.listdir(tmp_path / "r"))
        assert not leftovers


def test_a_new_replica_joins_a_primary_whose_early_segments_were_deleted(
    tmp_path: Path,
) -> None:
    with NodeProcess(tmp_path / "p", free_port(), "--role", "primary", *TIGHT) as primary:
        write_batches(primary, "a", 50_000)
        deadline = time.monotonic() + WAIT_S
        while "00000000000000000001" in "".join(os.listdir(tmp_path / "p" / "wal")):
            assert time.monotonic() < deadline, os.listdir(tmp_path / "p" / "wal")
            time.sleep(0.1)  # until retention deleted the first segment
        with start_replica(tmp_path / "r", primary) as replica:
            wait_same(primary, replica, WAIT_S)
            assert SNAPSHOT in replica.stderr()
            replica.stop()  # its WAL is empty: it must restart at the snapshot's position
            replica.start()
            assert status(replica).last_sequence == digest(primary)[0]
            write_batches(primary, "b", 1000)  # and it streams from the snapshot's position on
            wait_same(primary, replica, WAIT_S)
            assert SNAPSHOT not in replica.stderr()  # the restart needed no second snapshot


def failpoint(chunk_delay_s: float) -> dict[str, str]:
    """The environment for a primary that waits `chunk_delay_s` before each snapshot chunk."""
    return {"KEVO_REPL_FAILPOINTS": f"snapshot_chunk_delay={chunk_delay_s}"}


def test_an_interrupted_bootstrap_keeps_the_old_store_and_completes_after_restarts(
    tmp_path: Path,
) -> None:
    capped = (*TIGHT, "--slot-keep-bytes", str(1024 * 1024))
    partial = tmp_path / "r" / PARTIAL_DIR
    image = partial / STORE_DIR / IMAGE_FILE
    with pair(tmp_path, *capped, env=failpoint(1.0)) as (primary, replica):
        write_batches(primary, "a", 1000)
        wait_same(primary, replica, WAIT_S)
        old = digest(replica)
        replica.stop()
        write_batches(primary, "b", ENTRIES)  # an image of several chunks, one a second
        time.sleep(0.5)
        replica.start()
        first = _wait_bootstrap_bytes(replica)
        assert first.bootstrap_total_bytes > first.bootstrap_bytes  # more than one chunk
        assert digest(replica) == old  # reads are served from the old store meanwhile
        assert "bootstrapping" in run_cli("status", "--addr", primary.address).stdout
        assert partial.is_dir() and SNAPSHOT in replica.stderr()
        replica.kill()  # halfway
        received = image.stat().st_size  # what the killed run had written of the image
        assert received >= first.bootstrap_bytes > 0

        replica.start()  # its stderr now holds this run's log only
        _wait_started_over(replica, image, received)
        _wait_bootstrap_bytes(replica)
        assert digest(replica) == old
        replica.stop()

        # SIGTERM must not wait for the snapshot: against a primary whose snapshot takes 30 s
        # or more (two chunks or more, each after SLOW_CHUNK_S), a stop mid-bootstrap is quick.
        primary.stop()
        primary.extra_env = failpoint(SLOW_CHUNK_S)
        primary.start()
        replica.start()
        _wait_snapshot_sent(primary, replica)
        assert digest(replica) == old
        stopping = time.monotonic()
        assert replica.stop(timeout=2 * SLOW_CHUNK_S) == 0
        took = time.monotonic() - stopping
        assert took < 10, f"SIGTERM took {took:.1f} s: it waited for the snapshot"
        assert partial.is_dir()  # left behind, deleted at the next start

        primary.stop()  # a fast snapshot for the last attempt
        primary.extra_env = {}
        primary.start()
        replica.start()
        wait_same(primary, replica, WAIT_S)
        assert not partial.exists()


def _wait_bootstrap_bytes(replica: NodeProcess) -> rpb.ReplicationStatus:
    deadline = time.monotonic() + WAIT_S
    while True:
        s = status(replica)
        if s.state == "BOOTSTRAPPING" and s.bootstrap_bytes > 0:
            assert s.bootstrap_total_bytes >= s.bootstrap_bytes
            return s
        assert time.monotonic() < deadline, f"no bootstrap seen:\n{replica.stderr()[-3000:]}"
        time.sleep(0.05)


def _wait_started_over(replica: NodeProcess, image: Path, received: int) -> None:
    """Until this run of `replica` is bootstrapping into an image smaller than the `received`
    bytes an earlier run left: the partial image was discarded, not continued."""
    deadline = time.monotonic() + WAIT_S
    while True:
        with contextlib.suppress(FileNotFoundError):
            if (
                SNAPSHOT in replica.stderr()
                and status(replica).state == "BOOTSTRAPPING"
                and image.stat().st_size < received
            ):
                return
        assert time.monotonic() < deadline, f"no new bootstrap:\n{replica.stderr()[-3000:]}"
        time.sleep(0.02)


def _wait_snapshot_sent(primary: NodeProcess, replica: NodeProcess) -> None:
    """Until `replica` is bootstrapping and `primary` has a snapshot stream open for it."""
    deadline = time.monotonic() + WAIT_S
    while not (
        status(replica).state == "BOOTSTRAPPING"
        and any(
            r.state == "bootstrapping" and r.client_address == replica.address
            for r in status(primary).replicas
        )
    ):
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
        write_batches(p0, "a", 2000)
        wait_same(p0, r1, WAIT_S)
        wait_same(p0, r2, WAIT_S)
        r1.stop()  # R1 falls behind
        write_batches(p0, "b", 3000)
        wait_same(p0, r2, WAIT_S)
        r2.stop()
        write_batches(p0, "c", 500)  # only P0 has these
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
        write_batches(r2, "d", 1000)  # it takes writes now
        assert status(r2).role == "primary"
        assert status(r2).history_id == promoted["history_id"]

        r1.args[r1.args.index("--primary") + 1] = r2.address  # re-point R1
        r1.start()
        wait_same(r2, r1, WAIT_S)
        assert SNAPSHOT not in r1.stderr()  # a prefix of the new history: it just continued

        p0.args[p0.args.index("primary")] = "replica"  # the old primary follows R2 now
        p0.args += ["--primary", r2.address]
        p0.start()
        wait_same(r2, p0, WAIT_S)
        assert "diverged" in p0.stderr() and SNAPSHOT in p0.stderr()

        r2.stop()  # a restart keeps it a primary, whatever its config says
        r2.start()
        assert status(r2).role == "primary" and "was promoted" in r2.stderr()
        write_batches(r2, "e", 100)
        wait_same(r2, r1, WAIT_S)
        wait_same(r2, p0, WAIT_S)
    finally:
        for node in nodes:
            node.close()
