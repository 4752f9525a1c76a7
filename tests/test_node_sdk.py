"""A real node in a subprocess, driven by the unmodified python-kevo SDK (KEVO_COMPAT.md §3.3).

One node serves the whole module; every test uses its own key prefix, so tests stay independent.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from nodeproc import NodeProcess, free_port, kevo_stub

from kevo_repl.proto import service_pb2 as pb

# The SDK is imported by name at run time: when mypy checks the whole tree (`mypy ... proto`),
# a static `from kevo import ...` resolves to the namespace package proto/kevo instead.
kevo: Any = importlib.import_module("kevo")
BatchOperation = kevo.BatchOperation
Client = kevo.Client
ClientOptions = kevo.ClientOptions
KeyNotFoundError = kevo.KeyNotFoundError
NodeRole = kevo.NodeRole
ScanOptions = kevo.ScanOptions
Transaction = kevo.Transaction
TransactionError = kevo.TransactionError
ValidationError = kevo.ValidationError

PUT = BatchOperation.Type.PUT
DELETE = BatchOperation.Type.DELETE


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    data = tmp_path_factory.mktemp("sdk-node")
    with NodeProcess(data, free_port()) as proc:
        yield proc
        assert proc.stop() == 0, proc.stderr()


@pytest.fixture(scope="module")
def client(node: NodeProcess) -> Iterator[Any]:
    c = Client(ClientOptions(endpoint=node.address, connect_timeout=10.0, request_timeout=30.0))
    c.connect()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def stub(node: NodeProcess) -> Iterator[Any]:
    with node.channel() as channel:
        yield kevo_stub(channel)


def scan(client: Any, **options: Any) -> list[tuple[bytes, bytes]]:
    """Every row of an SDK scan; fails if the scan ended in an error (the SDK only records it)."""
    scanner = client.scan(ScanOptions(**options))
    rows = [(kv.key, kv.value) for kv in scanner]
    assert scanner.error() is None, scanner.error()
    return rows


def tx_scan(tx: Any, **options: Any) -> list[tuple[bytes, bytes]]:
    scanner = tx.scan(ScanOptions(**options))
    rows = [(kv.key, kv.value) for kv in scanner]
    assert scanner.error() is None, scanner.error()
    return rows


def put_all(client: Any, items: dict[bytes, bytes]) -> None:
    ops = [BatchOperation(PUT, k, v) for k, v in items.items()]
    for i in range(0, len(ops), 1000):
        assert client.batch_write(ops[i : i + 1000]) is True


# ---------------------------------------------------------------------- single keys


def test_put_get_delete(client: Any) -> None:
    assert client.put(b"pgd/k", b"v1") is True
    assert client.get(b"pgd/k") == (b"v1", True)
    assert client.put(b"pgd/k", b"v2", sync=True) is True
    assert client.get(b"pgd/k") == (b"v2", True)
    assert client.delete(b"pgd/k") is True
    assert client.get(b"pgd/k") == (b"", False)
    # Deleting a key that is not there succeeds, as in Kevo (a tombstone is written).
    assert client.delete(b"pgd/never") is True
    assert client.get(b"pgd/never") == (b"", False)


def test_missing_key_is_found_false_not_an_error(client: Any) -> None:
    try:
        result = client.get(b"missing/none-here")
    except KeyNotFoundError:  # the SDK's mapping of NOT_FOUND, which the node must never use
        pytest.fail("a missing key must be found=false, not NOT_FOUND")
    assert result == (b"", False)


def test_empty_value_is_a_value(client: Any) -> None:
    assert client.put(b"empty/k", b"") is True
    assert client.get(b"empty/k") == (b"", True)
    assert scan(client, prefix=b"empty/") == [(b"empty/k", b"")]
    assert client.delete(b"empty/k") is True
    assert client.get(b"empty/k") == (b"", False)


def test_binary_keys_and_values_round_trip(client: Any) -> None:
    key = b"bin/\x00\x01\xff\xfe"
    value = bytes(range(256)) * 3
    assert client.put(key, value) is True
    assert client.get(key) == (value, True)


def test_largest_key_accepted_and_larger_one_rejected(client: Any) -> None:
    key = b"maxkey/" + b"k" * (511 - 7)
    assert len(key) == 511
    assert client.put(key, b"v") is True
    assert client.get(key) == (b"v", True)
    with pytest.raises(ValidationError, match="invalid key size 512"):
        client.put(key + b"k", b"v")


def test_large_value(client: Any) -> None:
    value = bytes(range(256)) * (8 * 1024 * 4)  # 8 MiB: more than gRPC's default 4 MiB
    assert client.put(b"large/k", value) is True
    assert client.get(b"large/k") == (value, True)
    assert client.delete(b"large/k") is True


# ---------------------------------------------------------------------- batches


def test_batch_write_puts_and_deletes(client: Any) -> None:
    put_all(client, {b"batch/a": b"old-a", b"batch/b": b"old-b", b"batch/c": b"old-c"})
    ops = [
        BatchOperation(PUT, b"batch/a", b"new-a"),
        BatchOperation(DELETE, b"batch/b"),
        BatchOperation(PUT, b"batch/d", b"new-d"),
        BatchOperation(PUT, b"batch/e", b"short-lived"),
        BatchOperation(DELETE, b"batch/e"),  # later operations in a batch win
        BatchOperation(DELETE, b"batch/f"),  # a missing key is fine
        BatchOperation(PUT, b"batch/g", b""),
    ]
    assert client.batch_write(ops, sync=True) is True
    assert scan(client, prefix=b"batch/") == [
        (b"batch/a", b"new-a"),
        (b"batch/c", b"old-c"),
        (b"batch/d", b"new-d"),
        (b"batch/g", b""),
    ]
    assert client.get(b"batch/b") == (b"", False)
    assert client.get(b"batch/e") == (b"", False)


def test_batch_of_1000_operations_is_accepted(client: Any) -> None:
    items = {b"batch1000/%04d" % i: b"v%d" % i for i in range(1000)}
    put_all(client, items)
    assert scan(client, prefix=b"batch1000/") == sorted(items.items())


# ---------------------------------------------------------------------- scans

SCAN_KEYS = [
    b"scan/",
    b"scan/\x00",
    b"scan/a",
    b"scan/a.x",
    b"scan/a\xff",
    b"scan/ab",
    b"scan/ab.x",
    b"scan/b",
    b"scan/b.x",
    b"scan/c",
    b"scan/\x7f",
    b"scan/\xff",
    b"scan/\xff.x",
    b"scan/\xff\xff",
]


@pytest.fixture(scope="module")
def scan_data(client: Any) -> dict[bytes, bytes]:
    items = {k: b"value of " + k for k in SCAN_KEYS}
    put_all(client, items)
    return items


def expected(items: dict[bytes, bytes], pred: Any) -> list[tuple[bytes, bytes]]:
    return sorted((k, v) for k, v in items.items() if pred(k))


def test_scan_prefix(client: Any, scan_data: dict[bytes, bytes]) -> None:
    assert scan(client, prefix=b"scan/") == sorted(scan_data.items())
    assert scan(client, prefix=b"scan/a") == expected(scan_data, lambda k: k.startswith(b"scan/a"))
    assert scan(client, prefix=b"scan/ab") == [
        (b"scan/ab", b"value of scan/ab"),
        (b"scan/ab.x", b"value of scan/ab.x"),
    ]
    assert scan(client, prefix=b"scan/zzz") == []


def test_scan_prefix_ending_in_ff(client: Any, scan_data: dict[bytes, bytes]) -> None:
    assert scan(client, prefix=b"scan/\xff") == [
        (b"scan/\xff", b"value of scan/\xff"),
        (b"scan/\xff.x", b"value of scan/\xff.x"),
        (b"scan/\xff\xff", b"value of scan/\xff\xff"),
    ]
    assert scan(client, prefix=b"scan/\xff\xff") == [(b"scan/\xff\xff", b"value of scan/\xff\xff")]


def test_scan_suffix_only(client: Any, scan_data: dict[bytes, bytes]) -> None:
    # A suffix scan covers the whole keyspace: use a suffix no other test writes.
    assert scan(client, suffix=b".x") == expected(scan_data, lambda k: k.endswith(b".x"))


def test_scan_prefix_and_suffix(client: Any, scan_data: dict[bytes, bytes]) -> None:
    assert scan(client, prefix=b"scan/a", suffix=b".x") == [
        (b"scan/a.x", b"value of scan/a.x"),
        (b"scan/ab.x", b"value of scan/ab.x"),
    ]
    assert scan(client, prefix=b"scan/a", suffix=b".x", limit=1) == [
        (b"scan/a.x", b"value of scan/a.x")
    ]


def test_scan_range_start_inclusive_end_exclusive(
    client: Any, scan_data: dict[bytes, bytes]
) -> None:
    assert scan(client, start_key=b"scan/a", end_key=b"scan/b") == expected(
        scan_data, lambda k: b"scan/a" <= k < b"scan/b"
    )
    rows = scan(client, start_key=b"scan/ab", end_key=b"scan/b.x")
    assert [k for k, _ in rows] == [b"scan/ab", b"scan/ab.x", b"scan/a\xff", b"scan/b"]


def test_scan_start_only_and_end_only(client: Any, scan_data: dict[bytes, bytes]) -> None:
    # Keys above "scan/\xff" may exist from other tests; everything under the prefix must match.
    tail = scan(client, start_key=b"scan/\x7f")
    assert [kv for kv in tail if kv[0].startswith(b"scan/")] == expected(
        scan_data, lambda k: k >= b"scan/\x7f"
    )
    assert all(k >= b"scan/\x7f" for k, _ in tail)
    head = scan(client, end_key=b"scan/a")
    assert [kv for kv in head if kv[0].startswith(b"scan/")] == expected(
        scan_data, lambda k: k < b"scan/a"
    )
    assert all(k < b"scan/a" for k, _ in head)


def test_scan_limit(client: Any, scan_data: dict[bytes, bytes]) -> None:
    everything = sorted(scan_data.items())
    assert scan(client, prefix=b"scan/", limit=3) == everything[:3]
    assert scan(client, prefix=b"scan/", limit=1) == everything[:1]
    assert scan(client, prefix=b"scan/", limit=len(everything) + 5) == everything
    assert scan(client, start_key=b"scan/b", end_key=b"scan/c", limit=1) == [
        (b"scan/b", b"value of scan/b")
    ]


def test_full_scan_is_ascending_and_complete(client: Any, scan_data: dict[bytes, bytes]) -> None:
    rows = scan(client)
    keys = [k for k, _ in rows]
    assert keys == sorted(set(keys)), "full scan must be strictly ascending in byte order"
    assert [kv for kv in rows if kv[0].startswith(b"scan/")] == sorted(scan_data.items())
    stats = client.get_stats()
    assert stats.key_count == len(rows)


def test_scans_cross_page_boundaries(client: Any) -> None:
    # The node reads the store in pages of 1000 rows; 2500 keys take three pages.
    items = {b"pages/%05d%s" % (i, b".odd" if i % 2 else b""): b"%d" % i for i in range(2500)}
    put_all(client, items)
    everything = sorted(items.items())
    assert scan(client, prefix=b"pages/") == everything
    assert scan(client, prefix=b"pages/", limit=1500) == everything[:1500]
    assert scan(client, prefix=b"pages/", suffix=b".odd") == [
        kv for kv in everything if kv[0].endswith(b".odd")
    ]
    assert scan(client, start_key=b"pages/00999", end_key=b"pages/02001") == [
        kv for kv in everything if b"pages/00999" <= kv[0] < b"pages/02001"
    ]


# ---------------------------------------------------------------------- transactions


def test_transaction_commit_makes_writes_visible(client: Any) -> None:
    put_all(client, {b"txc/keep": b"k", b"txc/gone": b"g"})
    tx = client.begin_transaction()
    assert tx.put(b"txc/new", b"n") is True
    assert tx.put(b"txc/keep", b"k2") is True
    assert tx.delete(b"txc/gone") is True
    # Nothing is visible outside before commit.
    assert client.get(b"txc/new") == (b"", False)
    assert client.get(b"txc/keep") == (b"k", True)
    assert client.get(b"txc/gone") == (b"g", True)
    tx.commit()
    assert scan(client, prefix=b"txc/") == [(b"txc/keep", b"k2"), (b"txc/new", b"n")]


def test_transaction_commit_is_atomic_to_concurrent_readers(client: Any, node: NodeProcess) -> None:
    n = 400
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        with node.channel() as channel:
            raw = kevo_stub(channel)
            try:
                while not done.is_set():
                    rows = list(raw.Scan(pb.ScanRequest(prefix=b"txatomic/"), timeout=30))
                    seen.append(len(rows))
            except BaseException as err:  # reported in the main thread
                errors.append(err)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        tx = client.begin_transaction()
        for i in range(n):
            tx.put(b"txatomic/%04d" % i, b"v")
        while len(seen) < 3 and not errors:
            done.wait(0.01)
        tx.commit()
        before = len(seen)
        while len(seen) < before + 3 and not errors:
            done.wait(0.01)
    finally:
        done.set()
        thread.join()
    assert not errors, errors
    assert seen[0] == 0 and seen[-1] == n
    assert set(seen) <= {0, n}, f"a reader saw a partly applied commit: {sorted(set(seen))}"


def test_transaction_rollback_discards(client: Any) -> None:
    assert client.put(b"txr/a", b"a") is True
    tx = client.begin_transaction()
    tx.put(b"txr/a", b"changed")
    tx.put(b"txr/b", b"b")
    tx.delete(b"txr/a")
    tx.rollback()
    assert scan(client, prefix=b"txr/") == [(b"txr/a", b"a")]


def test_transaction_reads_its_own_writes(client: Any) -> None:
    put_all(client, {b"txo/a": b"a0", b"txo/c": b"c0", b"txo/e": b"e0", b"txo/g": b"g0"})
    tx = client.begin_transaction()
    try:
        tx.put(b"txo/b", b"b1")  # new key between stored ones
        tx.put(b"txo/c", b"c1")  # overwrites a stored key
        tx.delete(b"txo/e")  # hides a stored key
        tx.put(b"txo/h", b"h1")  # after the last stored key
        tx.put(b"txo/f", b"f1")
        tx.delete(b"txo/f")  # a buffered put then a buffered delete: gone
        tx.put(b"txo/0", b"")  # an empty value before everything
        assert tx.get(b"txo/b") == (b"b1", True)
        assert tx.get(b"txo/c") == (b"c1", True)
        assert tx.get(b"txo/e") == (b"", False)
        assert tx.get(b"txo/f") == (b"", False)
        assert tx.get(b"txo/a") == (b"a0", True)  # stored data shows through
        assert tx.get(b"txo/0") == (b"", True)
        assert tx_scan(tx, prefix=b"txo/") == [
            (b"txo/0", b""),
            (b"txo/a", b"a0"),
            (b"txo/b", b"b1"),
            (b"txo/c", b"c1"),
            (b"txo/g", b"g0"),
            (b"txo/h", b"h1"),
        ]
        assert tx_scan(tx, start_key=b"txo/b", end_key=b"txo/g") == [
            (b"txo/b", b"b1"),
            (b"txo/c", b"c1"),
        ]
        assert tx_scan(tx, prefix=b"txo/", limit=3) == [
            (b"txo/0", b""),
            (b"txo/a", b"a0"),
            (b"txo/b", b"b1"),
        ]
        assert tx_scan(tx, prefix=b"txo/", suffix=b"1") == []  # suffix of the key, not value
        assert tx_scan(tx, prefix=b"txo/", suffix=b"h") == [(b"txo/h", b"h1")]
        # Other readers still see only stored data.
        assert scan(client, prefix=b"txo/") == [
            (b"txo/a", b"a0"),
            (b"txo/c", b"c0"),
            (b"txo/e", b"e0"),
            (b"txo/g", b"g0"),
        ]
        tx.commit()
    except BaseException:
        if not tx.is_closed():
            tx.rollback()
        raise
    assert scan(client, prefix=b"txo/") == [
        (b"txo/0", b""),
        (b"txo/a", b"a0"),
        (b"txo/b", b"b1"),
        (b"txo/c", b"c1"),
        (b"txo/g", b"g0"),
        (b"txo/h", b"h1"),
    ]


def test_transaction_sees_live_data_written_outside_it(client: Any) -> None:
    # No snapshot isolation (as in Kevo): reads fall through to the live store.
    tx = client.begin_transaction()
    client.put(b"txlive/k", b"outside")
    assert tx.get(b"txlive/k") == (b"outside", True)
    tx.rollback()


def test_read_only_transaction(client: Any) -> None:
    put_all(client, {b"txro/a": b"1", b"txro/b": b"2"})
    tx = client.begin_transaction(read_only=True)
    assert tx.is_read_only()
    assert tx.get(b"txro/a") == (b"1", True)
    assert tx.get(b"txro/zz") == (b"", False)
    assert tx_scan(tx, prefix=b"txro/") == [(b"txro/a", b"1"), (b"txro/b", b"2")]
    tx.commit()
    assert tx.is_closed()
    assert scan(client, prefix=b"txro/") == [(b"txro/a", b"1"), (b"txro/b", b"2")]


def test_finished_transaction_cannot_be_used(client: Any, stub: Any) -> None:
    tx = client.begin_transaction()
    tx_id = tx._id
    tx.put(b"txdone/k", b"v")
    tx.commit()
    assert client.get(b"txdone/k") == (b"v", True)
    # Directly to the node: the id is gone, a second commit is a transaction error.
    with pytest.raises(grpc.RpcError) as info:
        stub.CommitTransaction(pb.CommitTransactionRequest(transaction_id=tx_id), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as info:
        stub.TxGet(pb.TxGetRequest(transaction_id=tx_id, key=b"txdone/k"), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "transaction not found" in (info.value.details() or "")


def test_sdk_maps_unknown_transaction_to_transaction_error(client: Any) -> None:
    tx = Transaction(client._connection, "tx-rw-nosuch-1", False)
    with pytest.raises(TransactionError, match="transaction not found"):
        tx.put(b"txunknown/k", b"v")
    assert client.get(b"txunknown/k") == (b"", False)


# ---------------------------------------------------------------------- node


def test_get_stats_key_count_is_exact(client: Any) -> None:
    before = client.get_stats().key_count
    assert before == len(scan(client))
    put_all(client, {b"stats/%02d" % i: b"x" for i in range(25)})
    assert client.get_stats().key_count == before + 25
    client.put(b"stats/00", b"overwrite")  # overwriting adds no key
    assert client.get_stats().key_count == before + 25
    assert client.batch_write([BatchOperation(DELETE, b"stats/%02d" % i) for i in range(10)])
    stats = client.get_stats()
    assert stats.key_count == before + 15
    assert stats.storage_size > 0


def test_get_stats_raw_counters(stub: Any) -> None:
    first = stub.GetStats(pb.GetStatsRequest(), timeout=10)
    stub.Put(pb.PutRequest(key=b"rawstats/k", value=b"12345"), timeout=10)
    stub.Get(pb.GetRequest(key=b"rawstats/k"), timeout=10)
    second = stub.GetStats(pb.GetStatsRequest(), timeout=10)
    assert second.operation_counts["put_ops"] == first.operation_counts["put_ops"] + 1
    assert second.operation_counts["get_ops"] == first.operation_counts["get_ops"] + 1
    assert second.total_bytes_written >= first.total_bytes_written + len(b"rawstats/k12345")
    assert second.total_bytes_read >= first.total_bytes_read + 5
    assert second.storage_size > 0


def test_get_node_info(client: Any, stub: Any) -> None:
    info = client.get_node_info()
    assert info.node_role == NodeRole.STANDALONE
    assert info.read_only is False
    assert info.primary_address == ""
    assert info.replicas == []
    client.put(b"nodeinfo/k", b"v")
    raw = stub.GetNodeInfo(pb.GetNodeInfoRequest(), timeout=10)
    assert raw.node_role == pb.GetNodeInfoResponse.STANDALONE
    assert raw.read_only is False
    assert raw.last_sequence > 0
    assert raw.version.startswith("1.4.2")


def test_compact(client: Any, stub: Any) -> None:
    before = stub.GetStats(pb.GetStatsRequest(), timeout=10).compaction_count
    assert client.compact() is True
    assert stub.Compact(pb.CompactRequest(force=True), timeout=30).success is True
    after = stub.GetStats(pb.GetStatsRequest(), timeout=10)
    assert after.compaction_count == before + 2
    # Compaction changes no data: Kevo's force marker key is not written.
    assert client.get(b"__compact_marker__") == (b"", False)


def test_health_service_serving(node: NodeProcess) -> None:
    with node.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kevo.KevoService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_kevo_service(node: NodeProcess) -> None:
    with node.channel() as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="kevo.KevoService"),
        ]
        replies = list(reflection.ServerReflectionInfo(iter(requests), timeout=10))
    assert len(replies) == 2
    names = {s.name for s in replies[0].list_services_response.service}
    assert "kevo.KevoService" in names
    assert "grpc.health.v1.Health" in names
    files = replies[1].file_descriptor_response.file_descriptor_proto
    assert files, replies[1]
    from google.protobuf import descriptor_pb2

    protos = [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in files]
    services = {f"{p.package}.{s.name}" for p in protos for s in p.service}
    assert "kevo.KevoService" in services


def test_sdk_validation_error_for_bad_key(client: Any) -> None:
    with pytest.raises(ValidationError, match="invalid key size"):
        client.get(b"k" * 512)
    with pytest.raises(ValidationError, match="invalid key size"):
        client.delete(b"k" * 512)
    # The connection is still usable afterwards.
    assert client.put(b"afterbad/k", b"v") is True
    assert client.get(b"afterbad/k") == (b"v", True)


def test_node_survives_restart_with_data(tmp_path: Path) -> None:
    with NodeProcess(tmp_path, free_port()) as proc:
        c = Client(ClientOptions(endpoint=proc.address))
        c.connect()
        c.put(b"restart/a", b"1")
        c.batch_write([BatchOperation(PUT, b"restart/b", b"2"), BatchOperation(DELETE, b"x")])
        c.close()
        assert proc.stop() == 0
        proc.start()
        c = Client(ClientOptions(endpoint=proc.address))
        c.connect()
        try:
            assert scan(c) == [(b"restart/a", b"1"), (b"restart/b", b"2")]
            assert c.get_stats().key_count == 2
        finally:
            c.close()
