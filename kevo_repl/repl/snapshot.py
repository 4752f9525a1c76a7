"""Store snapshots on the wire: the chunk checks both sides share. Pure; no I/O.

A snapshot is an image of the primary's store taken in one read transaction at sequence S (for
LMDB: the compacted copy ``mdb_env_copy`` writes, i.e. a ``data.mdb`` that opens as a store
whose applied position is S). It travels as `SnapshotChunk` messages, each carrying up to
`CHUNK_BYTES` of the image compressed with the replica's codec and the CRC32 of the raw bytes.
The last chunk carries the image's length and sha256, so a replica accepts an image only when
every chunk arrived, in order, intact, and the whole is exactly what the primary read.

`SnapshotReceiver` checks a stream of chunks; anything wrong is a `SnapshotError` naming the
chunk. It keeps nothing but counters and a running hash: the driver writes each chunk's bytes
to disk as they come, so a replica's memory does not grow with the store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kevo_repl.errors import KevoReplError
from kevo_repl.repl.frames import FrameError, decompress_checked

CHUNK_BYTES = 4 * 1024 * 1024  # raw bytes per chunk: large enough that per-message costs vanish
CHUNK_BYTES_MAX = 16 * 1024 * 1024  # the most a receiver accepts in one chunk


class SnapshotError(KevoReplError):
    """A snapshot stream that is not a whole, intact image."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """The fields of one `SnapshotChunk` message the receiver checks."""

    index: int
    snapshot_seq: int
    codec: int
    raw_len: int
    crc32: int
    payload: bytes
    last: bool = False
    total_bytes: int = 0
    sha256: str = ""


class SnapshotReceiver:
    """Checks chunks in arrival order and returns each one's raw bytes."""

    def __init__(self) -> None:
        self.snapshot_seq: int | None = None  # set by the first chunk
        self.received_bytes = 0
        self.done = False
        self._next_index = 0
        self._hash = hashlib.sha256()

    def accept(self, chunk: Chunk) -> bytes:
        """The chunk's raw bytes (empty for a last chunk without any); SnapshotError if bad."""
        where = f"snapshot chunk {chunk.index}"
        if self.done:
            raise SnapshotError(f"{where} arrived after the last chunk")
        if chunk.index != self._next_index:
            raise SnapshotError(f"{where} arrived where chunk {self._next_index} was expected")
        if self.snapshot_seq is None:
            self.snapshot_seq = chunk.snapshot_seq
        elif chunk.snapshot_seq != self.snapshot_seq:
            raise SnapshotError(
                f"{where} is of the snapshot at {chunk.snapshot_seq}, "
                f"the stream began with the one at {self.snapshot_seq}"
            )
        raw = self._raw(chunk, where)
        self._next_index += 1
        self._hash.update(raw)
        self.received_bytes += len(raw)
        if chunk.last:
            self._finish(chunk, where)
        return raw

    def _raw(self, chunk: Chunk, where: str) -> bytes:
        if chunk.last and not chunk.payload and chunk.raw_len == 0:
            return b""
        try:
            return decompress_checked(
                chunk.payload, chunk.codec, chunk.raw_len, chunk.crc32, where, CHUNK_BYTES_MAX
            )
        except FrameError as err:
            raise SnapshotError(str(err)) from None

    def _finish(self, chunk: Chunk, where: str) -> None:
        if chunk.total_bytes != self.received_bytes:
            raise SnapshotError(
                f"{where} (the last) says the image is {chunk.total_bytes} bytes, "
                f"{self.received_bytes} arrived"
            )
        if chunk.sha256 != self._hash.hexdigest():
            raise SnapshotError(f"{where} (the last): the image's sha256 does not match")
        self.done = True
