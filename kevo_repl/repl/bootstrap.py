"""Replica bootstrap: receive a snapshot beside the old store, then switch to it atomically.

The data directory while a bootstrap runs::

    store/               the store the node serves from, untouched until the switch
    wal/                 the WAL, likewise
    HISTORY              the history the replica follows
    bootstrap.partial/   a snapshot arriving: store/data.mdb and HISTORY
    bootstrap.ready/     a complete, verified snapshot that replaces store/, wal/ and HISTORY

The commit point is one rename, ``bootstrap.partial`` -> ``bootstrap.ready``, made durable with
an fsync of the data directory. Before it, a failure or a crash leaves the node exactly as it was
(a leftover ``bootstrap.partial`` is deleted at the next attempt or start, and the bootstrap
starts over). After it, `complete_switch` replaces the old state with the snapshot's; every step
is idempotent and ``bootstrap.ready`` goes last, so the node runs it at once and, if it crashed
part way, again at the next start before anything opens the store or the WAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from kevo_repl import datadir, fsutil
from kevo_repl.errors import KevoReplError, StateFileError
from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.repl.history import History
from kevo_repl.repl.image_file import ImageFile
from kevo_repl.repl.snapshot import Chunk, SnapshotError, SnapshotReceiver, decode
from kevo_repl.repl.state_files import save_history
from kevo_repl.repl.wire import chunk_of
from kevo_repl.store.lmdb_store import IMAGE_FILE

log = logging.getLogger(__name__)

STORE_DIR = datadir.STORE
WAL_DIR = datadir.WAL
HISTORY_FILE = datadir.HISTORY
PARTIAL_DIR = datadir.BOOTSTRAP_PARTIAL
READY_DIR = datadir.BOOTSTRAP_READY
STORE_FORMAT = "lmdb"  # what a node's store opens
CHUNK_TIMEOUT_S = 30.0  # a primary silent this long mid-snapshot is gone
FLUSH_BYTES = 32 * 1024 * 1024  # image bytes written between background flushes
DECODE_AHEAD = 1  # chunks decompressing at once while an earlier one is written

T = TypeVar("T")


class BootstrapError(KevoReplError):
    """A snapshot could not be fetched or installed; the old store is still in place."""


Progress = Callable[[int, int], None]  # (bytes received, estimated total)


async def fetch_snapshot(
    stub: rpb_grpc.WALReplicationServiceStub,
    request: rpb.SnapshotRequest,
    data_dir: str,
    progress: Progress,
) -> int:
    """Receive a snapshot into ``bootstrap.ready``; its sequence. BootstrapError on failure."""
    partial = os.path.join(data_dir, PARTIAL_DIR)
    image_path = os.path.join(partial, STORE_DIR, IMAGE_FILE)
    try:
        await asyncio.to_thread(discard_partial, data_dir)
        os.makedirs(os.path.dirname(image_path))
        seq, history = await _fetch(stub, request, image_path, progress)
        await asyncio.to_thread(_commit, data_dir, partial, history)
    except OSError as err:
        raise BootstrapError(f"{err.filename or data_dir}: {err.strerror}") from None
    except StateFileError as err:
        raise BootstrapError(str(err)) from None
    return seq


async def _fetch(
    stub: rpb_grpc.WALReplicationServiceStub,
    request: rpb.SnapshotRequest,
    image_path: str,
    progress: Progress,
) -> tuple[int, History]:
    call = stub.StreamSnapshot(request)
    try:
        with ImageFile(image_path) as image:
            started = time.monotonic()
            seq, history = await _receive(call, image, progress)
            received = time.monotonic()
            await _settle(asyncio.ensure_future(asyncio.to_thread(_finish, image)))
            log.info(
                "snapshot at %d received in %.2f s, synced in %.2f s%s",
                seq,
                received - started,
                time.monotonic() - received,
                "" if image.direct else " (written through the page cache: no O_DIRECT here)",
            )
    except grpc.aio.AioRpcError as err:
        detail = f"{err.code().name}: {err.details()}"
        raise BootstrapError(f"snapshot stream failed: {detail}") from None
    except TimeoutError:
        raise BootstrapError(f"the primary sent nothing for {CHUNK_TIMEOUT_S:.0f} s") from None
    except SnapshotError as err:
        raise BootstrapError(str(err)) from None
    finally:
        call.cancel()
    return seq, history


async def _receive(
    call: grpc.aio.UnaryStreamCall, image: ImageFile, progress: Progress
) -> tuple[int, History]:
    receiver = SnapshotReceiver()
    history: History | None = None
    estimate = 0
    iterator = call.__aiter__()
    pipeline = _Pipeline(receiver, image)
    try:
        while True:
            try:
                message = await asyncio.wait_for(iterator.__anext__(), CHUNK_TIMEOUT_S)
            except StopAsyncIteration:
                raise SnapshotError(
                    f"the snapshot stream ended after {receiver.received_bytes} bytes, "
                    "before its last chunk"
                ) from None
            if message.index == 0:
                history = _first_chunk(message)
                estimate = message.size_estimate
            pipeline.push(chunk_of(message))
            await pipeline.drain(0 if message.last else DECODE_AHEAD)
            _report(receiver, estimate, progress)
            if message.last:
                break
        await pipeline.finish()
        _report(receiver, estimate, progress)
    finally:
        await pipeline.quiesce()
    assert receiver.snapshot_seq is not None and history is not None
    return receiver.snapshot_seq, history


class _Pipeline:
    """Chunks in flight on worker threads while the next ones arrive: up to `DECODE_AHEAD`
    decompressing at once, then each checked (running CRC) and written in order, one at a time
    (the CRC and the file depend on the order). Holds at most `DECODE_AHEAD` + 2 raw chunks."""

    def __init__(self, receiver: SnapshotReceiver, image: ImageFile) -> None:
        self._receiver = receiver
        self._image = image
        self._decoding: deque[tuple[Chunk, asyncio.Future[bytes]]] = deque()
        self._writing: asyncio.Future[None] | None = None
        self._flusher = _Flusher(image)

    def push(self, chunk: Chunk) -> None:
        self._receiver.admit(chunk)
        self._decoding.append((chunk, asyncio.ensure_future(asyncio.to_thread(decode, chunk))))

    async def drain(self, keep: int) -> None:
        """Hand decoded chunks to the writer, in order, until `keep` are left decoding."""
        while len(self._decoding) > keep:
            chunk, decoding = self._decoding[0]  # left in place until settled: quiesce sees it
            raw = await _settle(decoding)
            self._decoding.popleft()
            await self._wrote()
            args = (self._receiver, chunk, raw, self._image)
            self._writing = asyncio.ensure_future(asyncio.to_thread(_write_chunk, *args))

    async def finish(self) -> None:
        """Every chunk written; raises what the last background flush raised (an fsync error
        is reported once per file: the final fsync would not see it again)."""
        await self.drain(0)
        await self._wrote()
        if self._flusher.running is not None:
            await _settle(self._flusher.running)

    async def _wrote(self) -> None:
        if self._writing is not None:
            await _settle(self._writing)
            self._writing = None
            self._flusher.wrote(self._receiver.received_bytes)

    async def quiesce(self) -> None:
        """Failing or cancelled: every thread touching the fd ends before the fd does. Their
        own errors are retrieved: the error already on its way is the one reported."""
        work: list[asyncio.Future[Any] | None] = [d for _, d in self._decoding]
        work += [self._writing, self._flusher.running]
        cancelled = [await _quiesce(w) for w in work if w is not None]
        if any(cancelled):
            raise asyncio.CancelledError


async def _settle(work: asyncio.Future[T]) -> T:
    """Await work running on a thread; if we are cancelled (the node stopping), still wait for
    the thread to finish before going on: the caller then closes the fd it writes to."""
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await _until_done(work)
        raise


async def _until_done(work: asyncio.Future[T]) -> bool:
    """Wait for `work` to end even if cancelled again meanwhile (a thread cannot be stopped,
    and the fd it uses must outlive it); whether a cancellation arrived, to re-raise it."""
    cancelled = False
    while not work.done():
        try:
            await asyncio.wait((work,))
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


class _Flusher:
    """Starts an fsync of the image in the background each `FLUSH_BYTES` it grows, so the
    page cache writes it out while the rest arrives and the fsync at the end has little left
    (PostgreSQL's pg_flush_data does the same for the files it copies). Only while the image is
    written through the page cache: direct writes are on the device already, and an fsync then
    only flushes the device's cache, which the one at the end does."""

    def __init__(self, image: ImageFile) -> None:
        self._image = image
        self._flushed_to = 0
        self.running: asyncio.Future[None] | None = None

    def wrote(self, size: int) -> None:
        """The image is `size` bytes long now; raises what a finished flush raised."""
        if self.running is not None:
            if not self.running.done():
                return
            self.running.result()
        if not self._image.direct and size - self._flushed_to >= FLUSH_BYTES:
            self._flushed_to = size
            self.running = asyncio.ensure_future(asyncio.to_thread(_flush, self._image.fd))


def _flush(fd: int) -> None:
    fsutil.fsync_fd(fd)  # the one fsync path; a name of its own, for tests to fail it


async def _quiesce(work: asyncio.Future[T]) -> bool:
    """`_until_done`, and the work's own error retrieved (the error already on its way is the
    one reported)."""
    cancelled = await _until_done(work)
    if not work.cancelled():
        work.exception()
    return cancelled


def _report(receiver: SnapshotReceiver, estimate: int, progress: Progress) -> None:
    got = receiver.received_bytes
    progress(got, got if receiver.done else max(estimate, got))  # exact once complete


def _first_chunk(message: rpb.SnapshotChunk) -> History:
    if message.store_format != STORE_FORMAT:
        raise SnapshotError(
            f"the primary sends a {message.store_format!r} store image; this node opens "
            f"{STORE_FORMAT!r}"
        )
    try:
        return History.from_json(message.history)
    except (ValueError, KeyError, TypeError) as err:
        raise SnapshotError(f"snapshot chunk 0 carries a bad history: {err}") from None


def _write_chunk(receiver: SnapshotReceiver, chunk: Chunk, raw: bytes, image: ImageFile) -> None:
    """Check one decoded chunk's running CRC and append its bytes to the image (worker thread)."""
    receiver.take(chunk, raw)
    with _writing(image):
        image.write(raw)


def _finish(image: ImageFile) -> None:
    """The staged rest of the image written, then the fsync (worker thread)."""
    with _writing(image):
        image.finish()


@contextlib.contextmanager
def _writing(image: ImageFile) -> Iterator[None]:
    """The file system's OSError as the bootstrap's error, naming the image."""
    try:
        yield
    except OSError as err:
        raise BootstrapError(f"{image.path}: cannot write the snapshot: {err.strerror}") from None


def _commit(data_dir: str, partial: str, history: History) -> None:
    """Make the received snapshot the one to switch to: the commit point."""
    fsutil.fsync_dir(os.path.join(partial, STORE_DIR))
    save_history(os.path.join(partial, HISTORY_FILE), history)  # fsyncs `partial` too
    ready = os.path.join(data_dir, READY_DIR)
    if os.path.isdir(ready):  # an earlier snapshot never switched to: this one is newer
        shutil.rmtree(ready)
    os.rename(partial, ready)
    fsutil.fsync_dir(data_dir)


def discard_partial(data_dir: str) -> None:
    """Delete an incomplete snapshot (an interrupted bootstrap starts over)."""
    partial = os.path.join(data_dir, PARTIAL_DIR)
    if os.path.isdir(partial):
        shutil.rmtree(partial)
        fsutil.fsync_dir(data_dir)


def complete_switch(data_dir: str) -> bool:
    """Replace store/, wal/ and HISTORY with a ready snapshot's; False if none is ready.

    Runs with the store and the WAL closed. Idempotent step by step: a crash anywhere leaves
    ``bootstrap.ready`` in place and the next call finishes the job.
    """
    ready = os.path.join(data_dir, READY_DIR)
    if not os.path.isdir(ready):
        return False
    image = os.path.join(ready, STORE_DIR)
    store = os.path.join(data_dir, STORE_DIR)
    if os.path.isdir(image):  # not moved yet
        if os.path.isdir(store):
            shutil.rmtree(store)
        os.rename(image, store)
        fsutil.fsync_dir(data_dir)
    wal = os.path.join(data_dir, WAL_DIR)
    if os.path.isdir(wal):  # the old log: the snapshot's position is where the new one starts
        shutil.rmtree(wal)
    history = os.path.join(ready, HISTORY_FILE)
    if os.path.exists(history):
        os.rename(history, os.path.join(data_dir, HISTORY_FILE))
    fsutil.fsync_dir(data_dir)
    shutil.rmtree(ready)
    fsutil.fsync_dir(data_dir)
    log.info("switched to the snapshot in %s", ready)
    return True
