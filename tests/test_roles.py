"""Node roles in KevoService: a replica refuses writes the way the python-kevo SDK redirects."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from kevo_repl.node.engine import Engine, WalOpener
from kevo_repl.node.service import Counters, KevoService, Role
from kevo_repl.node.transactions import TxRegistry
from kevo_repl.proto import service_pb2 as pb
from kevo_repl.proto import service_pb2_grpc as pb_grpc
from kevo_repl.store import MAX_KEY_BYTES, MemoryStore
from kevo_repl.wal import RetentionPolicy, WalOptions


def _serve_and_call(
    tmp_path: Path, role: Role, calls: list[str]
) -> list[grpc.aio.AioRpcError | object]:
    async def main() -> list[grpc.aio.AioRpcError | object]:
        opener = WalOpener(str(tmp_path / "wal"), WalOptions())
        engine = Engine.open(opener, MemoryStore(), RetentionPolicy(), MAX_KEY_BYTES)
        server = grpc.aio.server()
        service = KevoService(engine, TxRegistry(time.monotonic), Counters(), role)
        pb_grpc.add_KevoServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        results: list[grpc.aio.AioRpcError | object] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.KevoServiceStub(channel)  # type: ignore[no-untyped-call]
                requests = {
                    "put": lambda: stub.Put(pb.PutRequest(key=b"k", value=b"v")),
                    "delete": lambda: stub.Delete(pb.DeleteRequest(key=b"k")),
                    "batch": lambda: stub.BatchWrite(
                        pb.BatchWriteRequest(operations=[pb.Operation(key=b"k", value=b"v")])
                    ),
                    "begin_rw": lambda: stub.BeginTransaction(pb.BeginTransactionRequest()),
                    "begin_ro": lambda: stub.BeginTransaction(
                        pb.BeginTransactionRequest(read_only=True)
                    ),
                    "get": lambda: stub.Get(pb.GetRequest(key=b"k")),
                    "info": lambda: stub.GetNodeInfo(pb.GetNodeInfoRequest()),
                }
                for name in calls:
                    try:
                        results.append(await requests[name]())
                    except grpc.aio.AioRpcError as err:
                        results.append(err)
        finally:
            await server.stop(None)
            await engine.close()
        return results

    return asyncio.run(main())


def test_replica_refuses_writes_with_the_sdk_redirect(tmp_path: Path) -> None:
    from kevo.errors import ReadOnlyError, handle_grpc_error

    role = Role(
        name="replica", client_address="127.0.0.1:7002", primary_client_address="127.0.0.1:50999"
    )
    results = _serve_and_call(
        tmp_path, role, ["put", "delete", "batch", "begin_rw", "begin_ro", "get"]
    )
    for err in results[:4]:
        assert isinstance(err, grpc.aio.AioRpcError)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        mapped = handle_grpc_error(err, "write")  # the SDK's own mapping
        assert isinstance(mapped, ReadOnlyError)
        assert mapped.primary_address == "127.0.0.1:50999"
    assert isinstance(results[4], pb.BeginTransactionResponse)  # read-only work is fine
    assert isinstance(results[5], pb.GetResponse) and not results[5].found


@pytest.mark.parametrize(
    ("name", "role_enum", "primary", "read_only"),
    [
        ("standalone", pb.GetNodeInfoResponse.STANDALONE, "", False),
        ("primary", pb.GetNodeInfoResponse.PRIMARY, "127.0.0.1:7001", False),
        ("replica", pb.GetNodeInfoResponse.REPLICA, "127.0.0.1:7000", True),
    ],
)
def test_node_info_reports_role_and_client_addresses(
    tmp_path: Path, name: str, role_enum: int, primary: str, read_only: bool
) -> None:
    replica = pb.ReplicaInfo(address="127.0.0.1:7002", last_sequence=5, available=True)
    role = Role(
        name=name,
        client_address="127.0.0.1:7001",
        primary_client_address="127.0.0.1:7000",
        replicas=lambda: [replica] if name == "primary" else [],
    )
    (info,) = _serve_and_call(tmp_path, role, ["info"])
    assert isinstance(info, pb.GetNodeInfoResponse)
    assert (info.node_role, info.primary_address, info.read_only) == (role_enum, primary, read_only)
    assert [r.address for r in info.replicas] == (["127.0.0.1:7002"] if name == "primary" else [])
