"""Replication with real processes on 127.0.0.1: a primary, replicas, kills and restarts.

After each scenario the replica's full scan equals the primary's, and (once stopped) the
replica's own WAL holds exactly the primary's entries with the primary's sequence numbers: no
entry applied twice, none out of order, none missing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from nodeproc import NodeProcess, free_port

from kevo_repl.proto import service_pb2 as pb
from kevo_repl.proto import service_pb2_grpc as pb_grpc
from kevo_repl.wal import WAL, Entry

pytestmark = pytest.mark.slow
CONVERGE_S = 30.0


def _stub(node: NodeProcess) -> pb_grpc.KevoServiceStub:
    return pb_grpc.KevoServiceStub(node.channel(max_send_message_length=64 << 20))  # type: ignore[no-untyped-call]


def _scan(node: NodeProcess) -> list[tuple[bytes, bytes]]:
    return [(r.key, r.value) for r in _stub(node).Scan(pb.ScanRequest(), timeout=30)]


def _wait_converged(primary: NodeProcess, *replicas: NodeProcess) -> list[tuple[bytes, bytes]]:
    expected = _scan(primary)
    deadline = time.monotonic() + CONVERGE_S
    for replica in replicas:
        while True:
            got = _scan(replica)
            if got == expected:
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{replica.address} did not converge: {len(got)} keys vs {len(expected)}"
                )
            time.sleep(0.1)
    return expected


def _workload(node: NodeProcess, rng: random.Random, rounds: int, tag: str) -> None:
    """Random Puts, Deletes, BatchWrites and transactions, including values over 32 KiB."""
    stub = _stub(node)
    for i in range(rounds):
        roll = rng.random()
        key = b"%s:%d" % (tag.encode(), rng.randrange(rounds // 2 + 1))
        if roll < 0.45:
            size = 40_000 if rng.random() < 0.05 else rng.randrange(200)
            stub.Put(pb.PutRequest(key=key, value=rng.randbytes(size)), timeout=30)
        elif roll < 0.6:
            stub.Delete(pb.DeleteRequest(key=key), timeout=30)
        elif roll < 0.85:
            ops = [
                pb.Operation(
                    type=pb.Operation.PUT, key=b"%s:b%d:%d" % (tag.encode(), i, j), value=b"v%d" % j
                )
                for j in range(rng.randrange(1, 20))
            ]
            ops.append(pb.Operation(type=pb.Operation.DELETE, key=key))
            stub.BatchWrite(pb.BatchWriteRequest(operations=ops), timeout=30)
        else:
            tx = stub.BeginTransaction(pb.BeginTransactionRequest(), timeout=30).transaction_id
            stub.TxPut(pb.TxPutRequest(transaction_id=tx, key=key, value=b"tx%d" % i), timeout=30)
            stub.TxPut(pb.TxPutRequest(transaction_id=tx, key=key + b"!", value=b"t"), timeout=30)
            stub.CommitTransaction(pb.CommitTransactionRequest(transaction_id=tx), timeout=30)


def _wal_entries(data_dir: str) -> list[Entry]:
    with WAL.open(f"{data_dir}/wal") as wal:
        return list(wal.entries_from(1))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[NodeProcess, list[NodeProcess]]]:
    with ExitStack() as stack:
        primary = stack.enter_context(NodeProcess(tmp_path / "p", free_port(), "--role", "primary"))
        replicas = [
            stack.enter_context(
                NodeProcess(
                    tmp_path / f"r{i}",
                    free_port(),
                    "--role",
                    "replica",
                    "--primary",
                    primary.address,
                )
            )
            for i in range(2)
        ]
        yield primary, replicas


def test_workload_converges_and_wals_match(cluster: tuple[NodeProcess, list[NodeProcess]]) -> None:
    primary, replicas = cluster
    _workload(primary, random.Random(1), 300, "w")
    rows = _wait_converged(primary, *replicas)
    assert len(rows) > 100
    primary.stop()
    for replica in replicas:
        replica.stop()
    expected = _wal_entries(primary.data_dir)
    for replica in replicas:
        assert _wal_entries(replica.data_dir) == expected  # same entries, same numbers


def test_replica_killed_mid_stream_converges(
    cluster: tuple[NodeProcess, list[NodeProcess]],
) -> None:
    primary, (victim, other) = cluster
    rng = random.Random(2)
    _workload(primary, rng, 150, "a")
    victim.kill()
    _workload(primary, rng, 150, "b")  # written while the replica is down
    victim.start()
    _workload(primary, rng, 100, "c")
    _wait_converged(primary, victim, other)
    primary.stop()
    victim.stop()
    assert _wal_entries(victim.data_dir) == _wal_entries(primary.data_dir)


def test_primary_restart_under_connected_replicas(
    cluster: tuple[NodeProcess, list[NodeProcess]],
) -> None:
    primary, replicas = cluster
    rng = random.Random(3)
    _workload(primary, rng, 100, "a")
    _wait_converged(primary, *replicas)
    primary.stop()
    primary.start()
    _workload(primary, rng, 100, "b")
    _wait_converged(primary, *replicas)


def test_new_replica_catches_up_from_sequence_one(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "p", free_port(), "--role", "primary") as primary:
        _workload(primary, random.Random(4), 400, "old")
        with NodeProcess(
            tmp_path / "new", free_port(), "--role", "replica", "--primary", primary.address
        ) as fresh:
            _wait_converged(primary, fresh)


def test_sdk_routes_writes_to_primary_and_redirects(
    cluster: tuple[NodeProcess, list[NodeProcess]],
) -> None:
    from kevo.client import Client
    from kevo.options import ClientOptions

    primary, replicas = cluster
    info = _stub(primary).GetNodeInfo(pb.GetNodeInfoRequest(), timeout=10)
    assert info.node_role == pb.GetNodeInfoResponse.PRIMARY
    deadline = time.monotonic() + CONVERGE_S
    while len(info.replicas) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        info = _stub(primary).GetNodeInfo(pb.GetNodeInfoRequest(), timeout=10)
    assert sorted(r.address for r in info.replicas) == sorted(r.address for r in replicas)
    via_primary = Client(ClientOptions(endpoint=primary.address))
    via_primary.connect()
    via_primary.put(b"sdk:1", b"one")
    _wait_converged(primary, *replicas)
    value, found = via_primary.get(b"sdk:1")  # served by a replica: SDK reads go there
    assert (value, found) == (b"one", True)
    via_primary.close()
    via_replica = Client(ClientOptions(endpoint=replicas[0].address))
    via_replica.connect()
    via_replica.put(b"sdk:2", b"two")  # the SDK is redirected to the primary
    via_replica.close()
    got = _stub(primary).Get(pb.GetRequest(key=b"sdk:2"), timeout=10)
    assert got.found and got.value == b"two"
    with pytest.raises(grpc.RpcError) as info_err:
        _stub(replicas[1]).Put(pb.PutRequest(key=b"x", value=b"y"), timeout=10)
    assert info_err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"primary node at {primary.address}" in (info_err.value.details() or "")


def test_status_shows_positions_and_lag(cluster: tuple[NodeProcess, list[NodeProcess]]) -> None:
    import json

    from nodeproc import run_cli

    primary, replicas = cluster
    _workload(primary, random.Random(5), 120, "s")
    _wait_converged(primary, *replicas)
    deadline = time.monotonic() + CONVERGE_S
    while True:  # acks are coalesced: the primary hears the final positions shortly after
        out = run_cli("status", "--addr", primary.address, "--json")
        status = json.loads(out.stdout)
        applied = sorted(int(r["applied_sequence"]) for r in status["replicas"])
        if applied == [int(status["durable_sequence"])] * 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status["role"] == "primary" and len(status["replicas"]) == 2
    for r in status["replicas"]:
        assert int(r["applied_sequence"]) == int(status["durable_sequence"]) > 100
        assert int(r["lag_entries"]) == 0 and r["state"] == "streaming"
        assert int(r["lag_bytes"]) == 0 and float(r["eta_seconds"]) == 0.0
        assert float(r["apply_rate"]) > 0  # acks of the workload, within the last 10 s
        assert r["client_address"] in {rep.address for rep in replicas}
    text = run_cli("status", "--addr", replicas[0].address)
    assert text.returncode == 0
    assert "role replica" in text.stdout and f"following {primary.address}" in text.stdout
    assert "lag 0 entries" in text.stdout


def test_status_of_a_standalone_node(tmp_path: Path) -> None:
    from nodeproc import run_cli

    with NodeProcess(tmp_path / "s", free_port()) as node:
        out = run_cli("status", "--addr", node.address)
        assert out.returncode == 0 and out.stdout.startswith("role standalone")


def test_replication_on_its_own_port(tmp_path: Path) -> None:
    """--replication-listen: replicas stream from that port; the node port points to it."""
    from nodeproc import run_cli

    from kevo_repl.proto import replication_pb2 as rpb
    from kevo_repl.proto import replication_pb2_grpc as rpb_grpc

    repl = f"127.0.0.1:{free_port()}"
    with ExitStack() as stack:
        primary = stack.enter_context(
            NodeProcess(
                tmp_path / "p", free_port(), "--role", "primary", "--replication-listen", repl
            )
        )
        replica = stack.enter_context(
            NodeProcess(tmp_path / "r", free_port(), "--role", "replica", "--primary", repl)
        )
        _workload(primary, random.Random(6), 80, "port")
        _wait_converged(primary, replica)
        stub = rpb_grpc.WALReplicationServiceStub(primary.channel())  # type: ignore[no-untyped-call]
        call = stub.StreamWAL(rpb.WALStreamRequest(start_sequence=1, frames=True), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            next(iter(call))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"replication is served on {repl}" in (info.value.details() or "")
        out = run_cli("status", "--addr", primary.address)  # status still on the node port
        assert out.returncode == 0 and "role primary" in out.stdout
        # Writes refused on the replica name the primary's client port, not its replication port.
        with pytest.raises(grpc.RpcError) as refused:
            _stub(replica).Put(pb.PutRequest(key=b"k", value=b"v"), timeout=10)
        assert f"primary node at {primary.address}" in (refused.value.details() or "")


def test_digest_compares_nodes(cluster: tuple[NodeProcess, list[NodeProcess]]) -> None:
    """`kevo-repl digest`: equal on converged nodes, different once the data differs."""
    import json

    from nodeproc import run_cli, store_digest

    primary, replicas = cluster
    _workload(primary, random.Random(7), 120, "d")
    _wait_converged(primary, *replicas)
    deadline = time.monotonic() + CONVERGE_S
    while True:
        seen = [store_digest(n) for n in (primary, *replicas)]
        if len({(d.applied_sequence, d.sha256) for d in seen}) == 1:
            break
        assert time.monotonic() < deadline, seen
        time.sleep(0.1)
    assert [d.role for d in seen] == ["primary", "replica", "replica"]
    assert seen[0].applied_sequence > 100 and len(seen[0].sha256) == 64
    for node, d in zip((primary, *replicas), seen, strict=True):  # the CLI prints the RPC's answer
        out = run_cli("digest", "--addr", node.address, "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {
            "applied_sequence": str(d.applied_sequence),
            "sha256": d.sha256,
            "role": d.role,
        }
    _stub(primary).Put(pb.PutRequest(key=b"only-now", value=b"x"), timeout=10)
    assert store_digest(primary).sha256 != seen[0].sha256
    text = run_cli("digest", "--addr", replicas[0].address)
    assert text.returncode == 0
    assert text.stdout.startswith(f"{replicas[0].address} (replica): applied ")


def test_digest_of_a_standalone_node_and_of_nothing(tmp_path: Path) -> None:
    from nodeproc import run_cli

    with NodeProcess(tmp_path / "s", free_port()) as node:
        _stub(node).Put(pb.PutRequest(key=b"k", value=b"v"), timeout=10)
        out = run_cli("digest", "--addr", node.address)
        assert out.returncode == 0 and "(standalone): applied 1 sha256 " in out.stdout
        status = run_cli("status", "--addr", node.address)
        assert status.stdout.startswith("role standalone: last 1, durable 1, applied 1")
    gone = run_cli("digest", "--addr", node.address)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr
