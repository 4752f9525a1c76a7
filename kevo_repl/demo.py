"""`kevo-repl demo`: a primary and two replicas on loopback (or, with --wal, the WAL alone)."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import tempfile
import time

import grpc

from kevo_repl import walcli
from kevo_repl.localnode import free_port, start_node
from kevo_repl.proto import replication_pb2, replication_pb2_grpc, service_pb2_grpc
from kevo_repl.proto import service_pb2 as pb
from kevo_repl.wal import WAL, Op, SyncMode, WalOptions


def run_wal_demo(directory: str | None) -> int:
    directory = directory or tempfile.mkdtemp(prefix="kevo-repl-demo-")
    wal_dir = os.path.join(directory, "wal")
    print(f"WAL directory: {wal_dir}")
    wal = WAL.open(wal_dir, WalOptions(sync_mode=SyncMode.IMMEDIATE, segment_bytes_max=256 * 1024))
    started = time.perf_counter()
    asyncio.run(_writers(wal, tasks=16, each=250))
    elapsed = time.perf_counter() - started
    print(f"16 concurrent writers, 4000 durable appends in {elapsed:.2f}s (group commit)")
    start = wal.append_batch([(Op.PUT, b"account:a", b"90"), (Op.PUT, b"account:b", b"110")])
    wal.append(Op.PUT, b"big", b"x" * 100_000)  # fragmented into FIRST/MIDDLE/LAST records
    wal.append(Op.DELETE, b"writer:0:0")
    print(
        f"atomic batch at seq {start}; last seq {wal.last_seq}; {len(wal.segment_paths())} segments"
    )
    last_file = wal.segment_paths()[-1]
    wal.close()

    with open(last_file, "ab") as f:  # what a crash in the middle of an append leaves behind
        f.write(b"\x12\x34\x56\x78\x40\x00\x01partial")
    print(f"simulated a crash: appended a half-written record to {os.path.basename(last_file)}")
    wal = WAL.open(wal_dir)
    torn = wal.recovery.torn
    if torn is not None:
        print(
            f"recovery cut {torn.bytes_cut} torn bytes at offset {torn.offset}; "
            f"kept in {torn.kept_at}"
        )
    print(f"recovered: last seq {wal.last_seq}, next seq {wal.next_seq}")
    tail = list(wal.entries_from(wal.last_seq - 2))
    wal.close()
    for entry in tail:
        print(f"  seq {entry.seq} {entry.op.name.lower()} {entry.key!r} ({len(entry.value)} bytes)")
    report = io.StringIO()
    code = walcli.verify(wal_dir, report)
    print(f"wal verify: exit {code} over {report.getvalue().count(chr(10))} segment(s)")
    return code


async def _writers(wal: WAL, tasks: int, each: int) -> None:
    async def writer(n: int) -> None:
        for i in range(each):
            await wal.append_async(Op.PUT, f"writer:{n}:{i}".encode(), b'{"n": %d}' % i)

    await asyncio.gather(*(writer(n) for n in range(tasks)))


def run_cluster_demo(directory: str | None) -> int:
    """A primary and two replicas on loopback: writes replicate, a killed replica catches up."""
    directory = directory or tempfile.mkdtemp(prefix="kevo-repl-demo-")
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    primary = addrs[0]
    print(f"data in {directory}")
    nodes = [start_node(os.path.join(directory, "primary"), primary, "--role", "primary")]
    for i, addr in enumerate(addrs[1:], 1):
        data = os.path.join(directory, f"replica{i}")
        nodes.append(start_node(data, addr, "--role", "replica", "--primary", primary))
    print(f"primary {primary}, replicas {addrs[1]} and {addrs[2]}")
    try:
        return _cluster_story(directory, addrs, nodes)
    finally:
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            node.wait(30)


def _cluster_story(directory: str, addrs: list[str], nodes: list[subprocess.Popen[bytes]]) -> int:
    primary = addrs[0]
    _write(primary, "order", 1000)
    print("wrote 1000 keys and an atomic batch of 10 to the primary")
    if not _converged(addrs):
        return 1
    _show_redirect(addrs[1])
    nodes[2].send_signal(signal.SIGKILL)
    nodes[2].wait(10)
    print(f"killed replica {addrs[2]} with SIGKILL; writing 1000 more keys while it is down")
    _write(primary, "late", 1000)
    nodes[2] = start_node(
        os.path.join(directory, "replica2"), addrs[2], "--role", "replica", "--primary", primary
    )
    print(f"restarted replica {addrs[2]}: it resumes from its own WAL's position")
    if not _converged(addrs):
        return 1
    status = subprocess.run(
        [sys.executable, "-m", "kevo_repl.cli", "status", "--addr", primary],
        capture_output=True,
        text=True,
        check=False,
    )
    print(f"kevo-repl status --addr {primary}\n{status.stdout.rstrip()}")
    return 0


def _write(addr: str, tag: str, n: int) -> None:
    with grpc.insecure_channel(addr) as channel:
        stub = service_pb2_grpc.KevoServiceStub(channel)  # type: ignore[no-untyped-call]
        for i in range(n):
            value = b'{"n": %d, "tag": "%s"}' % (i, tag.encode())
            stub.Put(pb.PutRequest(key=b"%s:%05d" % (tag.encode(), i), value=value), timeout=10)
        ops = [
            pb.Operation(type=pb.Operation.PUT, key=b"%s:batch:%d" % (tag.encode(), i), value=b"x")
            for i in range(10)
        ]
        stub.BatchWrite(pb.BatchWriteRequest(operations=ops), timeout=10)


def _digest(addr: str) -> tuple[int, str]:
    """(applied sequence, sha256) as the node computes it (`kevo-repl digest`)."""
    with grpc.insecure_channel(addr) as channel:
        stub = replication_pb2_grpc.WALReplicationServiceStub(channel)  # type: ignore[no-untyped-call]
        digest = stub.GetDigest(replication_pb2.DigestRequest(), timeout=30)
    return digest.applied_sequence, digest.sha256


def _key_count(addr: str) -> int:
    with grpc.insecure_channel(addr) as channel:
        stub = service_pb2_grpc.KevoServiceStub(channel)  # type: ignore[no-untyped-call]
        return int(stub.GetStats(pb.GetStatsRequest(), timeout=30).key_count)


def _converged(addrs: list[str], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        digests = [_digest(a) for a in addrs]
        if len(set(digests)) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for addr, (applied, digest) in zip(addrs, digests, strict=True):
        print(f"  {addr}: {_key_count(addr)} keys, digest {digest[:16]} at sequence {applied}")
    same = len(set(digests)) == 1
    print("  all three nodes hold the same data" if same else "  NOT CONVERGED")
    return same


def _show_redirect(replica: str) -> None:
    with grpc.insecure_channel(replica) as channel:
        stub = service_pb2_grpc.KevoServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.Put(pb.PutRequest(key=b"nope", value=b"x"), timeout=10)
        except grpc.RpcError as err:
            print(f"a write to replica {replica} is refused: {err.code().name}: {err.details()}")
