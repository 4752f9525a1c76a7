"""The primary's side of a snapshot: a store export read back in chunks, off the event loop.

`Store.begin_export` gives a consistent image; its `write_to` runs on a thread of its own into a
pipe (LMDB's mdb_env_copyfd2 writes to a descriptor), and `ImageReader.next_chunk` (called on a
worker thread) reads, hashes and compresses one chunk at a time. The pipe is the bound: the
export stalls while the stream is behind, so neither side ever holds more than a chunk or two,
and nothing is written to the primary's disk.

Stopping early (the replica went away) must not close the pipe under a read in flight (its
descriptor number could be reused by then): `abandon` closes it now if no read is running,
else the read closes it when it returns. The export thread then fails on the closed pipe and
releases the export itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from dataclasses import dataclass

from kevo_repl.repl.frames import Codec, compress_checked
from kevo_repl.repl.snapshot import CHUNK_BYTES
from kevo_repl.store.base import StoreExport


@dataclass(frozen=True, slots=True)
class RawChunk:
    raw_len: int  # 0: the image ended
    crc32: int
    payload: bytes


class ImageReader:
    def __init__(self, export: StoreExport, codec: Codec, zstd_level: int) -> None:
        self._export = export
        self._codec = codec
        self._level = zstd_level
        self._hash = hashlib.sha256()
        self.total_bytes = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._reading = False
        self._abandoned = False
        self._r, w = os.pipe()
        # A pipe holds 64 KiB by default: a chunk's worth lets the export run a chunk ahead.
        # Over /proc/sys/fs/pipe-max-size it fails: the default size only costs syscalls.
        if hasattr(fcntl, "F_SETPIPE_SZ"):
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK_BYTES)
        self._thread = threading.Thread(
            target=self._write, args=(w,), name="snapshot-export", daemon=True
        )
        self._thread.start()

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

    def next_chunk(self) -> RawChunk:
        """Read, hash and compress the next chunk (blocking: call it on a worker thread)."""
        with self._lock:
            if self._abandoned:
                return RawChunk(0, 0, b"")
            self._reading = True
        try:
            raw = self._read(CHUNK_BYTES)
        finally:
            with self._lock:
                self._reading = False
                if self._abandoned:
                    os.close(self._r)
        if not raw:
            return RawChunk(0, 0, b"")
        self._hash.update(raw)
        self.total_bytes += len(raw)
        payload, crc = compress_checked(raw, self._codec, self._level)
        return RawChunk(len(raw), crc, payload)

    def _read(self, size: int) -> bytes:
        buf = bytearray()
        while len(buf) < size:
            data = os.read(self._r, size - len(buf))
            if not data:
                break
            buf += data
        return bytes(buf)

    def finish(self) -> None:
        """After the last (empty) chunk: wait for the export thread; raise what it raised."""
        self._thread.join()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """Stop: the export ends on the closed pipe and releases its snapshot. Idempotent."""
        with self._lock:
            if self._abandoned:
                return
            self._abandoned = True
            if not self._reading:
                os.close(self._r)
