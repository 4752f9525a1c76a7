"""Snapshots: the chunk checks, the primary's StreamSnapshot, the replica's fetch and the switch.

In process over real gRPC on 127.0.0.1. The cluster tests (test_bootstrap_cluster.py) run the
same paths with real processes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import zstandard

from kevo_repl import failpoints, fsutil
from kevo_repl.errors import ConfigError
from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.repl import bootstrap, image_file, snapshot_source
from kevo_repl.repl.bootstrap import (
    PARTIAL_DIR,
    READY_DIR,
    BootstrapError,
    complete_switch,
    discard_partial,
    fetch_snapshot,
)
from kevo_repl.repl.frames import Codec, compress
from kevo_repl.repl.history import History
from kevo_repl.repl.primary import ReplicationService, Sessions, StreamLimits
from kevo_repl.repl.snapshot import Chunk, SnapshotError, SnapshotReceiver
from kevo_repl.repl.state_files import load_history
from kevo_repl.repl.wire import chunk_of, wire_codec
from kevo_repl.store import LmdbStore, MemoryStore, Store
from kevo_repl.store.memory import load_image
from kevo_repl.wal import WAL, Entry, Op, SyncMode, WalOptions

MAP_BYTES = 256 * 1024**2

# ------------------------------------------------------------------------------ the receiver


def _chunks(image: bytes, size: int, seq: int = 9, codec: Codec = Codec.ZSTD) -> list[Chunk]:
    out = []
    crc = 0
    for index, start in enumerate(range(0, len(image), size)):
        raw = image[start : start + size]
        crc = zlib.crc32(raw, crc)  # the running CRC
        out.append(Chunk(index, seq, codec, len(raw), crc, compress(raw, codec)))
    last = Chunk(len(out), seq, 0, 0, 0, b"", True, len(image), zlib.crc32(image))
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
        (lambda cs: [*cs[:-1], _with(cs[-1], image_crc32=1)], "image's CRC does not match"),
        (lambda cs: [*cs, cs[-1]], "after the last chunk"),
        (lambda cs: _swap_contents(cs), "chunk 1: CRC mismatch"),
    ],
    ids=[
        "first-missing",
        "gap",
        "other-snapshot",
        "bit-flip",
        "short",
        "image-crc",
        "after-last",
        "reordered-bytes",
    ],
)
def test_receiver_names_what_is_wrong(damage: object, message: str) -> None:
    chunks = _chunks(os.urandom(12_000), 4096)
    broken = damage(chunks)  # type: ignore[operator]
    with pytest.raises(SnapshotError, match=message):
        _receive(broken)


def _swap_contents(chunks: list[Chunk]) -> list[Chunk]:
    """Chunks 0 and 1 with their bytes swapped and their indexes kept, each with the CRC of its
    own bytes: every chunk arrives intact and in index order (a CRC per chunk would pass), but
    the image is not the one sent. The running CRC catches it."""
    first, second = (_raw_of(c) for c in chunks[:2])
    return [
        _with(chunks[1], index=0, crc32=zlib.crc32(second)),
        _with(chunks[0], index=1, crc32=zlib.crc32(first)),
        *chunks[2:],
    ]


def _raw_of(chunk: Chunk) -> bytes:
    return zstandard.ZstdDecompressor().decompress(chunk.payload)


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


class _FakeCall:
    """A StreamSnapshot call that yields the given messages (what fetch_snapshot uses of it)."""

    def __init__(self, messages: list[rpb.SnapshotChunk]) -> None:
        self._messages = messages
        self.cancelled = False

    async def _each(self) -> AsyncIterator[rpb.SnapshotChunk]:
        for message in self._messages:
            await asyncio.sleep(0)
            yield message

    def __aiter__(self) -> AsyncIterator[rpb.SnapshotChunk]:
        return self._each()

    def cancel(self) -> None:
        self.cancelled = True


class _FakeStub:
    def __init__(self, messages: list[rpb.SnapshotChunk]) -> None:
        self.call = _FakeCall(messages)

    def StreamSnapshot(self, request: rpb.SnapshotRequest) -> _FakeCall:
        return self.call


def _messages(image: bytes, size: int) -> list[rpb.SnapshotChunk]:
    out = []
    for c in _chunks(image, size):
        out.append(
            rpb.SnapshotChunk(
                index=c.index,
                snapshot_sequence=c.snapshot_seq,
                codec=wire_codec(Codec(c.codec)),
                raw_length=c.raw_len,
                running_crc32=c.crc32,
                payload=c.payload,
                last=c.last,
                total_bytes=c.total_bytes,
                image_crc32=c.image_crc32,
            )
        )
    out[0].history = History.new().to_json()
    out[0].store_format = "lmdb"
    return out


async def _fetch_from_fake(image: bytes, data_dir: Path) -> int:
    stub = _FakeStub(_messages(image, 8192))
    return await fetch_snapshot(
        stub,  # type: ignore[arg-type]
        rpb.SnapshotRequest(),
        str(data_dir),
        lambda a, b: None,
    )


def test_a_bad_chunk_mid_stream_fails_the_fetch_and_the_next_one_starts_clean(
    tmp_path: Path,
) -> None:
    image = os.urandom(300_000)
    good = _messages(image, 8192)  # ~37 chunks: several decoding and writing at once
    bad = [rpb.SnapshotChunk() for _ in good]
    for m, b in zip(good, bad, strict=True):
        b.CopyFrom(m)
    flipped = bytearray(bad[20].payload)
    flipped[len(flipped) // 2] ^= 1
    bad[20].payload = bytes(flipped)

    async def fetch(messages: list[rpb.SnapshotChunk]) -> int:
        stub = _FakeStub(messages)
        try:
            return await fetch_snapshot(
                stub,  # type: ignore[arg-type]
                rpb.SnapshotRequest(),
                str(tmp_path),
                lambda a, b: None,
            )
        finally:
            assert stub.call.cancelled  # the stream is always closed

    with pytest.raises(BootstrapError, match="snapshot chunk 20"):
        asyncio.run(fetch(bad))
    assert not (tmp_path / READY_DIR).exists()
    assert asyncio.run(fetch(good)) == 9  # the partial image of the first is discarded
    assert (tmp_path / READY_DIR / "store" / "data.mdb").read_bytes() == image


def test_the_image_is_flushed_while_it_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Background fsyncs every FLUSH_BYTES, so the one at the end has little left to write
    (written through the page cache: where O_DIRECT is refused)."""
    monkeypatch.setattr(image_file, "_open_direct", lambda path: -1)
    synced: list[int] = []
    real = fsutil.fsync_fd

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(fsutil, "fsync_fd", counting)
    monkeypatch.setattr(bootstrap, "FLUSH_BYTES", 32 * 1024)
    image = os.urandom(400_000)
    asyncio.run(_fetch_from_fake(image, tmp_path))
    assert len(synced) >= 3  # some while it arrived (at most one at a time), then the last one
    assert (tmp_path / READY_DIR / "store" / "data.mdb").read_bytes() == image


def test_a_failed_background_flush_fails_the_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last background flush may still run when the last chunk is written; its error must
    fail the fetch: Linux reports a writeback error once per file, so the final fsync would
    succeed and an image that never reached the disk would be committed. (Written through the
    page cache: with O_DIRECT there are no background flushes.)"""
    monkeypatch.setattr(image_file, "_open_direct", lambda path: -1)

    def fails(fd: int) -> None:
        time.sleep(0.2)  # still running when the last chunk is written
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(bootstrap, "_flush", fails)
    image = os.urandom(40_000)  # 8192-byte chunks: the one flush starts as the last is written
    monkeypatch.setattr(bootstrap, "FLUSH_BYTES", len(image))
    with pytest.raises(BootstrapError, match="Input/output error"):
        asyncio.run(_fetch_from_fake(image, tmp_path))
    assert not (tmp_path / READY_DIR).exists()


def test_an_image_written_direct_is_not_flushed_until_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Direct writes are on the device already: no background fsync, only the final one."""
    flushed: list[int] = []
    monkeypatch.setattr(bootstrap, "_flush", flushed.append)
    monkeypatch.setattr(bootstrap, "FLUSH_BYTES", 32 * 1024)
    image = os.urandom(400_000)
    asyncio.run(_fetch_from_fake(image, tmp_path))
    assert flushed == []
    assert (tmp_path / READY_DIR / "store" / "data.mdb").read_bytes() == image


@pytest.mark.parametrize("level", [1, -2])  # -2: snapshot_zstd_level's default
def test_the_primary_reads_an_image_of_many_chunks_through_its_fixed_buffers(
    monkeypatch: pytest.MonkeyPatch, level: int
) -> None:
    monkeypatch.setattr(snapshot_source, "CHUNK_BYTES", 4096)
    store = MemoryStore()
    for i in range(2000):
        store.apply([Entry(i + 1, Op.PUT, b"key%06d" % i, os.urandom(64))], i + 1)
    reader = snapshot_source.ImageReader(store.begin_export(), Codec.ZSTD, level)
    receiver = SnapshotReceiver()
    image = b""
    index = 0
    while (raw := reader.next_chunk()).raw_len:
        chunk = Chunk(index, 7, Codec.ZSTD, raw.raw_len, raw.crc32, raw.payload)
        image += receiver.accept(chunk)
        index += 1
    reader.finish()
    assert index > 3 * snapshot_source.BUFFERS  # every buffer was used again and again
    assert receiver.crc32 == reader.crc32 == zlib.crc32(image)
    assert load_image(image).digest() == store.digest()


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
