"""The WAL codec: golden bytes, Hypothesis round-trips, historical batch forms, fuzz invariant."""

from __future__ import annotations

import struct
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from kevo_repl.wal.codec import (
    MAX_RECORD_PAYLOAD,
    RECORD_FIRST,
    RECORD_FULL,
    RECORD_LAST,
    RECORD_MIDDLE,
    BatchForm,
    CodecError,
    Entry,
    Op,
    decode_unit,
    encode_batch,
    encode_entry,
    encode_seed_blob_batch,
    record,
    scan_unit,
)

# KEVO_COMPAT.md §1.12
GOLDEN_PUT = "c8 96 4f eb 13 00 01 01 01 00 00 00 00 00 00 00 01 00 00 00 6b 01 00 00 00 76"
GOLDEN_DELETE = "41 99 89 b7 0e 00 01 02 02 00 00 00 00 00 00 00 01 00 00 00 6b"
GOLDEN_BATCH_HEADER = "6f 36 5a 12 0d 00 01 04 03 00 00 00 00 00 00 00 02 00 00 00"

ops = st.sampled_from([Op.PUT, Op.DELETE, Op.MERGE])
keys = st.binary(min_size=0, max_size=64)
values = st.binary(min_size=0, max_size=200)
big_values = st.binary(min_size=0, max_size=3 * MAX_RECORD_PAYLOAD + 17)


def _records(data: bytes) -> list[tuple[int, int]]:
    """(type, payload length) of each physical record."""
    out, pos = [], 0
    while pos < len(data):
        crc, length, rtype = struct.unpack_from("<IHB", data, pos)
        payload = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(payload) == crc
        out.append((rtype, length))
        pos += 7 + length
    return out


def _expected(start: int, batch: list[tuple[Op, bytes, bytes]]) -> tuple[Entry, ...]:
    return tuple(
        Entry(start + i, op, k, b"" if op == Op.DELETE else v) for i, (op, k, v) in enumerate(batch)
    )


def test_golden_bytes_match_kevo() -> None:
    assert encode_entry(1, Op.PUT, b"k", b"v").hex(" ") == GOLDEN_PUT
    assert encode_entry(2, Op.DELETE, b"k").hex(" ") == GOLDEN_DELETE
    batch = encode_batch(3, [(Op.PUT, b"a", b"1"), (Op.DELETE, b"b", b"")])
    assert batch[:20].hex(" ") == GOLDEN_BATCH_HEADER


def test_golden_bytes_decode() -> None:
    unit = decode_unit(bytes.fromhex(GOLDEN_PUT.replace(" ", "")), 0)
    assert unit is not None and unit.entries == (Entry(1, Op.PUT, b"k", b"v"),)
    unit = decode_unit(bytes.fromhex(GOLDEN_DELETE.replace(" ", "")), 0)
    assert unit is not None and unit.entries == (Entry(2, Op.DELETE, b"k"),)


@given(seq=st.integers(0, 2**64 - 1), op=ops, key=keys, value=big_values)
@settings(max_examples=150, deadline=None)
def test_entry_round_trip(seq: int, op: Op, key: bytes, value: bytes) -> None:
    data = encode_entry(seq, op, key, value)
    unit = decode_unit(data, 0)
    assert unit is not None
    expected_value = b"" if op == Op.DELETE else value
    assert unit.entries == (Entry(seq, op, key, expected_value),)
    assert unit.length == len(data) and unit.form is BatchForm.SINGLE
    # Every prefix is "need more", never an error or a wrong entry.
    for cut in {0, 1, 6, 7, len(data) // 2, len(data) - 1}:
        if 0 <= cut < len(data):
            assert decode_unit(data[:cut], 0) is None


@given(keylen=st.integers(0, 40_000), vallen=st.integers(0, 100_000), op=ops)
@settings(max_examples=60, deadline=None)
def test_fragmentation_follows_kevo(keylen: int, vallen: int, op: Op) -> None:
    key, value = b"k" * keylen, b"v" * vallen
    data = encode_entry(7, op, key, value)
    size = 13 + keylen + (0 if op == Op.DELETE else 4 + vallen)
    recs = _records(data)
    if size <= MAX_RECORD_PAYLOAD:
        assert recs == [(RECORD_FULL, size)]
        return
    types = [t for t, _ in recs]
    assert types[0] == RECORD_FIRST and types[-1] == RECORD_LAST
    assert all(t == RECORD_MIDDLE for t in types[1:-1])
    assert recs[0][1] == 13 + min(keylen, MAX_RECORD_PAYLOAD - 13)
    assert all(n == MAX_RECORD_PAYLOAD for t, n in recs[1:-1])
    assert 1 <= recs[-1][1] <= MAX_RECORD_PAYLOAD
    assert sum(n for _, n in recs) == size


@given(
    start=st.integers(1, 2**40),
    batch=st.lists(st.tuples(ops, keys, values), min_size=1, max_size=20),
)
@settings(max_examples=100, deadline=None)
def test_seed_header_batch_round_trip(start: int, batch: list[tuple[Op, bytes, bytes]]) -> None:
    data = encode_batch(start, batch)
    unit = decode_unit(data, 0)
    assert unit is not None and unit.form is BatchForm.SEED_HEADER
    assert (unit.first_seq, unit.last_seq, unit.length) == (
        start,
        start + len(batch) - 1,
        len(data),
    )
    assert unit.entries == _expected(start, batch)
    # A batch cut anywhere is incomplete as a whole: no partial batch is ever returned.
    for cut in range(0, len(data), max(1, len(data) // 25)):
        assert decode_unit(data[:cut], 0) is None


@given(
    base=st.integers(1, 2**40),
    batch=st.lists(st.tuples(ops, keys, values), min_size=1, max_size=20),
)
@settings(max_examples=100, deadline=None)
def test_seed_blob_batch_is_read(base: int, batch: list[tuple[Op, bytes, bytes]]) -> None:
    data = encode_seed_blob_batch(base, batch)
    unit = decode_unit(data, 0)
    assert unit is not None and unit.form is BatchForm.SEED_BLOB
    assert unit.entries == _expected(base, batch) and unit.last_seq == base + len(batch) - 1


def test_head_equal_sequence_batch_reads_as_single_units() -> None:
    data = b"".join(encode_entry(5, Op.PUT, b"k%d" % i, b"v") for i in range(3))
    pos, seen = 0, []
    while pos < len(data):
        unit = decode_unit(data, pos)
        assert unit is not None and unit.form is BatchForm.SINGLE
        seen.append(unit.entries[0])
        pos += unit.length
    assert [e.seq for e in seen] == [5, 5, 5] and [e.key for e in seen] == [b"k0", b"k1", b"k2"]


def test_entry_with_trailing_bytes_is_accepted_like_kevo() -> None:
    payload = struct.pack("<BQI", 1, 9, 1) + b"k" + struct.pack("<I", 1) + b"v" + b"junk"
    unit = decode_unit(record(RECORD_FULL, payload), 0)
    assert unit is not None and unit.entries == (Entry(9, Op.PUT, b"k", b"v"),)


def test_specific_errors() -> None:
    good = encode_entry(1, Op.PUT, b"key", b"value")
    bad_crc = bytearray(good)
    bad_crc[-1] ^= 0xFF
    cases = {
        "CRC mismatch": bytes(bad_crc),
        "invalid record type 9": good[:6] + b"\x09" + good[7:],
        "invalid operation type 7": record(RECORD_FULL, b"\x07" + good[8:]),
        "without FIRST": record(RECORD_MIDDLE, b"x" * 10),
        "shorter than 13": record(RECORD_FULL, b"\x01\x00"),
        "interrupted by a new entry": record(RECORD_FIRST, good[7:20]) + good,
    }
    for reason, data in cases.items():
        try:
            decode_unit(data, 0)
        except CodecError as err:
            assert reason in err.reason, (reason, err.reason)
            assert err.offset >= 0 and err.end > err.offset
        else:
            raise AssertionError(f"no CodecError for {reason}")


def test_scan_unit_checks_lengths_like_decode_unit() -> None:
    """CRC-valid records whose lengths do not fit are refused by both readers, alike."""
    head = struct.pack("<BQI", Op.PUT, 9, 1) + b"k"
    cases = {
        "value length 100 runs past the entry": head + struct.pack("<I", 100) + b"v",
        "value length 2 runs past the entry": head + struct.pack("<I", 2) + b"v",
        "value length missing": head + b"\x00\x00",
        "key length 50 runs past the entry": struct.pack("<BQI", Op.MERGE, 9, 50) + b"k",
        "key length 9 runs past the entry": struct.pack("<BQI", Op.DELETE, 9, 9) + b"k",
    }
    for reason, payload in cases.items():
        data = record(RECORD_FULL, payload) + encode_entry(10, Op.PUT, b"x", b"y")
        errors = []
        for read in (decode_unit, scan_unit):
            try:
                read(data, 0)
            except CodecError as err:
                errors.append((err.offset, err.end, err.reason))
            else:
                raise AssertionError(f"{read.__name__} accepted a record with {reason}")
        assert errors[0] == errors[1], errors
        assert errors[0][2] == reason
    # What fits exactly is accepted by both (the value may end the entry, or be followed).
    for payload in (head + struct.pack("<I", 1) + b"v", head + struct.pack("<I", 0) + b"zz"):
        data = record(RECORD_FULL, payload)
        decoded, scanned = decode_unit(data, 0), scan_unit(data, 0)
        assert decoded is not None and scanned is not None
        assert (scanned.first_seq, scanned.length, scanned.raw) == (9, len(data), data)
        assert decoded.length == len(data)
    delete = record(RECORD_FULL, struct.pack("<BQI", Op.DELETE, 9, 1) + b"k")
    assert scan_unit(delete, 0) is not None


@given(st.binary(max_size=2048))
@settings(max_examples=1500, deadline=None)
def test_fuzz_any_bytes_decode_or_raise_codec_error(data: bytes) -> None:
    """The sans-IO invariant: a unit, "need more" (None), or CodecError; nothing else."""
    pos = 0
    while pos < len(data):
        try:
            unit = decode_unit(data, pos)
        except CodecError:
            return
        if unit is None:
            return
        assert unit.length > 0
        pos += unit.length


@given(
    st.lists(st.tuples(ops, keys, values), min_size=1, max_size=8),
    st.integers(0, 2000),
    st.integers(0, 255),
)
@settings(max_examples=400, deadline=None)
def test_fuzz_mutated_valid_log(
    batch: list[tuple[Op, bytes, bytes]], where: int, byte: int
) -> None:
    data = bytearray(encode_batch(1, batch) + encode_entry(100, Op.PUT, b"x", b"y"))
    data[where % len(data)] = byte
    test_fuzz_any_bytes_decode_or_raise_codec_error.hypothesis.inner_test(bytes(data))  # type: ignore[attr-defined]


def _batch_ops(n: int) -> list[tuple[int, bytes, bytes]]:
    ops = [(Op.PUT, b"k%d" % i, b"v" * (i % 50)) for i in range(n)]
    return [*ops, (Op.DELETE, b"gone", b""), (Op.MERGE, b"m", b"+1")]


def test_scan_unit_reads_a_header_batch_without_building_entries() -> None:
    data = encode_batch(100, _batch_ops(40)) + encode_entry(143, Op.PUT, b"x", b"y")
    decoded, scanned = decode_unit(data, 0, 7, keep_raw=True), scan_unit(data, 0, 7)
    assert decoded is not None and scanned is not None
    assert scanned.entries == () and len(decoded.entries) == 42
    same = ("offset", "length", "form", "first_seq", "last_seq", "raw")
    assert [getattr(scanned, f) for f in same] == [getattr(decoded, f) for f in same]
    assert scanned.form == BatchForm.SEED_HEADER and (scanned.first_seq, scanned.last_seq) == (
        100,
        141,
    )
    assert scan_unit(data[:-20], 0) is not None  # the batch is whole; the next unit is cut
    assert scan_unit(encode_batch(5, _batch_ops(3))[:-1], 0) is None  # the batch is cut: more


@given(st.integers(0, 2000), st.integers(0, 255))
@settings(max_examples=400, deadline=None)
def test_scan_unit_refuses_a_damaged_batch_exactly_like_decode_unit(at: int, xor: int) -> None:
    """Any byte of a header batch changed: both readers give the same unit, None or error."""
    data = bytearray(encode_batch(100, _batch_ops(30)))
    data[at % len(data)] ^= xor or 1
    outcomes: list[tuple[object, ...]] = []
    for scan in (False, True):
        try:
            unit = scan_unit(bytes(data), 0) if scan else decode_unit(bytes(data), 0, keep_raw=True)
        except CodecError as err:
            outcomes.append(("error", err.offset, err.end, err.reason))
        else:
            outcomes.append(
                ("unit", None)
                if unit is None
                else ("unit", unit.length, unit.first_seq, unit.last_seq, unit.raw)
            )
    assert outcomes[0] == outcomes[1]
