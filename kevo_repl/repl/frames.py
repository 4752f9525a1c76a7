"""Replication frames: consecutive WAL units compressed as one. Pure functions over bytes; no I/O.

A frame is what a primary ships to a kevo-repl replica in ``WALStreamResponse.frame``
(proto ``kevo.replication.Frame``)::

    first_seq   u64  first sequence of the first unit
    last_seq    u64  last sequence of the last unit
    codec       enum NONE 0 | ZSTD 1 | SNAPPY 2 (proto CompressionCodec)
    raw_len     u32  length of the raw payload, 1..raw_bytes_max (default FRAME_RAW_BYTES_MAX)
    crc32       u32  CRC-32/IEEE (zlib.crc32) of the raw payload
    payload     bytes: the raw payload compressed with `codec`

The raw payload is WAL units in the WAL's own byte format (``kevo_repl.wal.codec``) laid end to
end, with no framing of its own: a single entry as ``encode_entry`` writes it (FULL, or
FIRST/MIDDLE*/LAST when over 32 KiB), a batch as ``encode_batch`` writes it (format A). A replica
decodes it with ``decode_unit`` and can append each unit's bytes to its own WAL unchanged. A batch
that was read in format B (seed blob) is re-encoded in format A, so it comes back as
``BatchForm.SEED_HEADER`` with the same entries and sequences. Unit offsets returned by
`decode_frame` are positions inside the raw payload.

Compression, applied to the raw payload as a whole:

* ZSTD: exactly one standard zstd frame (RFC 8878) with its content size, and nothing after it.
* SNAPPY: the snappy *block* format (varint uncompressed-length preamble, then the block) that
  Kevo uses, i.e. ``snappy.compress``/``snappy.uncompress``, not the framed stream format.
* NONE: the raw payload itself.

Invariants (`encode_frame` guarantees them, `decode_frame` checks every one):

* at least one unit; a unit is never split across frames;
* units are consecutive: each unit's first_seq is the previous unit's last_seq + 1;
* first_seq/last_seq are those of the first/last unit;
* 1 <= raw_len <= raw_bytes_max, the decompressed length equals raw_len, its CRC equals crc32;
* the raw payload is whole units only: a trailing partial unit is an error.

Bounds: `decode_frame` rejects raw_len over the limit before decompressing, and never lets a
decompressor allocate more than raw_len (plus the library's small fixed overhead): a zstd frame
header declaring another size, or a snappy preamble declaring another length, is rejected before
decompressing; a zstd frame without a content size is decompressed into at most raw_len bytes.

Decoding never raises anything but `FrameError`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import snappy
import zstandard
from isal import isal_zlib

from kevo_repl.errors import InvalidArgumentError, KevoReplError
from kevo_repl.wal.codec import (
    MAX_SEQ,
    BatchForm,
    CodecError,
    Op,
    Unit,
    decode_unit,
    encode_batch,
    encode_entry,
)

# The largest raw payload a frame may declare. One largest unit fits: a transaction commits at most
# 64 MiB of buffered writes (node/transactions.py) as one batch, and record and entry headers add
# well under 16 MiB to that. A receiver never buffers more than this for one frame.
FRAME_RAW_BYTES_MAX = 80 * 1024 * 1024
ZSTD_LEVEL_MIN = 1
ZSTD_LEVEL_MAX = 22
_SNAPPY_PREAMBLE_BYTES_MAX = 5  # a varint u32

# CRC-32/IEEE, the same function as zlib.crc32, from ISA-L: 27 GB/s against zlib's 4.9 GB/s on
# 4 MiB here. With zlib, a snapshot spent about a tenth of each side's CPU on its CRC. Frames and
# snapshot chunks use this one; the WAL codec keeps zlib's, which costs less per call on records
# of ~100 bytes (0.11 against 0.16 us).
crc32_ieee = isal_zlib.crc32

# What the compression libraries raise on bad input; turned into FrameError at the call.
_LIBRARY_ERRORS = (zstandard.ZstdError, snappy.UncompressError)
_OPS = frozenset(Op)


class Codec(IntEnum):
    """Frame compression; the same numbers as proto ``kevo.replication.CompressionCodec``."""

    NONE = 0
    ZSTD = 1
    SNAPPY = 2


_CODECS = frozenset(Codec)


class FrameError(KevoReplError):
    """A frame that cannot be decoded: bad codec, bounds, compression, checksum or units."""


@dataclass(frozen=True, slots=True)
class Frame:
    first_seq: int  # == first unit's first_seq
    last_seq: int  # == last unit's last_seq
    codec: Codec
    raw_len: int  # length of the decompressed payload, 1..FRAME_RAW_BYTES_MAX when encoded here
    crc32: int  # zlib.crc32 of the decompressed payload
    payload: bytes  # the raw payload compressed with codec


# ---------------------------------------------------------------------------------------------
# zstd contexts. zstandard's (de)compressor objects are not thread-safe, so each thread keeps its
# own. Per thread rather than per call because creating one per call is measurably slower on a
# 256 KiB frame: +8..17 us each time, i.e. +3..4% per compression and +7..20% per decompression.

_local = threading.local()


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cctx


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if dctx is None:
        dctx = _local.decompressor = zstandard.ZstdDecompressor()
    return dctx


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_units(units: Sequence[Unit]) -> bytes:
    """The raw payload: each unit re-encoded in the WAL format (batches as format A), end to end."""
    parts = []
    for unit in units:
        if unit.raw:  # read from a WAL with raw=True: already the exact bytes
            parts.append(unit.raw)
        elif unit.form == BatchForm.SINGLE:
            (entry,) = unit.entries
            parts.append(encode_entry(entry.seq, entry.op, entry.key, entry.value))
        else:
            ops = [(e.op, e.key, e.value) for e in unit.entries]
            parts.append(encode_batch(unit.first_seq, ops))
    return b"".join(parts)


def encode_frame(units: Sequence[Unit], codec: Codec, zstd_level: int = 1) -> Frame:
    """Build a frame from non-empty, consecutive, self-consistent units.

    Raises InvalidArgumentError for anything `decode_frame` would reject.
    """
    _check_units(units)
    raw = encode_units(units)
    return encode_raw_frame(units[0].first_seq, units[-1].last_seq, raw, codec, zstd_level)


def encode_raw_frame(
    first_seq: int, last_seq: int, raw: bytes, codec: Codec, zstd_level: int = 1
) -> Frame:
    """A frame of `raw`: whole units in the WAL's format, sequences first_seq..last_seq.

    For bytes this node's own WAL wrote (its tail window), so the units are not decoded and
    checked again here; `decode_frame` on the other side checks everything.
    """
    if codec not in _CODECS:
        raise InvalidArgumentError(f"unknown codec {codec!r}")
    if not ZSTD_LEVEL_MIN <= zstd_level <= ZSTD_LEVEL_MAX:
        raise InvalidArgumentError(
            f"zstd level {zstd_level} is outside {ZSTD_LEVEL_MIN}..{ZSTD_LEVEL_MAX}"
        )
    if not 1 <= len(raw) <= FRAME_RAW_BYTES_MAX:
        raise InvalidArgumentError(
            f"frame of {len(raw)} raw bytes is outside 1..{FRAME_RAW_BYTES_MAX} bytes"
        )
    codec = Codec(codec)
    payload, crc = compress_checked(raw, codec, zstd_level)
    return Frame(first_seq, last_seq, codec, len(raw), crc, payload)


def compress_checked(raw: bytes, codec: Codec, zstd_level: int = 1) -> tuple[bytes, int]:
    """(payload, crc32): `raw` compressed with `codec`, and the CRC of `raw` itself.

    Frames and snapshot chunks carry the same pair; `decompress_checked` undoes it.
    """
    return compress(raw, codec, zstd_level), crc32_ieee(raw)


def compress(raw: bytes | bytearray | memoryview, codec: Codec, zstd_level: int = 1) -> bytes:
    """`raw` compressed with `codec` (NONE: the bytes themselves)."""
    if codec == Codec.ZSTD:
        return bytes(_zstd_compressor(zstd_level).compress(raw))
    if codec == Codec.SNAPPY:
        return bytes(snappy.compress(raw))
    return bytes(raw)


def _check_units(units: Sequence[Unit]) -> None:
    if not units:
        raise InvalidArgumentError("a frame needs at least one unit")
    prev_last: int | None = None
    for i, unit in enumerate(units):
        _check_unit(i, unit)
        if prev_last is not None and unit.first_seq != prev_last + 1:
            raise InvalidArgumentError(
                f"unit {i} starts at sequence {unit.first_seq}, expected {prev_last + 1}"
            )
        prev_last = unit.last_seq


def _check_unit(i: int, unit: Unit) -> None:
    """The unit's seqs must be what its entries encode to, or decoding would see other seqs."""
    first, n = unit.first_seq, len(unit.entries)
    if not 0 <= first <= MAX_SEQ or not 0 <= unit.last_seq <= MAX_SEQ:
        raise InvalidArgumentError(f"unit {i}: sequence out of the u64 range")
    entries_ok = all(e.seq == first + j and e.op in _OPS for j, e in enumerate(unit.entries))
    if unit.form == BatchForm.SINGLE:
        ok = n == 1 and entries_ok and first == unit.last_seq
    else:
        ok = entries_ok and unit.last_seq == first + max(n, 1) - 1
    if not ok:
        raise InvalidArgumentError(
            f"unit {i} ({unit.form.name}, sequences {first}..{unit.last_seq}) does not match "
            f"its {n} entries"
        )


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_frame(frame: Frame, *, raw_bytes_max: int = FRAME_RAW_BYTES_MAX) -> list[Unit]:
    """The frame's units, after checking every invariant in the module docstring."""
    return decode_frame_raw(frame, raw_bytes_max=raw_bytes_max)[1]


def decode_frame_raw(
    frame: Frame, *, raw_bytes_max: int = FRAME_RAW_BYTES_MAX
) -> tuple[bytes, list[Unit]]:
    """`decode_frame`, also returning the raw payload (unit offsets index into it), so a
    replica can write the units' bytes to its WAL without encoding them again."""
    where = f"frame {frame.first_seq}..{frame.last_seq}"
    raw = decompress_checked(
        frame.payload, frame.codec, frame.raw_len, frame.crc32, where, raw_bytes_max
    )
    units = _decode_units(raw, where)
    if units[0].first_seq != frame.first_seq or units[-1].last_seq != frame.last_seq:
        raise FrameError(
            f"{where}: units span sequences {units[0].first_seq}..{units[-1].last_seq}"
        )
    return raw, units


def decompress_checked(
    payload: bytes, codec: int, raw_len: int, crc32: int, where: str, raw_bytes_max: int
) -> bytes:
    """The raw bytes of a (payload, crc32) pair, after every bounds, codec and CRC check.

    `where` names the frame or chunk in the FrameError raised for anything that fails.
    """
    raw = decompress_bounded(payload, codec, raw_len, where, raw_bytes_max)
    check_crc(raw, crc32, where)
    return raw


def decompress_bounded(
    payload: bytes, codec: int, raw_len: int, where: str, raw_bytes_max: int
) -> bytes:
    """`decompress_checked` without the CRC check, for a caller that checks it in another
    step (a snapshot's running CRC)."""
    try:
        known = Codec(codec)
    except ValueError:
        raise FrameError(f"{where}: unknown codec {codec!r}") from None
    if not 1 <= raw_len <= raw_bytes_max:
        raise FrameError(f"{where}: raw length {raw_len} is outside 1..{raw_bytes_max}")
    raw = _decompress(payload, known, raw_len, where)
    if len(raw) != raw_len:
        raise FrameError(f"{where}: payload is {len(raw)} bytes raw, header says {raw_len}")
    return raw


def check_crc(raw: bytes, crc32: int, where: str, crc_prior: int = 0) -> None:
    """FrameError unless ``crc32_ieee(raw, crc_prior) == crc32``."""
    if crc32_ieee(raw, crc_prior) != crc32:
        raise FrameError(f"{where}: CRC mismatch")


def _decompress(payload: bytes, codec: Codec, raw_len: int, where: str) -> bytes:
    try:
        if codec == Codec.ZSTD:
            return _zstd_decompress(payload, raw_len, where)
        if codec == Codec.SNAPPY:
            return _snappy_decompress(payload, raw_len, where)
    except _LIBRARY_ERRORS as exc:
        detail = str(exc) or str(exc.__cause__) or type(exc).__name__  # snappy's str is empty
        raise FrameError(f"{where}: {codec.name} payload does not decompress: {detail}") from exc
    return payload


def _zstd_decompress(payload: bytes, raw_len: int, where: str) -> bytes:
    # With a content size in the header, zstandard allocates that size whatever max_output_size
    # says, so a header declaring more than raw_len is rejected first. Without one (-1), the
    # output buffer is max_output_size = raw_len and more output is an error. allow_extra_data
    # off: a second frame or trailing bytes would otherwise be ignored silently.
    declared = zstandard.frame_content_size(payload)
    if declared not in (-1, raw_len):
        raise FrameError(f"{where}: zstd header declares {declared} bytes, frame says {raw_len}")
    dctx = _zstd_decompressor()
    return bytes(dctx.decompress(payload, max_output_size=raw_len, allow_extra_data=False))


def _snappy_decompress(payload: bytes, raw_len: int, where: str) -> bytes:
    # snappy allocates what its preamble declares: check that first.
    declared = _snappy_preamble(payload, where)
    if declared != raw_len:
        raise FrameError(
            f"{where}: snappy preamble declares {declared} bytes, frame says {raw_len}"
        )
    return bytes(snappy.uncompress(payload))


def _snappy_preamble(payload: bytes, where: str) -> int:
    """The little-endian base-128 varint uncompressed length that starts a snappy block."""
    value = 0
    for i, byte in enumerate(payload[:_SNAPPY_PREAMBLE_BYTES_MAX]):
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value
    raise FrameError(f"{where}: snappy length preamble is truncated or over 5 bytes")


def _decode_units(raw: bytes, where: str) -> list[Unit]:
    units: list[Unit] = []
    pos = 0
    while pos < len(raw):
        try:
            unit = decode_unit(raw, pos)
        except CodecError as exc:
            raise FrameError(f"{where}: bad unit in the raw payload at {exc}") from exc
        if unit is None:
            raise FrameError(f"{where}: raw payload ends inside a unit at offset {pos}")
        if units and unit.first_seq != units[-1].last_seq + 1:
            raise FrameError(
                f"{where}: unit at offset {pos} starts at sequence {unit.first_seq}, "
                f"expected {units[-1].last_seq + 1}"
            )
        units.append(unit)
        pos += unit.length
    return units
