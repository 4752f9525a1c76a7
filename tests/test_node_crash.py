"""A real node SIGKILLed under write load, then restarted on the same data directory.

Checks: every acknowledged write survives; every batch is all-or-nothing; the store equals a
replay of the WAL (read with the `wal dump` readers after a clean stop). Plus a clean-stop restart
with `--sync-mode none`, and a deterministic in-process check of the engine's apply ordering.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from nodeproc import NodeProcess, free_port, kevo_stub

from kevo_repl import fsutil
from kevo_repl.node.engine import Engine, Limits
from kevo_repl.proto import service_pb2 as pb
from kevo_repl.store import MemoryStore
from kevo_repl.wal import WAL, Op, RetentionPolicy, SyncMode, WalOptions
from kevo_repl.wal.segment import Outcome
from kevo_repl.walcli import FileVerdict, read_units, resolve

pytestmark = pytest.mark.slow

WRITERS = 3
BATCH_OPS = 10
LOAD_S = 1.5


@dataclass
class WriterLog:
    """What one writer thread attempted and what the node acknowledged (RPC returned OK)."""

    puts: dict[bytes, bytes] = field(default_factory=dict)  # attempted single puts
    acked_puts: set[bytes] = field(default_factory=set)
    deletes: set[bytes] = field(default_factory=set)  # attempted deletes (of earlier put keys)
    acked_deletes: set[bytes] = field(default_factory=set)
    batches: dict[str, dict[bytes, bytes]] = field(default_factory=dict)  # batch id -> its puts
    acked_batches: set[str] = field(default_factory=set)
    error: BaseException | None = None
    stopped_by: grpc.StatusCode | None = None


def writer(
    address: str, t: int, stop: threading.Event, killing: threading.Event, out: WriterLog
) -> None:
    """Put(sync=True), BatchWrite and Delete(sync=True) until stopped or the node goes away."""
    with grpc.insecure_channel(address) as channel:
        stub = kevo_stub(channel)
        i = 0
        try:
            while not stop.is_set():
                i += 1
                key = b"crash/p/%d/%06d" % (t, i)
                value = b"put-%d-%d" % (t, i)
                out.puts[key] = value
                stub.Put(pb.PutRequest(key=key, value=value, sync=True), timeout=10)
                out.acked_puts.add(key)

                batch_id = f"b{t}.{i}"
                items = {
                    b"crash/b/%s/%02d" % (batch_id.encode(), n): b"batch %s op %d"
                    % (batch_id.encode(), n)
                    for n in range(BATCH_OPS)
                }
                out.batches[batch_id] = items
                ops = [
                    pb.Operation(type=pb.Operation.PUT, key=k, value=v) for k, v in items.items()
                ]
                stub.BatchWrite(pb.BatchWriteRequest(operations=ops, sync=i % 2 == 0), timeout=10)
                out.acked_batches.add(batch_id)

                if i % 4 == 0:
                    victim = b"crash/p/%d/%06d" % (t, i - 2)
                    out.deletes.add(victim)
                    stub.Delete(pb.DeleteRequest(key=victim, sync=True), timeout=10)
                    out.acked_deletes.add(victim)
        except grpc.RpcError as err:
            if killing.is_set():  # whatever the code, the node went away under this RPC
                out.stopped_by = err.code()
            else:
                out.error = err
        except BaseException as err:
            out.error = err


def full_scan(address: str) -> dict[bytes, bytes]:
    with grpc.insecure_channel(address) as channel:
        rows = kevo_stub(channel).Scan(pb.ScanRequest(), timeout=60)
        out: dict[bytes, bytes] = {}
        for row in rows:
            assert row.key not in out, "a full scan returned a key twice"
            out[row.key] = row.value
        return out


def wal_replay(wal_dir: Path) -> tuple[dict[bytes, bytes], list[int]]:
    """The key/value state from applying every WAL entry in log order, and the sequences seen."""
    _, files = resolve(str(wal_dir))
    assert files, f"no WAL segments in {wal_dir}"
    state: dict[bytes, bytes] = {}
    seqs: list[int] = []
    verdicts: list[FileVerdict] = []
    for file in files:
        for unit in read_units(file, verdicts):
            for entry in unit.entries:
                seqs.append(entry.seq)
                if entry.op == Op.DELETE:
                    state.pop(entry.key, None)
                else:
                    state[entry.key] = entry.value
        assert verdicts[-1].end.outcome is Outcome.CLEAN, verdicts[-1]
    return state, seqs


def run_load_and_kill(node: NodeProcess) -> list[WriterLog]:
    stop = threading.Event()
    killing = threading.Event()
    logs = [WriterLog() for _ in range(WRITERS)]
    threads = [
        threading.Thread(target=writer, args=(node.address, t, stop, killing, logs[t]), daemon=True)
        for t in range(WRITERS)
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(LOAD_S)
        assert node.poll() is None, node.stderr()
        killing.set()
        assert node.kill() == -9  # mid-load: the writers are still sending
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    for log in logs:
        assert log.error is None, repr(log.error)
        assert not any(t.is_alive() for t in threads)
    return logs


def test_sigkill_under_load_keeps_acked_writes_atomic_batches_and_matches_wal(
    tmp_path: Path,
) -> None:
    data = tmp_path / "node"
    with NodeProcess(data, free_port()) as node:  # default sync mode: immediate
        logs = run_load_and_kill(node)
        acked = sum(len(log.acked_puts) + len(log.acked_batches) for log in logs)
        assert acked >= WRITERS, "the writers got (almost) nothing acknowledged before the kill"
        assert any(log.stopped_by is not None for log in logs), "no writer was cut off by the kill"

        node.start()
        stored = full_scan(node.address)
        assert node.stop() == 0, node.stderr()

    # 1. Every acknowledged write is there (unless a later delete of it was attempted).
    for log in logs:
        for key in log.acked_puts:
            if key in log.acked_deletes:
                assert key not in stored, f"acknowledged delete of {key!r} was lost"
            elif key not in log.deletes:
                assert stored.get(key) == log.puts[key], f"acknowledged put of {key!r} was lost"
        for batch_id in log.acked_batches:
            for key, value in log.batches[batch_id].items():
                assert stored.get(key) == value, f"acknowledged batch {batch_id} lost {key!r}"

    # 2. Every batch, acknowledged or in flight, is all or nothing.
    for log in logs:
        for batch_id, items in log.batches.items():
            present = [stored.get(k) == v for k, v in items.items()]
            assert all(present) or not any(present), f"batch {batch_id} partly applied: {present}"

    # 3. Nothing appeared that nobody wrote.
    attempted: dict[bytes, bytes] = {}
    for log in logs:
        attempted.update(log.puts)
        for items in log.batches.values():
            attempted.update(items)
    for key, value in stored.items():
        assert attempted.get(key) == value, f"unexpected {key!r} = {value!r}"

    # 4. The store is exactly a replay of the WAL, and the WAL's sequence numbers have no holes.
    replayed, seqs = wal_replay(data / "wal")
    assert seqs == list(range(1, len(seqs) + 1)), "WAL sequence numbers are not 1..n"
    assert replayed == stored


def test_clean_restart_with_sync_mode_none(tmp_path: Path) -> None:
    data = tmp_path / "node"
    expected: dict[bytes, bytes] = {}
    with NodeProcess(data, free_port(), "--sync-mode", "none") as node:
        with node.channel() as channel:
            stub = kevo_stub(channel)
            for i in range(300):
                key, value = b"none/%04d" % i, b"v%d" % i
                stub.Put(pb.PutRequest(key=key, value=value), timeout=10)
                expected[key] = value
            ops = [
                pb.Operation(type=pb.Operation.PUT, key=b"none/batch/%03d" % n, value=b"b%d" % n)
                for n in range(200)
            ]
            stub.BatchWrite(pb.BatchWriteRequest(operations=ops), timeout=10)
            expected.update({op.key: op.value for op in ops})
            for i in range(0, 300, 3):
                stub.Delete(pb.DeleteRequest(key=b"none/%04d" % i), timeout=10)
                del expected[b"none/%04d" % i]
            tx = stub.BeginTransaction(pb.BeginTransactionRequest(), timeout=10).transaction_id
            stub.TxPut(pb.TxPutRequest(transaction_id=tx, key=b"none/tx", value=b"t"), timeout=10)
            stub.CommitTransaction(pb.CommitTransactionRequest(transaction_id=tx), timeout=10)
            expected[b"none/tx"] = b"t"
        assert full_scan(node.address) == expected
        assert node.stop() == 0, node.stderr()  # SIGTERM: the WAL is flushed on the way out

        replayed, seqs = wal_replay(data / "wal")
        assert replayed == expected
        assert seqs == list(range(1, len(seqs) + 1))

        node.start()
        assert full_scan(node.address) == expected
        with node.channel() as channel:
            stats = kevo_stub(channel).GetStats(pb.GetStatsRequest(), timeout=10)
        assert stats.key_count == len(expected)
        assert node.stop() == 0, node.stderr()


def test_sigkill_with_no_load_loses_nothing_acknowledged_as_synced(tmp_path: Path) -> None:
    data = tmp_path / "node"
    with NodeProcess(data, free_port(), "--sync-mode", "none") as node:
        with node.channel() as channel:
            stub = kevo_stub(channel)
            stub.Put(pb.PutRequest(key=b"k/sync", value=b"1", sync=True), timeout=10)
            ops = [
                pb.Operation(type=pb.Operation.PUT, key=b"k/b%d" % n, value=b"b") for n in range(5)
            ]
            stub.BatchWrite(pb.BatchWriteRequest(operations=ops, sync=True), timeout=10)
        node.kill()
        node.start()
        stored = full_scan(node.address)
        assert node.stop() == 0, node.stderr()
    assert stored == {b"k/sync": b"1", **{b"k/b%d" % n: b"b" for n in range(5)}}
    replayed, _ = wal_replay(data / "wal")
    assert replayed == stored


def test_sigkill_in_sync_mode_none_leaves_store_equal_to_wal(tmp_path: Path) -> None:
    # Unsynced writes may be lost in mode none, but store and WAL (the replication source) must
    # agree on which: either both have a write or neither does.
    data = tmp_path / "node"
    args = ("--sync-mode", "none", "--checkpoint-interval-ms", "600000")
    with NodeProcess(data, free_port(), *args) as node:
        with node.channel() as channel:
            stub = kevo_stub(channel)
            stub.Put(pb.PutRequest(key=b"n/synced", value=b"1", sync=True), timeout=10)
            for i in range(10):
                stub.Put(pb.PutRequest(key=b"n/%d" % i, value=b"unsynced"), timeout=10)
        node.kill()
        node.start()
        stored = full_scan(node.address)
        with node.channel() as channel:
            stub = kevo_stub(channel)
            stub.Put(pb.PutRequest(key=b"n/after", value=b"2", sync=True), timeout=10)
        stored[b"n/after"] = b"2"
        assert node.stop() == 0, node.stderr()
    assert stored.get(b"n/synced") == b"1"
    replayed, seqs = wal_replay(data / "wal")
    assert replayed == stored
    assert seqs == list(range(1, len(seqs) + 1)), f"WAL sequence numbers have holes: {seqs}"


# ---------------------------------------------------------------------- in-process engine


def test_immediate_mode_never_applies_a_write_before_it_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Write A's fsync is held; write B is appended meanwhile; B's own fsync is held too.

    When A returns, B is not durable, so B must not be visible yet.
    """
    gates = [threading.Event(), threading.Event()]
    entered = [threading.Event(), threading.Event()]
    calls = 0
    real_fsync = fsutil.fsync_fd

    def gated_fsync(fd: int) -> None:
        nonlocal calls
        n = min(calls, 1)
        calls += 1
        entered[n].set()
        assert gates[n].wait(10), "test gate never opened"
        real_fsync(fd)

    async def scenario() -> tuple[bytes | None, int, int]:
        wal = WAL.open(str(tmp_path / "wal"), WalOptions(sync_mode=SyncMode.IMMEDIATE))
        store = MemoryStore()
        engine = Engine(wal, store, Limits(key_bytes_max=511), RetentionPolicy())
        try:
            # The first append cuts a segment (with fsyncs of its own): do it before gating.
            await engine.put(b"setup", b"0")
            monkeypatch.setattr(fsutil, "fsync_fd", gated_fsync)
            task_a = asyncio.create_task(engine.put(b"a", b"1"))
            while not entered[0].is_set():
                await asyncio.sleep(0.001)  # the sync thread is inside A's fsync
            task_b = asyncio.create_task(engine.put(b"b", b"2"))
            for _ in range(5):
                await asyncio.sleep(0)  # B appends and waits for durability
            seq_b = wal.last_seq
            gates[0].set()  # A becomes durable; B's fsync (the next one) stays held
            await task_a
            seen = store.get(b"b")
            durable = wal.durable_seq
            gates[1].set()
            await task_b
            return seen, durable, seq_b
        finally:
            for gate in gates:
                gate.set()
            monkeypatch.setattr(fsutil, "fsync_fd", real_fsync)
            await engine.close()

    seen_b, durable_then, seq_b = asyncio.run(scenario())
    assert durable_then < seq_b  # the scenario did hold B's fsync
    assert seen_b is None, "B was applied to the store before its WAL entry was durable"
