"""`kevo-repl demo`: the WAL, then a node, at work in a scratch directory, in a few seconds."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc

from kevo_repl import walcli
from kevo_repl.proto import service_pb2 as pb
from kevo_repl.proto import service_pb2_grpc
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
    return code or run_node_demo(directory)


async def _writers(wal: WAL, tasks: int, each: int) -> None:
    async def writer(n: int) -> None:
        for i in range(each):
            await wal.append_async(Op.PUT, f"writer:{n}:{i}".encode(), b'{"n": %d}' % i)

    await asyncio.gather(*(writer(n) for n in range(tasks)))


def run_node_demo(directory: str) -> int:
    """Start a node, write through gRPC, SIGKILL it and restart it: every acknowledged write is
    back."""
    data = os.path.join(directory, "node")
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    print(f"\nnode: kevo-repl serve --data-dir {data} --listen {addr}")
    node = _start_node(data, addr)
    with grpc.insecure_channel(addr) as channel:
        stub = service_pb2_grpc.KevoServiceStub(channel)  # type: ignore[no-untyped-call]
        for i in range(100):
            stub.Put(pb.PutRequest(key=b"demo:%03d" % i, value=b"value %d" % i), timeout=10)
        ops = [
            pb.Operation(type=pb.Operation.PUT, key=b"order:%d" % i, value=b"x") for i in range(10)
        ]
        stub.BatchWrite(pb.BatchWriteRequest(operations=ops), timeout=10)
        print("wrote 100 puts and an atomic batch of 10; every write acknowledged (fsynced)")
    node.send_signal(signal.SIGKILL)
    node.wait(10)
    print(f"killed the node with SIGKILL (pid {node.pid}); restarting it on the same data")
    node = _start_node(data, addr)
    try:
        with grpc.insecure_channel(addr) as channel:
            stub = service_pb2_grpc.KevoServiceStub(channel)  # type: ignore[no-untyped-call]
            rows = list(stub.Scan(pb.ScanRequest(), timeout=10))
            stats = stub.GetStats(pb.GetStatsRequest(), timeout=10)
        print(f"after restart: {len(rows)} keys (expected 110), key_count {stats.key_count}")
        return 0 if len(rows) == 110 else 1
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_node(data: str, addr: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "kevo_repl.cli", "serve", "--data-dir", data, "--listen", addr]
    node = subprocess.Popen([*cmd, "--log-level", "warning"])
    with grpc.insecure_channel(addr) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=20)
        except grpc.FutureTimeoutError:
            node.kill()
            raise SystemExit(f"the node did not start on {addr}") from None
    return node
