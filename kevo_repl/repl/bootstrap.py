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
import logging
import os
import shutil
import time
from collections.abc import Callable

import grpc

from kevo_repl import datadir, fsutil
from kevo_repl.errors import KevoReplError, StateFileError
from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.repl.history import History
from kevo_repl.repl.snapshot import SnapshotError, SnapshotReceiver
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
        fd = os.open(image_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            started = time.monotonic()
            seq, history = await _receive(call, fd, image_path, progress)
            received = time.monotonic()
            await _settle(asyncio.ensure_future(asyncio.to_thread(fsutil.fsync_fd, fd)))
            log.info(
                "snapshot at %d received in %.2f s, synced in %.2f s",
                seq,
                received - started,
                time.monotonic() - received,
            )
        finally:
            os.close(fd)
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
    call: grpc.aio.UnaryStreamCall, fd: int, path: str, progress: Progress
) -> tuple[int, History]:
    receiver = SnapshotReceiver()
    history: History | None = None
    estimate = 0
    iterator = call.__aiter__()
    writing: asyncio.Future[None] | None = None  # the chunk before, checked and written ahead
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
            if writing is not None:
                await _settle(writing)
                _report(receiver, estimate, progress)
            # Checked and written on a worker thread while the next chunk arrives; one at a
            # time, in order (the receiver's checks and the file depend on the order).
            writing = asyncio.ensure_future(asyncio.to_thread(_accept, receiver, message, fd, path))
            if message.last:
                break
        await _settle(writing)
        writing = None
        _report(receiver, estimate, progress)
    finally:
        if writing is not None:  # failing or cancelled: the write in flight ends before fd does
            await asyncio.wait((writing,))
            if not writing.cancelled():
                writing.exception()  # retrieved: the error already on its way is the one reported
    assert receiver.snapshot_seq is not None and history is not None
    return receiver.snapshot_seq, history


async def _settle(work: asyncio.Future[None]) -> None:
    """Await work running on a thread; if we are cancelled (the node stopping), still wait for
    the thread to finish before going on: the caller then closes the fd it writes to."""
    try:
        await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait((work,))
        raise


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


def _accept(receiver: SnapshotReceiver, message: rpb.SnapshotChunk, fd: int, path: str) -> None:
    """Check one chunk and append its bytes to the image (worker thread)."""
    raw = receiver.accept(chunk_of(message))
    try:
        fsutil.write_all(fd, raw)
    except OSError as err:
        raise BootstrapError(f"{path}: cannot write the snapshot: {err.strerror}") from None


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
