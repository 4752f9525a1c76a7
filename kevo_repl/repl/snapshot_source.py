"""The primary's side of a snapshot: a store export read back in chunks, off the event loop.

Three stages run at once, so the slowest sets the pace rather than their sum:

* `Store.begin_export` gives a consistent image; its `write_to` runs on a thread of its own into
  a pipe (LMDB's mdb_env_copyfd2 writes to a descriptor);
* a reader thread cuts the pipe into chunks and hashes them, into a queue of `QUEUE_CHUNKS`;
* `ImageReader.next_chunk` (on a worker thread) takes a chunk and compresses it.

The pipe and the queue are the bound: the export stalls while the stream is behind, so the
primary holds a few chunks at most, and nothing is written to its disk.

Stopping early (the replica went away): `abandon` sets a flag; the reader thread sees it within
`POLL_S`, closes the pipe (the export then fails on it and releases its snapshot) and ends, and
a `next_chunk` in flight returns an empty chunk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import queue
import threading
from dataclasses import dataclass

from kevo_repl.repl.frames import Codec, compress_checked
from kevo_repl.repl.snapshot import CHUNK_BYTES
from kevo_repl.store.base import StoreExport

PIPE_BYTES = 1024 * 1024  # Linux's default pipe-max-size
QUEUE_CHUNKS = 2
POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class RawChunk:
    raw_len: int  # 0: the image ended
    crc32: int
    payload: bytes


class ImageReader:
    def __init__(self, export: StoreExport, codec: Codec, zstd_level: int) -> None:
        self._export = export
        self.codec = codec
        self._level = zstd_level
        self._hash = hashlib.sha256()
        self.total_bytes = 0
        self.error: BaseException | None = None
        self._abandoned = threading.Event()
        self._chunks: queue.Queue[bytes] = queue.Queue(QUEUE_CHUNKS)
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

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

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
            while not self._abandoned.is_set():
                raw = _read_full(r, CHUNK_BYTES)
                self._hash.update(raw)
                self.total_bytes += len(raw)
                if not self._put(raw) or not raw:
                    return
        finally:
            os.close(r)

    def _put(self, raw: bytes) -> bool:
        while not self._abandoned.is_set():
            try:
                self._chunks.put(raw, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def next_chunk(self) -> RawChunk:
        """Take and compress the next chunk (blocking: call it on a worker thread)."""
        while not self._abandoned.is_set():
            try:
                raw = self._chunks.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if not raw:
                return RawChunk(0, 0, b"")
            payload, crc = compress_checked(raw, self.codec, self._level)
            return RawChunk(len(raw), crc, payload)
        return RawChunk(0, 0, b"")

    def finish(self) -> None:
        """After the last (empty) chunk: wait for the export thread; raise what it raised."""
        self._writer.join()
        self._reader.join()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """Stop: the export ends on the closed pipe and releases its snapshot. Idempotent."""
        self._abandoned.set()


def _read_full(fd: int, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        data = os.read(fd, size - len(buf))
        if not data:
            break
        buf += data
    return bytes(buf)
