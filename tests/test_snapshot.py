"""Snapshots: the chunk checks, the primary's StreamSnapshot, the replica's fetch and the switch.

In process over real gRPC on 127.0.0.1. The cluster tests (test_bootstrap_cluster.py) run the
same paths with real processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from kevo_repl import failpoints
from kevo_repl.errors import ConfigError
from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.repl.bootstrap import (
    PARTIAL_DIR,
    READY_DIR,
    BootstrapError,
    complete_switch,
    discard_partial,
    fetch_snapshot,
)
from kevo_repl.repl.frames import Codec, compress_checked
from kevo_repl.repl.history import History
from kevo_repl.repl.primary import ReplicationService, Sessions, StreamLimits
from kevo_repl.repl.snapshot import Chunk, SnapshotError, SnapshotReceiver
from kevo_repl.repl.state_files import load_history
from kevo_repl.repl.wire import chunk_of
from kevo_repl.store import LmdbStore, MemoryStore, Store
from kevo_repl.store.memory import load_image
from kevo_repl.wal import WAL, Entry, Op, SyncMode, WalOptions

MAP_BYTES = 256 * 1024**2

# ------------------------------------------------------------------------------ the receiver


def _chunks(image: bytes, size: int, seq: int = 9, codec: Codec = Codec.ZSTD) -> list[Chunk]:
    out = []
    for index, start in enumerate(range(0, len(image), size)):
        raw = image[start : start + size]
        payload, crc = compress_checked(raw, codec)
        out.append(Chunk(index, seq, codec, len(raw), crc, payload))
    last = Chunk(len(out), seq, 0, 0, 0, b"", True, len(image), hashlib.sha256(image).hexdigest())
    return [*out, last]


def _receive(chunks: list[Chunk]) -> bytes:
    receiver = SnapshotReceiver()
    data = b"".join(receiver.accept(c) for c in chunks)
    assert receiver.done and receiver.snapshot_seq == chunks[0].snapshot_seq
    return data


def test_receiver_returns_the_image_in_order() -> None:
    image = os.urandom(10_000) + b"z" * 50_000
    assert _receive(_chunks(image, 4096)) == image
    assert _receive(_chunks(image, 4096, codec=Codec.SNAPPY)) == image


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda cs: [cs[1], *cs[1:]], "where chunk 0 was expected"),
        (lambda cs: [cs[0], cs[2], *cs[3:]], "where chunk 1 was expected"),
        (lambda cs: [cs[0], _with(cs[1], snapshot_seq=10), *cs[2:]], "began with the one at 9"),
        (lambda cs: [cs[0], _flip(cs[1]), *cs[2:]], "CRC mismatch|does not decompress"),
        (lambda cs: [*cs[:-1], _with(cs[-1], total_bytes=1)], "1 bytes, 12000 arrived"),
        (lambda cs: [*cs[:-1], _with(cs[-1], sha256="0" * 64)], "sha256 does not match"),
        (lambda cs: [*cs, cs[-1]], "after the last chunk"),
    ],
    ids=["first-missing", "gap", "other-snapshot", "bit-flip", "short", "hash", "after-last"],
)
def test_receiver_names_what_is_wrong(damage: object, message: str) -> None:
    chunks = _chunks(os.urandom(12_000), 4096)
    broken = damage(chunks)  # type: ignore[operator]
    with pytest.raises(SnapshotError, match=message):
        _receive(broken)


def _with(chunk: Chunk, **changes: object) -> Chunk:
    fields = {name: getattr(chunk, name) for name in Chunk.__dataclass_fields__}
    return Chunk(**{**fields, **changes})


def _flip(chunk: Chunk) -> Chunk:
    payload = bytearray(chunk.payload)
    payload[len(payload) // 2] ^= 0x40
    return _with(chunk, payload=bytes(payload))


def test_a_chunk_over_the_bound_is_refused_before_decompressing() -> None:
    receiver = SnapshotReceiver()
    big = Chunk(0, 1, Codec.NONE, 17 * 1024 * 1024, zlib.crc32(b""), b"")
    with pytest.raises(SnapshotError, match="raw length"):
        receiver.accept(big)


# ------------------------------------------------------------------------------ the switch


def _state(root: Path, store: bytes, wal: bytes, history: str) -> None:
    (root / "store").mkdir(parents=True)
    (root / "store" / "data.mdb").write_bytes(store)
    (root / "wal").mkdir()
    (root / "wal" / "seg").write_bytes(wal)
    (root / "HISTORY").write_text(history)


def _ready(root: Path) -> None:
    (root / READY_DIR / "store").mkdir(parents=True)
    (root / READY_DIR / "store" / "data.mdb").write_bytes(b"new")
    (root / READY_DIR / "HISTORY").write_text("new-history")


def _assert_switched(root: Path) -> None:
    assert (root / "store" / "data.mdb").read_bytes() == b"new"
    assert not (root / "wal").exists()
    assert (root / "HISTORY").read_text() == "new-history"
    assert not (root / READY_DIR).exists()


def test_switch_without_a_ready_snapshot_changes_nothing(tmp_path: Path) -> None:
    _state(tmp_path, b"old", b"log", "old-history")
    (tmp_path / PARTIAL_DIR).mkdir()
    assert complete_switch(str(tmp_path)) is False
    assert (tmp_path / "store" / "data.mdb").read_bytes() == b"old"
    discard_partial(str(tmp_path))
    assert not (tmp_path / PARTIAL_DIR).exists()
    assert (tmp_path / "wal" / "seg").read_bytes() == b"log"


def test_switch_replaces_store_wal_and_history(tmp_path: Path) -> None:
    _state(tmp_path, b"old", b"log", "old-history")
    _ready(tmp_path)
    assert complete_switch(str(tmp_path)) is True
    _assert_switched(tmp_path)
    assert complete_switch(str(tmp_path)) is False


@pytest.mark.parametrize("done", ["store moved", "wal removed", "history moved"])
def test_switch_interrupted_after_any_step_finishes_on_the_next_call(
    tmp_path: Path, done: str
) -> None:
    """What a crash between two steps leaves behind: the next start completes it."""
    _state(tmp_path, b"old", b"log", "old-history")
    _ready(tmp_path)
    ready = tmp_path / READY_DIR
    os.rename(tmp_path / "store", tmp_path / "gone")  # step 1: the old store goes ...
    os.rename(ready / "store", tmp_path / "store")  # ... the snapshot's takes its place
    if done in ("wal removed", "history moved"):
        (tmp_path / "wal" / "seg").unlink()
        (tmp_path / "wal").rmdir()
    if done == "history moved":
        os.rename(ready / "HISTORY", tmp_path / "HISTORY")
    assert complete_switch(str(tmp_path)) is True
    _assert_switched(tmp_path)


# ------------------------------------------------------------------------------ over gRPC


@asynccontextmanager
async def serving(
    wal: WAL, store: Store, history: History
) -> AsyncIterator[tuple[rpb_grpc.WALReplicationServiceStub, Sessions]]:
    sessions = Sessions(wal)
    sessions.attach(asyncio.get_running_loop())
    service = ReplicationService(wal, sessions, "127.0.0.1:9", StreamLimits(), store, history)
    server = grpc.aio.server()
    rpb_grpc.add_WALReplicationServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield rpb_grpc.WALReplicationServiceStub(channel), sessions  # type: ignore[no-untyped-call]
    finally:
        await server.stop(None)


def _fill(wal: WAL, store: Store, n: int) -> None:
    for i in range(n):
        seq = wal.append(Op.PUT, b"key%06d" % i, b"v" * 200)
        store.apply([Entry(seq, Op.PUT, b"key%06d" % i, b"v" * 200)], seq)


def _wal(path: Path) -> WAL:
    return WAL.open(str(path), WalOptions(sync_mode=SyncMode.IMMEDIATE))


def test_stream_snapshot_of_a_memory_store_round_trips(tmp_path: Path) -> None:
    async def scenario() -> None:
        wal, store = _wal(tmp_path / "wal"), MemoryStore()
        _fill(wal, store, 3000)
        try:
            async with serving(wal, store, History.new()) as (stub, sessions):
                request = rpb.SnapshotRequest(node_id="r1", accepted_codecs=[rpb.SNAPPY])
                receiver = SnapshotReceiver()
                image = b""
                async for m in stub.StreamSnapshot(request):
                    assert m.snapshot_sequence == 3000
                    if m.index == 0:
                        assert m.store_format == "memory" and History.from_json(m.history)
                    if not m.last:
                        assert m.codec == rpb.SNAPPY
                    image += receiver.accept(chunk_of(m))
                assert receiver.done
                assert load_image(image).digest() == store.digest()
                slot = sessions.keeper.table.get("r1")
                assert slot is not None and slot.restart_seq == 3001  # its slot took over
                assert not sessions.bootstraps  # and the stream is gone from status
        finally:
            wal.close()

    asyncio.run(scenario())


def test_snapshot_for_another_store_format_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        wal, store = _wal(tmp_path / "wal"), MemoryStore()
        try:
            async with serving(wal, store, History.new()) as (stub, _):
                call = stub.StreamSnapshot(rpb.SnapshotRequest(store_format="lmdb"))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in call:
                        pass
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "'memory'" in str(info.value.details())
        finally:
            wal.close()

    asyncio.run(scenario())


def test_fetch_snapshot_of_an_lmdb_store_then_switch_and_open(tmp_path: Path) -> None:
    async def scenario() -> None:
        wal = _wal(tmp_path / "p-wal")
        store = LmdbStore.open(str(tmp_path / "p-store"), map_size_bytes=MAP_BYTES)
        _fill(wal, store, 20_000)  # ~5 MB: several chunks
        history = History.new()
        replica = tmp_path / "r"
        replica.mkdir()
        seen: list[tuple[int, int]] = []
        try:
            async with serving(wal, store, history) as (stub, _):
                request = rpb.SnapshotRequest(
                    node_id="r1", accepted_codecs=[rpb.ZSTD], store_format="lmdb"
                )
                seq = await fetch_snapshot(
                    stub, request, str(replica), lambda got, of: seen.append((got, of))
                )
            assert seq == 20_000
            assert len(seen) > 2 and seen[-1][0] == seen[-1][1]
            assert complete_switch(str(replica))
            assert load_history(str(replica / "HISTORY")) == history
            copy = LmdbStore.open(str(replica / "store"), map_size_bytes=MAP_BYTES)
            try:
                assert copy.digest() == store.digest()
            finally:
                copy.close()
        finally:
            wal.close()
            store.close()

    asyncio.run(scenario())


def test_fetch_from_a_primary_that_refuses_leaves_nothing_ready(tmp_path: Path) -> None:
    async def scenario() -> None:
        wal, store = _wal(tmp_path / "wal"), MemoryStore()
        try:
            async with serving(wal, store, History.new()) as (stub, _):
                request = rpb.SnapshotRequest(store_format="lmdb")
                with pytest.raises(BootstrapError, match="FAILED_PRECONDITION"):
                    await fetch_snapshot(stub, request, str(tmp_path), lambda a, b: None)
        finally:
            wal.close()
        assert not (tmp_path / READY_DIR).exists()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ failpoints


def test_failpoints_parse_and_refuse_nonsense() -> None:
    assert failpoints.parse("") == {}
    assert failpoints.parse(" snapshot_chunk_delay=0.25 ,") == {"snapshot_chunk_delay": 0.25}
    for bad in (
        "nope=1",
        "snapshot_chunk_delay",
        "snapshot_chunk_delay=x",
        "snapshot_chunk_delay=-1",
    ):
        with pytest.raises(ConfigError, match="KEVO_REPL_FAILPOINTS"):
            failpoints.parse(bad)
    assert failpoints.delay_s("snapshot_chunk_delay") == 0.0  # unset in the test environment
