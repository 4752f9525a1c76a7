"""The primary's side of a snapshot: a store export read back in chunks, off the event loop.

Three stages run at once, so the slowest sets the pace rather than their sum:

* `Store.begin_export` gives a consistent image; its `write_to` runs on a thread of its own into
  a pipe (LMDB's mdb_env_copyfd2 writes to a descriptor);
* a reader thread reads the pipe straight into a free buffer of a fixed set (no allocation
  or page faults per chunk; a buffer is free again once compressed), extends the image's
  running CRC over it (`kevo_repl.repl.snapshot`) and hands it to a pool of `COMPRESS_THREADS`
  compressing at once (compression is the costliest stage; zstd and snappy release the GIL),
  queueing the pending results in order, at most `QUEUE_CHUNKS`;
* `ImageReader.next_chunk` (on a worker thread) waits for the oldest result.

The pipe and the buffers are the bound: the export stalls while the stream is behind, and
nothing is written to the primary's disk. Per stream it holds at most `BUFFERS` raw chunks
(made as needed, then reused) and `QUEUE_CHUNKS` + 3 compressed ones (queued, one the reader
waits to queue, one `next_chunk` returned, one gRPC is sending): with codec NONE, 9 chunks
of 4 MiB.

Stopping early (the replica went away): `abandon` sets a flag; the reader thread sees it within
`POLL_S`, closes the pipe (the export then fails on it and releases its snapshot) and ends, and
a `next_chunk` in flight returns an empty chunk.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from kevo_repl.repl.frames import Codec, compress, crc32_ieee
from kevo_repl.repl.snapshot import CHUNK_BYTES
from kevo_repl.store.base import StoreExport

PIPE_BYTES = 1024 * 1024  # Linux's default pipe-max-size
QUEUE_CHUNKS = 2
COMPRESS_THREADS = 2
BUFFERS = QUEUE_CHUNKS + COMPRESS_THREADS  # raw chunks: being read, queued or compressed
POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class RawChunk:
    raw_len: int  # 0: the image ended
    crc32: int  # the image's running CRC through this chunk
    payload: bytes


class ImageReader:
    def __init__(self, export: StoreExport, codec: Codec, zstd_level: int) -> None:
        self._export = export
        self.codec = codec
        self._level = zstd_level
        self.crc32 = 0  # of the image read so far
        self.total_bytes = 0
        self.error: BaseException | None = None
        self._abandoned = threading.Event()
        self._chunks: queue.Queue[Future[RawChunk]] = queue.Queue(QUEUE_CHUNKS)
        self._pool = ThreadPoolExecutor(COMPRESS_THREADS, thread_name_prefix="snapshot-compress")
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._buffers = 0  # made so far, up to BUFFERS
        r, w = os.pipe()
        # 64 KiB by default; more lets the export run ahead. Over pipe-max-size an unprivileged
        # process gets EPERM: the default size only costs more system calls.
        if hasattr(fcntl, "F_SETPIPE_SZ"):
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._writer = threading.Thread(
            target=self._write, args=(w,), name="snapshot-export", daemon=True
        )
        self._reader = threading.Thread(
            target=self._read, args=(r,), name="snapshot-read", daemon=True
        )
        self._writer.start()
        self._reader.start()

    def _write(self, w: int) -> None:
        try:
            self._export.write_to(w)
        except BaseException as err:  # handed to the stream, which reports it
            self.error = err
        finally:
            os.close(w)
            self._export.close()

    def _read(self, r: int) -> None:
        try:
            while (buf := self._buffer()) is not None:
                size = _read_full(r, buf)
                with memoryview(buf)[:size] as raw:
                    self.crc32 = crc32_ieee(raw, self.crc32)
                self.total_bytes += size
                try:
                    pending = self._pool.submit(self._compress, buf, size, self.crc32)
                except RuntimeError:  # abandoned meanwhile: the pool is shut down
                    return
                if not _put(self._chunks, pending, self._abandoned) or not size:
                    return
        finally:
            os.close(r)

    def _buffer(self) -> bytearray | None:
        """A free buffer (a new one while fewer than BUFFERS exist); None once abandoned."""
        if self._free.empty() and self._buffers < BUFFERS:
            self._buffers += 1
            return bytearray(CHUNK_BYTES)
        return _take(self._free, self._abandoned)

    def _compress(self, buf: bytearray, size: int, crc: int) -> RawChunk:
        try:
            if not size:
                return RawChunk(0, 0, b"")
            with memoryview(buf)[:size] as raw:
                return RawChunk(size, crc, compress(raw, self.codec, self._level))
        finally:
            self._free.put(buf)

    def next_chunk(self) -> RawChunk:
        """The next chunk, compressed (blocking: call it on a worker thread)."""
        pending = _take(self._chunks, self._abandoned)
        try:
            return RawChunk(0, 0, b"") if pending is None else pending.result()
        except CancelledError:  # abandoned meanwhile
            return RawChunk(0, 0, b"")

    def finish(self) -> None:
        """After the last (empty) chunk: wait for the export thread; raise what it raised."""
        self._writer.join()
        self._reader.join()
        self._pool.shutdown()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """Stop: the export ends on the closed pipe and releases its snapshot. Idempotent."""
        self._abandoned.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


T = TypeVar("T")


def _take(source: queue.Queue[T], abandoned: threading.Event) -> T | None:
    """The next item; None once abandoned."""
    while not abandoned.is_set():
        try:
            return source.get(timeout=POLL_S)
        except queue.Empty:
            continue
    return None


def _put(target: queue.Queue[T], item: T, abandoned: threading.Event) -> bool:
    """False if abandoned before there was room."""
    while not abandoned.is_set():
        try:
            target.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _read_full(fd: int, buf: bytearray) -> int:
    """Fill `buf` from `fd` in place; how many bytes it holds (fewer only at the end)."""
    got = 0
    with memoryview(buf) as view:
        while got < len(buf):
            n = os.readv(fd, [view[got:]])
            if not n:
                break
            got += n
    return got
