"""The engine in process, through the Store seam: replay, retention behind checkpoints, lost WAL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kevo_repl.errors import InvalidArgumentError
from kevo_repl.node.engine import Engine, RecoveryError, WalOpener
from kevo_repl.store import MAX_KEY_BYTES, LmdbStore, MemoryStore
from kevo_repl.store.base import Store
from kevo_repl.wal import WAL, Op, RetentionPolicy, SyncMode, WalOptions

SMALL = WalOptions(sync_mode=SyncMode.IMMEDIATE, segment_bytes_max=4096)


def _open(path: Path, store: Store, retain: int = 0) -> Engine:
    opener = WalOpener(str(path / "wal"), SMALL)
    return Engine.open(opener, store, RetentionPolicy(max_total_bytes=retain), MAX_KEY_BYTES)


def test_writes_visible_and_batch_atomic(tmp_path: Path) -> None:
    async def run() -> None:
        engine = _open(tmp_path, MemoryStore())
        seq = await engine.put(b"a", b"1")
        assert engine.get(b"a") == b"1" and engine.store.applied_seq() == seq
        last = await engine.write_batch([(Op.PUT, b"b", b"2"), (Op.DELETE, b"a", b"")])
        assert last == seq + 2 and engine.get(b"a") is None and engine.get(b"b") == b"2"
        await engine.close()

    asyncio.run(run())


def test_limits_rejected_before_the_wal(tmp_path: Path) -> None:
    async def run() -> None:
        engine = _open(tmp_path, MemoryStore())
        with pytest.raises(InvalidArgumentError, match="invalid key size 512"):
            await engine.put(b"k" * 512, b"v")
        with pytest.raises(InvalidArgumentError, match="value too large"):
            await engine.put(b"k", b"v" * (10 * 1024 * 1024 + 1))
        with pytest.raises(InvalidArgumentError, match="exceeds maximum allowed"):
            await engine.write_batch([(Op.PUT, b"k%d" % i, b"") for i in range(1001)])
        assert engine.wal.last_seq == 0  # nothing reached the log
        await engine.close()

    asyncio.run(run())


def test_restart_replays_exactly_what_the_store_missed(tmp_path: Path) -> None:
    async def write(engine: Engine, n: int) -> None:
        for i in range(n):
            await engine.put(b"k%03d" % i, b"v%d" % i)

    store_dir = str(tmp_path / "store")
    engine = _open(tmp_path, LmdbStore.open(store_dir))
    asyncio.run(write(engine, 50))
    # Simulate a crash after the WAL but before the store: close the WAL, keep the store behind.
    engine.wal.close()
    engine.store.close()
    with WAL.open(str(tmp_path / "wal"), SMALL) as wal:
        for i in range(50, 60):
            wal.append(Op.PUT, b"k%03d" % i, b"late%d" % i)
    engine = _open(tmp_path, LmdbStore.open(store_dir))
    assert engine.recovered_entries == 10
    assert engine.store.applied_seq() == 60 == engine.wal.last_seq
    assert engine.get(b"k055") == b"late55" and engine.get(b"k010") == b"v10"
    asyncio.run(engine.close())
    engine = _open(tmp_path, LmdbStore.open(store_dir))
    assert engine.recovered_entries == 0  # idempotent: nothing left to replay
    assert engine.wal.next_seq == 61
    asyncio.run(engine.close())


def test_retention_only_behind_the_checkpoint(tmp_path: Path) -> None:
    async def run() -> None:
        engine = _open(tmp_path, MemoryStore(), retain=0)
        for i in range(200):
            await engine.put(b"key%04d" % i, b"x" * 60)
        before = engine.wal.segment_paths()
        assert len(before) > 3
        # The memory store is durable only once checkpointed: nothing may go before that.
        engine.wal.apply_retention(engine.retention)
        assert engine.wal.segment_paths() == before
        durable = await engine.checkpoint()
        assert durable == 200
        after = engine.wal.segment_paths()
        assert len(after) < len(before) and after[-1] == before[-1]
        assert engine.wal.first_seq <= durable + 1  # what the store still needs is kept
        await engine.close()

    asyncio.run(run())


def test_store_ahead_of_wal_is_refused_if_wal_lost_entries(tmp_path: Path) -> None:
    store = MemoryStore()
    engine = _open(tmp_path, store)

    async def run() -> None:
        for i in range(200):
            await engine.put(b"k%d" % i, b"v" * 60)

    asyncio.run(run())
    engine.wal.close()
    assert len(engine.wal.segment_paths()) > 2
    # A store that has applied nothing meets a WAL whose first segments are gone.
    first = engine.wal.segment_paths()[0]
    Path(first).unlink()
    with pytest.raises(RecoveryError, match="are lost"):
        _open(tmp_path, MemoryStore())


def test_wal_floor_follows_the_store(tmp_path: Path) -> None:
    """A store ahead of an emptied WAL makes the WAL continue after it, never reuse numbers."""
    store = MemoryStore()
    engine = _open(tmp_path, store)
    asyncio.run(engine.put(b"a", b"1"))
    engine.wal.close()
    for path in (tmp_path / "wal").glob("*.wal"):
        path.unlink()
    engine = _open(tmp_path, store)
    assert engine.wal.next_seq == 2
    assert asyncio.run(engine.put(b"b", b"2")) == 2
    asyncio.run(engine.close())


class _FailOnce(MemoryStore):
    """Fails its first apply, and records the sequences of every apply that succeeds."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False
        self.applied_groups: list[list[int]] = []

    def apply(self, entries, applied_seq):  # type: ignore[no-untyped-def]
        if not self.failed:
            self.failed = True
            raise OSError("disk hiccup")
        super().apply(entries, applied_seq)
        self.applied_groups.append([e.seq for e in entries])


def test_a_failed_apply_is_retried_with_batches_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed apply, a batch must still become visible in one store transaction."""
    from kevo_repl.node import engine as engine_module

    monkeypatch.setattr(engine_module, "APPLY_ENTRIES_MAX", 2)
    store = _FailOnce()

    async def run() -> None:
        engine = _open(tmp_path, store)
        with pytest.raises(OSError, match="disk hiccup"):
            await engine.write_batch([(Op.PUT, b"b%d" % i, b"v") for i in range(3)])
        await engine.put(b"after", b"v")  # applies what is pending, the batch first
        assert engine.get(b"b2") == b"v" and engine.get(b"after") == b"v"
        await engine.close()

    asyncio.run(run())
    batch = next(g for g in store.applied_groups if 1 in g)
    assert {1, 2, 3} <= set(batch)  # seqs 1..3 applied together, never split
