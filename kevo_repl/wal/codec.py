"""Kevo WAL byte format: records, entries, fragments and batches. Pure functions over bytes; no I/O.

Physical record (little-endian), exactly Kevo's::

    u32 crc      CRC-32/IEEE (zlib.crc32) of the payload only
    u16 length   payload length, at most 32768 when we write (any u16 is accepted when reading)
    u8  type     1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST
    payload

Logical entry (the payload of a FULL record, or FIRST+MIDDLE*+LAST concatenated)::

    u8 op (1 Put, 2 Delete, 3 Merge) | u64 seq | u32 keylen | key | [u32 vallen | value]

(a Delete has no value-length field at all)

An entry whose encoding exceeds 32768 bytes is fragmented: FIRST holds op, seq, keylen and up to
32755 key bytes; MIDDLE records of exactly 32768 bytes follow while more than 32768 remain; one LAST
holds the final 1..32768 bytes.

A *unit* is what a writer appends atomically and a reader returns whole: one entry, or one batch.
Batches, in the three forms Kevo has written over time (KEVO_COMPAT.md §1.5):

* format A (the seed's ``AppendBatch``; what we write): a FULL record with the 13-byte payload
  ``u8 4 | u64 start_seq | u32 count`` followed by ``count`` entries with seq = start_seq + i, each
  keeping its own op. We also let an entry inside a batch fragment like any other entry.
* format B (the seed's ``Batch.Write``): one FULL entry with op 4 whose key is the blob
  ``u32 count | u64 base_seq | (u8 op | u32 keylen | key | [u32 vallen | value])*`` and an
  empty value.
* HEAD: entries written one FULL record each, all with the same seq. Nothing in the bytes marks
  them as a batch, so they read as separate single-entry units.

Decoding never raises anything but `CodecError`; an incomplete unit returns `None` ("need more").
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from enum import IntEnum
from typing import NamedTuple

HEADER_SIZE = 7
MAX_RECORD_PAYLOAD = 32 * 1024
ENTRY_HEADER_SIZE = 13  # op + seq + keylen
MAX_SEQ = 2**64 - 1
# The largest unit one decode call will assemble; beyond it the bytes are treated as corrupt so a
# bad length can never make a reader buffer gigabytes.
MAX_UNIT_BYTES = 256 * 1024 * 1024

RECORD_FULL = 1
RECORD_FIRST = 2
RECORD_MIDDLE = 3
RECORD_LAST = 4
OP_BATCH = 4

_HEADER = struct.Struct("<IHB")
_ENTRY_HEAD = struct.Struct("<BQI")
_U32 = struct.Struct("<I")
_BATCH_HEAD = struct.Struct("<BQI")  # op 4, start seq, count: format A header payload
_BLOB_HEAD = struct.Struct("<IQ")  # count, base seq: format B blob prefix
_BLOB_OP = struct.Struct("<BI")
_crc32 = zlib.crc32


class Op(IntEnum):
    PUT = 1
    DELETE = 2
    MERGE = 3


_OPS = (None, Op.PUT, Op.DELETE, Op.MERGE)  # op byte -> Op without the cost of Op(n)


class BatchForm(IntEnum):
    """How a unit was laid out on disk; kept so a dump can tell the forms apart."""

    SINGLE = 0
    SEED_HEADER = 1  # format A
    SEED_BLOB = 2  # format B


class CodecError(Exception):
    """Bytes that are not a valid record or unit.

    `offset` is where the offending record starts; `end` is where its bytes end as far as they could
    be delimited (used by the segment reader to tell a torn tail from corruption).
    """

    def __init__(self, offset: int, end: int, reason: str) -> None:
        super().__init__(f"offset {offset}: {reason}")
        self.offset = offset
        self.end = end
        self.reason = reason


class Entry(NamedTuple):
    # A NamedTuple rather than a frozen dataclass: readers build millions of these and tuple
    # construction is several times cheaper.
    seq: int
    op: Op
    key: bytes
    value: bytes = b""  # always b"" for a Delete


class Unit(NamedTuple):
    """One atomic group of entries as found at `offset`, spanning `length` bytes."""

    entries: tuple[Entry, ...]
    offset: int
    length: int
    form: BatchForm
    first_seq: int
    last_seq: int
    # The unit's bytes as read, only when the reader was asked to keep them (a primary ships
    # them as they are instead of encoding the entries again); empty otherwise.
    raw: bytes = b""

    @property
    def is_batch(self) -> bool:
        return self.form != BatchForm.SINGLE


# ---------------------------------------------------------------------------------------------
# Encoding


def entry_payload(seq: int, op: int, key: bytes, value: bytes) -> bytes:
    """The logical entry bytes (§1.3)."""
    if op == Op.DELETE:
        return _ENTRY_HEAD.pack(op, seq, len(key)) + key
    return b"".join((_ENTRY_HEAD.pack(op, seq, len(key)), key, _U32.pack(len(value)), value))


def record(rtype: int, payload: bytes) -> bytes:
    return _HEADER.pack(_crc32(payload), len(payload), rtype) + payload


def encode_entry(seq: int, op: int, key: bytes, value: bytes = b"") -> bytes:
    """Encode one entry as FULL, or FIRST/MIDDLE*/LAST when it exceeds 32 KiB."""
    payload = entry_payload(seq, op, key, value)
    if len(payload) <= MAX_RECORD_PAYLOAD:
        return _HEADER.pack(_crc32(payload), len(payload), RECORD_FULL) + payload
    return _fragment(payload, len(key))


def _fragment(payload: bytes, keylen: int) -> bytes:
    # Kevo's FIRST holds the entry head plus as much of the key as fits, never any of the value.
    first_len = ENTRY_HEADER_SIZE + min(keylen, MAX_RECORD_PAYLOAD - ENTRY_HEADER_SIZE)
    parts = [record(RECORD_FIRST, payload[:first_len])]
    pos = first_len
    while len(payload) - pos > MAX_RECORD_PAYLOAD:
        parts.append(record(RECORD_MIDDLE, payload[pos : pos + MAX_RECORD_PAYLOAD]))
        pos += MAX_RECORD_PAYLOAD
    parts.append(record(RECORD_LAST, payload[pos:]))
    return b"".join(parts)


def encode_batch(start_seq: int, ops: Sequence[tuple[int, bytes, bytes]]) -> bytes:
    """Encode a format-A batch: header record, then one entry per (op, key, value), seq start+i."""
    head = record(RECORD_FULL, _BATCH_HEAD.pack(OP_BATCH, start_seq, len(ops)))
    body = [encode_entry(start_seq + i, op, key, value) for i, (op, key, value) in enumerate(ops)]
    return head + b"".join(body)


def encode_seed_blob_batch(base_seq: int, ops: Sequence[tuple[int, bytes, bytes]]) -> bytes:
    """Encode a format-B batch (only to test that we read it; we never write this form)."""
    parts = [_BLOB_HEAD.pack(len(ops), base_seq)]
    for op, key, value in ops:
        parts.append(_BLOB_OP.pack(op, len(key)) + key)
        if op != Op.DELETE:
            parts.append(_U32.pack(len(value)) + value)
    blob = b"".join(parts)
    return record(RECORD_FULL, entry_payload(base_seq, OP_BATCH, blob, b""))


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_entry(payload: bytes, offset: int = 0, end: int = 0) -> Entry:
    """Parse a §1.3 entry with op 1..3. Trailing bytes after the value are ignored, as Kevo does."""
    n = len(payload)
    if n < ENTRY_HEADER_SIZE:
        raise CodecError(offset, end, f"entry of {n} bytes is shorter than 13")
    op, seq, keylen = _ENTRY_HEAD.unpack_from(payload, 0)
    if op < Op.PUT or op > Op.MERGE:
        raise CodecError(offset, end, f"invalid operation type {op}")
    kend = ENTRY_HEADER_SIZE + keylen
    if kend > n:
        raise CodecError(offset, end, f"key length {keylen} runs past the entry")
    key = payload[ENTRY_HEADER_SIZE:kend]
    if op == Op.DELETE:
        return Entry(seq, Op.DELETE, key)
    if kend + 4 > n:
        raise CodecError(offset, end, "value length missing")
    (vallen,) = _U32.unpack_from(payload, kend)
    vend = kend + 4 + vallen
    if vend > n:
        raise CodecError(offset, end, f"value length {vallen} runs past the entry")
    return Entry(seq, Op(op), key, payload[kend + 4 : vend])


def _read_record(buf: bytes, pos: int) -> tuple[int, bytes, int] | None:
    """(type, payload, next position), None if incomplete; CodecError on a bad type or CRC."""
    if len(buf) - pos < HEADER_SIZE:
        return None
    crc, length, rtype = _HEADER.unpack_from(buf, pos)
    if rtype < RECORD_FULL or rtype > RECORD_LAST:
        raise CodecError(pos, pos + HEADER_SIZE, f"invalid record type {rtype}")
    end = pos + HEADER_SIZE + length
    if end > len(buf):
        return None
    payload = buf[pos + HEADER_SIZE : end]
    if _crc32(payload) != crc:
        raise CodecError(pos, end, "CRC mismatch")
    return rtype, payload, end


def _read_logical(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    """One logical entry payload (reassembling fragments) starting at pos."""
    rec = _read_record(buf, pos)
    if rec is None:
        return None
    rtype, payload, nxt = rec
    if rtype == RECORD_FULL:
        return payload, nxt
    if rtype != RECORD_FIRST:
        raise CodecError(
            pos, nxt, f"{'MIDDLE' if rtype == RECORD_MIDDLE else 'LAST'} without FIRST"
        )
    parts = [payload]
    total = len(payload)
    while True:
        at = nxt
        rec = _read_record(buf, at)
        if rec is None:
            return None
        rtype, payload, nxt = rec
        if rtype not in (RECORD_MIDDLE, RECORD_LAST):
            raise CodecError(at, nxt, "fragmented entry interrupted by a new entry")
        total += len(payload)
        if total > MAX_UNIT_BYTES:
            raise CodecError(pos, nxt, "fragmented entry larger than the unit limit")
        parts.append(payload)
        if rtype == RECORD_LAST:
            return b"".join(parts), nxt


def decode_unit(buf: bytes, pos: int, base: int = 0, keep_raw: bool = False) -> Unit | None:
    """Decode the unit starting at `pos`; None if `buf` ends before the unit does.

    `base` is added to the unit's offset (the file offset of `buf[0]`); error offsets stay
    relative to `buf`.
    """
    # Fast path for the common case, a FULL record holding one Put/Delete/Merge: inlined because
    # readers spend most of their time here.
    if len(buf) - pos >= HEADER_SIZE:
        crc, length, rtype = _HEADER.unpack_from(buf, pos)
        end = pos + HEADER_SIZE + length
        if rtype == RECORD_FULL and end <= len(buf) and length >= ENTRY_HEADER_SIZE:
            payload = buf[pos + HEADER_SIZE : end]
            op = payload[0]
            if 0 < op < OP_BATCH and _crc32(payload) == crc:
                _, seq, keylen = _ENTRY_HEAD.unpack_from(payload, 0)
                kend = ENTRY_HEADER_SIZE + keylen
                if op == Op.DELETE and kend <= length:
                    entry = Entry(seq, Op.DELETE, payload[ENTRY_HEADER_SIZE:kend])
                    raw = buf[pos:end] if keep_raw else b""
                    return Unit((entry,), base + pos, end - pos, BatchForm.SINGLE, seq, seq, raw)
                if kend + 4 <= length:
                    vend = kend + 4 + _U32.unpack_from(payload, kend)[0]
                    if vend <= length:
                        key, value = payload[ENTRY_HEADER_SIZE:kend], payload[kend + 4 : vend]
                        entry = Entry(seq, _OPS[op], key, value)  # type: ignore[arg-type]
                        raw = buf[pos:end] if keep_raw else b""
                        return Unit(
                            (entry,), base + pos, end - pos, BatchForm.SINGLE, seq, seq, raw
                        )
    unit = _decode_unit_slow(buf, pos, base)
    if unit is not None and keep_raw:
        return unit._replace(raw=buf[pos : pos + unit.length])
    return unit


def scan_unit(buf: bytes, pos: int, base: int = 0) -> Unit | None:
    """`decode_unit` with `keep_raw`, for a reader that ships bytes and needs no entries.

    A single-entry unit, or a format-A batch of unfragmented entries, comes back with empty
    `entries` after its CRCs, sequences and lengths were checked, but without building the
    entries (a primary streaming its WAL spends most of its time there otherwise). Other units
    (format-B batches, fragments) are decoded whole.
    """
    if len(buf) - pos >= HEADER_SIZE:
        crc, length, rtype = _HEADER.unpack_from(buf, pos)
        end = pos + HEADER_SIZE + length
        if rtype == RECORD_FULL and end <= len(buf) and length >= ENTRY_HEADER_SIZE:
            start = pos + HEADER_SIZE
            op, seq, keylen = _ENTRY_HEAD.unpack_from(buf, start)
            kend = ENTRY_HEADER_SIZE + keylen
            # The same bounds decode_entry checks (a Delete has no value length); anything that
            # fails them goes to decode_unit, which raises the same error it always does.
            if (
                0 < op < OP_BATCH
                and kend <= length
                and (
                    op == Op.DELETE
                    or (
                        kend + 4 <= length
                        and kend + 4 + _U32.unpack_from(buf, start + kend)[0] <= length
                    )
                )
            ):
                raw = buf[pos:end]
                if _crc32(raw[HEADER_SIZE:]) == crc:
                    return Unit((), base + pos, end - pos, BatchForm.SINGLE, seq, seq, raw)
            elif op == OP_BATCH and length == _BATCH_HEAD.size:
                unit = _scan_header_batch(buf, pos, base)
                if unit is not None:
                    return unit
    return decode_unit(buf, pos, base, keep_raw=True)


def _scan_header_batch(buf: bytes, pos: int, base: int) -> Unit | None:
    """A format-A batch (what our own BatchWrites become) checked as `_decode_seed_header_batch`
    checks it, every record's CRC and every entry's sequence and lengths, without building the
    entries. None when it is anything but the plain case (a fragmented entry, a record past the
    buffer, any check failing): the caller then decodes it whole, which raises the same error
    it always does, at the same offset.
    """
    n = len(buf)
    crc, length, _ = _HEADER.unpack_from(buf, pos)
    at = pos + HEADER_SIZE
    nxt = at + length
    if nxt > n or _crc32(buf[at:nxt]) != crc:
        return None
    op, start, count = _BATCH_HEAD.unpack_from(buf, at)
    if op != OP_BATCH or start + count - 1 > MAX_SEQ:
        return None
    view = memoryview(buf)
    for i in range(count):
        if n - nxt < HEADER_SIZE:
            return None
        crc, length, rtype = _HEADER.unpack_from(buf, nxt)
        at = nxt + HEADER_SIZE
        nxt = at + length
        if rtype != RECORD_FULL or nxt > n or length < ENTRY_HEADER_SIZE:
            return None
        eop, seq, keylen = _ENTRY_HEAD.unpack_from(buf, at)
        kend = ENTRY_HEADER_SIZE + keylen
        if seq != start + i or not 0 < eop < OP_BATCH or kend > length:
            return None
        if eop != Op.DELETE and (
            kend + 4 > length or kend + 4 + _U32.unpack_from(buf, at + kend)[0] > length
        ):
            return None
        if _crc32(view[at:nxt]) != crc or nxt - pos > MAX_UNIT_BYTES:
            return None
    last = start + count - 1 if count else start
    return Unit((), base + pos, nxt - pos, BatchForm.SEED_HEADER, start, last, buf[pos:nxt])


def _decode_unit_slow(buf: bytes, pos: int, base: int) -> Unit | None:
    got = _read_logical(buf, pos)
    if got is None:
        return None
    payload, nxt = got
    if payload and payload[0] == OP_BATCH:
        unit = _decode_batch(buf, pos, payload, nxt)
        return unit._replace(offset=base + pos) if unit is not None and base else unit
    entry = decode_entry(payload, pos, nxt)
    return Unit((entry,), base + pos, nxt - pos, BatchForm.SINGLE, entry.seq, entry.seq)


def _decode_batch(buf: bytes, pos: int, payload: bytes, nxt: int) -> Unit | None:
    if len(payload) == _BATCH_HEAD.size:
        _, start, count = _BATCH_HEAD.unpack(payload)
        return _decode_seed_header_batch(buf, pos, nxt, start, count)
    return _decode_seed_blob_batch(payload, pos, nxt)


def _decode_seed_header_batch(
    buf: bytes, pos: int, nxt: int, start: int, count: int
) -> Unit | None:
    if start + count - 1 > MAX_SEQ:
        raise CodecError(pos, nxt, f"batch of {count} from sequence {start} overflows u64")
    entries = []
    for i in range(count):
        at = nxt
        got = _read_logical(buf, at)
        if got is None:
            return None
        payload, nxt = got
        if nxt - pos > MAX_UNIT_BYTES:
            raise CodecError(pos, nxt, "batch larger than the unit limit")
        entry = decode_entry(payload, at, nxt)
        if entry.seq != start + i:
            raise CodecError(at, nxt, f"batch entry has sequence {entry.seq}, expected {start + i}")
        entries.append(entry)
    last = start + count - 1 if count else start
    return Unit(tuple(entries), pos, nxt - pos, BatchForm.SEED_HEADER, start, last)


def _decode_seed_blob_batch(payload: bytes, pos: int, nxt: int) -> Unit:
    n = len(payload)
    if n < ENTRY_HEADER_SIZE:
        raise CodecError(pos, nxt, f"batch entry of {n} bytes is shorter than 13")
    _, _seq, bloblen = _ENTRY_HEAD.unpack_from(payload, 0)
    blob_end = ENTRY_HEADER_SIZE + bloblen
    if bloblen < _BLOB_HEAD.size or blob_end > n:
        raise CodecError(pos, nxt, f"batch blob length {bloblen} is invalid")
    count, base = _BLOB_HEAD.unpack_from(payload, ENTRY_HEADER_SIZE)
    at = ENTRY_HEADER_SIZE + _BLOB_HEAD.size
    entries = []
    for i in range(count):
        if at + _BLOB_OP.size > blob_end:
            raise CodecError(pos, nxt, f"batch blob ends after {i} of {count} operations")
        op, keylen = _BLOB_OP.unpack_from(payload, at)
        at += _BLOB_OP.size
        key, at = _blob_field(payload, at, keylen, blob_end, pos, nxt)
        if op == Op.DELETE:
            entries.append(Entry(base + i, Op.DELETE, key))
            continue
        if op not in (Op.PUT, Op.MERGE) or at + 4 > blob_end:
            raise CodecError(pos, nxt, f"batch blob operation {i} is invalid (op {op})")
        (vallen,) = _U32.unpack_from(payload, at)
        value, at = _blob_field(payload, at + 4, vallen, blob_end, pos, nxt)
        entries.append(Entry(base + i, Op(op), key, value))
    if base + max(count, 1) - 1 > MAX_SEQ:
        raise CodecError(pos, nxt, "batch sequence overflows u64")
    last = base + count - 1 if count else base
    return Unit(tuple(entries), pos, nxt - pos, BatchForm.SEED_BLOB, base, last)


def _blob_field(
    payload: bytes, at: int, n: int, limit: int, pos: int, nxt: int
) -> tuple[bytes, int]:
    if at + n > limit:
        raise CodecError(pos, nxt, "batch blob field runs past the blob")
    return payload[at : at + n], at + n
