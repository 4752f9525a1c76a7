"""Store snapshots on the wire: the chunk checks both sides share. Pure; no I/O.

A snapshot is an image of the primary's store taken in one read transaction at sequence S (for
LMDB: the compacted copy ``mdb_env_copy`` writes, i.e. a ``data.mdb`` that opens as a store
whose applied position is S). It travels as `SnapshotChunk` messages, each carrying up to
`CHUNK_BYTES` of the image compressed with the replica's codec and the image's running CRC-32
through its raw bytes (``zlib.crc32(raw, previous chunk's crc32)``, computed by
`frames.crc32_ieee`): one pass over the bytes checks each chunk and, chained, the whole. The
last chunk carries the image's length and CRC, so a replica accepts an image only when every
chunk arrived, in order, intact, and the whole is exactly what the primary read. (A sha256 of
the image cost more CPU than the rest of the receive path; the transport below is TCP, and the
CRC guards against what gets past it.)

`SnapshotReceiver` checks a stream of chunks; anything wrong is a `SnapshotError` naming the
chunk. It keeps nothing but counters and a running hash: the driver writes each chunk's bytes
to disk as they come, so a replica's memory does not grow with the store.
"""

from __future__ import annotations

from dataclasses import dataclass

from kevo_repl.errors import KevoReplError
from kevo_repl.repl.frames import FrameError, check_crc, decompress_bounded

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
    image_crc32: int = 0


class SnapshotReceiver:
    """Checks chunks in arrival order and returns each one's raw bytes.

    `accept` does it all in one call. A driver that decompresses chunks on several threads
    splits it: `admit` each chunk as it arrives (order and snapshot), `decode` them in any
    order or at once (decompression and bounds; pure), then `take` each decoded chunk in
    order (the running CRC and the totals).
    """

    def __init__(self) -> None:
        self.snapshot_seq: int | None = None  # set by the first chunk
        self.received_bytes = 0
        self.done = False
        self._next_index = 0  # admitted so far
        self._last_admitted = False
        self._taken = 0
        self.crc32 = 0  # running, of the raw bytes taken so far

    def accept(self, chunk: Chunk) -> bytes:
        """The chunk's raw bytes (empty for a last chunk without any); SnapshotError if bad."""
        self.admit(chunk)
        return self.take(chunk, decode(chunk))

    def admit(self, chunk: Chunk) -> None:
        """Check that `chunk` is the next one of this snapshot."""
        where = _where(chunk)
        if self._last_admitted:
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
        self._next_index += 1
        self._last_admitted = chunk.last

    def take(self, chunk: Chunk, raw: bytes) -> bytes:
        """`raw` (what `decode` gave for the next admitted chunk) once its running CRC holds."""
        where = _where(chunk)
        if chunk.index != self._taken or chunk.index >= self._next_index:
            raise SnapshotError(f"{where} taken out of turn (next: {self._taken})")
        if raw:
            try:
                check_crc(raw, chunk.crc32, where, self.crc32)
            except FrameError as err:
                raise SnapshotError(str(err)) from None
            self.crc32 = chunk.crc32
        self._taken += 1
        self.received_bytes += len(raw)
        if chunk.last:
            self._finish(chunk, where)
        return raw

    def _finish(self, chunk: Chunk, where: str) -> None:
        if chunk.total_bytes != self.received_bytes:
            raise SnapshotError(
                f"{where} (the last) says the image is {chunk.total_bytes} bytes, "
                f"{self.received_bytes} arrived"
            )
        if chunk.image_crc32 != self.crc32:
            raise SnapshotError(f"{where} (the last): the image's CRC does not match")
        self.done = True


def decode(chunk: Chunk) -> bytes:
    """The chunk's bytes decompressed, within bounds (the CRC is `SnapshotReceiver.take`'s)."""
    if chunk.last and not chunk.payload and chunk.raw_len == 0:
        return b""
    try:
        return decompress_bounded(
            chunk.payload, chunk.codec, chunk.raw_len, _where(chunk), CHUNK_BYTES_MAX
        )
    except FrameError as err:
        raise SnapshotError(str(err)) from None


def _where(chunk: Chunk) -> str:
    return f"snapshot chunk {chunk.index}"
