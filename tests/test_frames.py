"""Replication frames: round-trips, compression ratio, bounds, bad frames, fuzz invariant."""

from __future__ import annotations

import dataclasses
import json
import random
import struct
import tracemalloc
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import snappy
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kevo_repl.errors import InvalidArgumentError, KevoReplError
from kevo_repl.repl import frames
from kevo_repl.repl.frames import (
    FRAME_RAW_BYTES_MAX,
    Codec,
    Frame,
    FrameError,
    decode_frame,
    encode_frame,
    encode_units,
)
from kevo_repl.wal.codec import (
    MAX_RECORD_PAYLOAD,
    BatchForm,
    Entry,
    Op,
    Unit,
    decode_unit,
    encode_batch,
    encode_entry,
    encode_seed_blob_batch,
)

MiB = 1024 * 1024

# A unit spec: ("single", op, key, value) or ("batch", [(op, key, value), ...]).
UnitSpec = tuple[Any, ...]


def _decode_all(raw: bytes) -> list[Unit]:
    units, pos = [], 0
    while pos < len(raw):
        unit = decode_unit(raw, pos)
        assert unit is not None
        units.append(unit)
        pos += unit.length
    return units


def _units(specs: Sequence[UnitSpec], start: int = 1) -> list[Unit]:
    """Consecutive units as a WAL reader returns them, numbered from `start`."""
    parts, seq = [], start
    for spec in specs:
        if spec[0] == "single":
            _, op, key, value = spec
            parts.append(encode_entry(seq, op, key, b"" if op == Op.DELETE else value))
            seq += 1
        else:
            ops = [(op, k, b"" if op == Op.DELETE else v) for op, k, v in spec[1]]
            parts.append(encode_batch(seq, ops))
            seq += max(len(ops), 1)
    return _decode_all(b"".join(parts))


def _put(seq: int, value: bytes = b"v") -> Unit:
    return _units([("single", Op.PUT, b"k", value)], start=seq)[0]


def _raw_frame(raw: bytes, first: int, last: int, codec: Codec = Codec.NONE) -> Frame:
    """A frame around arbitrary raw bytes, with a correct length and CRC."""
    payload = raw
    if codec == Codec.ZSTD:
        payload = zstandard.ZstdCompressor().compress(raw)
    elif codec == Codec.SNAPPY:
        payload = snappy.compress(raw)
    return Frame(first, last, codec, len(raw), zlib.crc32(raw), payload)


# ---------------------------------------------------------------------------------------------
# Round-trips

ops = st.sampled_from([Op.PUT, Op.DELETE, Op.MERGE])
keys = st.binary(max_size=40)
# Mostly small values; sometimes over 32 KiB so that the entry fragments (FIRST/MIDDLE*/LAST).
values = st.one_of(
    st.binary(max_size=200),
    st.integers(MAX_RECORD_PAYLOAD - 20, 3 * MAX_RECORD_PAYLOAD + 17).map(lambda n: b"x" * n),
)
singles = st.tuples(st.just("single"), ops, keys, values)
batches = st.tuples(st.just("batch"), st.lists(st.tuples(ops, keys, values), max_size=5))
unit_specs = st.lists(st.one_of(singles, batches), min_size=1, max_size=8)
codecs = st.sampled_from(list(Codec))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unit_specs, codecs, st.integers(1, 2**40))
def test_round_trip(specs: list[UnitSpec], codec: Codec, start: int) -> None:
    units = _units(specs, start)
    frame = encode_frame(units, codec)
    assert (frame.first_seq, frame.last_seq) == (units[0].first_seq, units[-1].last_seq)
    assert frame.codec is codec
    assert frame.raw_len == sum(u.length for u in units)
    assert decode_frame(frame) == units


def test_round_trip_covers_fragments_and_batches() -> None:
    units = _units(
        [
            ("single", Op.PUT, b"big", b"y" * (2 * MAX_RECORD_PAYLOAD + 5)),
            ("batch", [(Op.PUT, b"a", b"1"), (Op.DELETE, b"b", b""), (Op.MERGE, b"c", b"3")]),
            ("single", Op.DELETE, b"gone", b""),
        ],
        start=10,
    )
    assert [u.form for u in units] == [BatchForm.SINGLE, BatchForm.SEED_HEADER, BatchForm.SINGLE]
    assert units[0].length > 2 * MAX_RECORD_PAYLOAD  # it really fragmented
    for codec in Codec:
        assert decode_frame(encode_frame(units, codec)) == units


def test_raw_payload_is_the_wal_bytes() -> None:
    raw = encode_entry(7, Op.PUT, b"k", b"v") + encode_batch(8, [(Op.PUT, b"a", b"b")] * 2)
    assert encode_units(_decode_all(raw)) == raw


def test_seed_blob_batch_is_re_encoded_in_format_a() -> None:
    blob = _decode_all(encode_seed_blob_batch(5, [(Op.PUT, b"a", b"1"), (Op.DELETE, b"b", b"")]))
    assert blob[0].form == BatchForm.SEED_BLOB
    (back,) = decode_frame(encode_frame(blob, Codec.ZSTD))
    assert back.form == BatchForm.SEED_HEADER
    assert (back.entries, back.first_seq, back.last_seq) == (blob[0].entries, 5, 6)


def test_empty_batch_takes_one_sequence() -> None:
    units = _units([("batch", []), ("single", Op.PUT, b"k", b"v")], start=3)
    assert [(u.first_seq, u.last_seq) for u in units] == [(3, 3), (4, 4)]
    assert decode_frame(encode_frame(units, Codec.SNAPPY)) == units


def test_threads_share_nothing() -> None:
    units = _units([("single", Op.PUT, b"k%d" % i, b"v" * 500) for i in range(200)])

    def work(level: int) -> bool:
        return all(decode_frame(encode_frame(units, Codec.ZSTD, level)) == units for _ in range(20))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, [1, 3] * 8))


# ---------------------------------------------------------------------------------------------
# Compression


def _json_frame_units() -> list[Unit]:
    """256 KiB of ~100-byte JSON values, as a user table would write them."""
    rnd = random.Random(7)
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
    cities = ["Paris", "Berlin", "Oslo", "Lima", "Quito", "Cairo", "Tokyo", "Delhi"]
    parts, total, seq = [], 0, 1
    while total < 256 * 1024:
        name = rnd.choice(names)
        doc = {
            "id": seq,
            "name": name,
            "email": f"{name}{rnd.randrange(1000)}@example.com",
            "city": rnd.choice(cities),
            "age": rnd.randrange(18, 90),
            "active": rnd.random() < 0.5,
            "ts": 1_700_000_000 + rnd.randrange(10**6),
        }
        value = json.dumps(doc, separators=(",", ":")).encode()
        parts.append(encode_entry(seq, Op.PUT, b"user:%08d" % seq, value))
        total += len(parts[-1])
        seq += 1
    return _decode_all(b"".join(parts))


def test_compression_ratio_on_json_values() -> None:
    units = _json_frame_units()
    values = [len(u.entries[0].value) for u in units]
    assert 95 <= sum(values) / len(values) <= 115
    zstd_frame = encode_frame(units, Codec.ZSTD, zstd_level=1)
    snappy_frame = encode_frame(units, Codec.SNAPPY)
    assert 256 * 1024 <= zstd_frame.raw_len < 260 * 1024
    assert zstd_frame.raw_len / len(zstd_frame.payload) >= 3.3  # target: compressed <= 0.3 raw
    assert len(snappy_frame.payload) < snappy_frame.raw_len
    assert decode_frame(zstd_frame) == units
    assert decode_frame(snappy_frame) == units


# ---------------------------------------------------------------------------------------------
# Bounds


class _Spy:
    def __init__(self, real: Callable[..., Any]) -> None:
        self.real, self.calls = real, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("codec", list(Codec))
def test_raw_len_over_the_limit_is_rejected_before_decompressing(
    codec: Codec, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = encode_frame([_put(1, b"v" * 1000)], codec)
    spy = _Spy(frames._decompress)
    monkeypatch.setattr(frames, "_decompress", spy)
    with pytest.raises(FrameError, match=r"raw length \d+ is outside 1\.\.\d+"):
        decode_frame(frame, raw_bytes_max=frame.raw_len - 1)
    assert spy.calls == 0
    assert decode_frame(frame, raw_bytes_max=frame.raw_len) == [_put(1, b"v" * 1000)]
    assert spy.calls == 1


def test_default_limit_and_zero_raw_len() -> None:
    big = Frame(1, 1, Codec.NONE, FRAME_RAW_BYTES_MAX + 1, 0, b"")
    with pytest.raises(FrameError, match="outside"):
        decode_frame(big)
    with pytest.raises(FrameError, match="outside"):
        decode_frame(Frame(1, 1, Codec.NONE, 0, zlib.crc32(b""), b""))


@pytest.fixture(scope="module")
def zeros_64mib() -> tuple[bytes, bytes]:
    """64 MiB of zeros as one zstd frame, with and without the content size in its header."""
    data = bytes(64 * MiB)
    sized = zstandard.ZstdCompressor(level=1).compress(data)
    unsized = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(data)
    return sized, unsized


def _with_content_size(frame: bytes, size: int) -> bytes:
    """Rewrite a zstd frame header's 4-byte Frame_Content_Size field (RFC 8878 §3.1.1.1)."""
    fhd = frame[4]
    assert fhd >> 6 == 2, "expected a 4-byte content size field"
    pos = 5 + (0 if fhd & 0x20 else 1) + (0, 1, 2, 4)[fhd & 3]
    return frame[:pos] + struct.pack("<I", size) + frame[pos + 4 :]


def _peak_decoding(frame: Frame) -> tuple[str, int]:
    tracemalloc.start()
    try:
        with pytest.raises(FrameError) as caught:
            decode_frame(frame)
        return str(caught.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_zstd_bomb_with_content_size_is_rejected_from_the_header(
    zeros_64mib: tuple[bytes, bytes],
) -> None:
    payload = zeros_64mib[0]
    assert zstandard.frame_content_size(payload) == 64 * MiB
    message, peak = _peak_decoding(Frame(1, 1, Codec.ZSTD, MiB, 0, payload))
    assert "zstd header declares 67108864 bytes" in message
    assert peak < 8 * MiB


def test_zstd_bomb_without_content_size_stops_at_raw_len(
    zeros_64mib: tuple[bytes, bytes],
) -> None:
    payload = zeros_64mib[1]
    assert zstandard.frame_content_size(payload) == -1
    message, peak = _peak_decoding(Frame(1, 1, Codec.ZSTD, MiB, 0, payload))
    assert "does not decompress" in message
    assert peak < 8 * MiB


def test_zstd_bomb_with_lying_content_size_stops_at_raw_len(
    zeros_64mib: tuple[bytes, bytes],
) -> None:
    payload = _with_content_size(zeros_64mib[0], MiB)
    assert zstandard.frame_content_size(payload) == MiB
    message, peak = _peak_decoding(Frame(1, 1, Codec.ZSTD, MiB, 0, payload))
    assert "does not decompress" in message
    assert peak < 8 * MiB


def test_zstd_frame_without_content_size_decodes() -> None:
    units = _units([("single", Op.PUT, b"k", b"v" * 3000)] * 3)
    raw = encode_units(units)
    payload = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    assert zstandard.frame_content_size(payload) == -1
    assert decode_frame(Frame(1, 3, Codec.ZSTD, len(raw), zlib.crc32(raw), payload)) == units


def test_zstd_trailing_bytes_or_second_frame_rejected() -> None:
    frame = encode_frame([_put(1)], Codec.ZSTD)
    for extra in (b"\0", frame.payload):
        bad = dataclasses.replace(frame, payload=frame.payload + extra)
        with pytest.raises(FrameError, match="unused data"):
            decode_frame(bad)


def test_snappy_preamble_mismatch_is_rejected_before_decompressing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frame = encode_frame([_put(1, b"v" * 1000)], Codec.SNAPPY)
    spy = _Spy(snappy.uncompress)
    monkeypatch.setattr(snappy, "uncompress", spy)
    bad = dataclasses.replace(frame, raw_len=frame.raw_len + 1)
    with pytest.raises(FrameError, match=rf"preamble declares {frame.raw_len} bytes"):
        decode_frame(bad)
    # A block declaring 1 GiB behind a frame declaring 1 MiB: refused from the preamble alone.
    bomb = Frame(1, 1, Codec.SNAPPY, MiB, 0, b"\x80\x80\x80\x80\x04" + b"\0" * 16)
    with pytest.raises(FrameError, match=r"preamble declares 1073741824 bytes"):
        decode_frame(bomb)
    assert spy.calls == 0
    assert decode_frame(frame) == [_put(1, b"v" * 1000)]
    assert spy.calls == 1


@pytest.mark.parametrize("payload", [b"", b"\xff\xff", b"\xff\xff\xff\xff\xff\x01"])
def test_snappy_preamble_truncated_or_too_long(payload: bytes) -> None:
    with pytest.raises(FrameError, match="preamble is truncated or over 5 bytes"):
        decode_frame(Frame(1, 1, Codec.SNAPPY, 10, 0, payload))


# ---------------------------------------------------------------------------------------------
# Bad frames


def test_unknown_codec() -> None:
    frame = dataclasses.replace(encode_frame([_put(1)], Codec.NONE), codec=3)  # type: ignore[arg-type]
    with pytest.raises(FrameError, match="unknown codec 3"):
        decode_frame(frame)


@given(st.lists(st.binary(max_size=20_000), max_size=4), st.integers(0, 2**32 - 1))
def test_the_fast_crc_is_zlibs_crc32_chained_or_not(parts: list[bytes], start: int) -> None:
    crc = zlib_crc = start
    for part in parts:
        crc = frames.crc32_ieee(part, crc)
        zlib_crc = zlib.crc32(part, zlib_crc)
        assert frames.crc32_ieee(part) == zlib.crc32(part)
    assert crc == zlib_crc


@pytest.mark.parametrize("codec", list(Codec))
def test_crc_mismatch(codec: Codec) -> None:
    frame = encode_frame([_put(1), _put(2)], codec)
    with pytest.raises(FrameError, match="CRC mismatch"):
        decode_frame(dataclasses.replace(frame, crc32=frame.crc32 ^ 1))


@pytest.mark.parametrize("codec", list(Codec))
def test_truncated_payload(codec: Codec) -> None:
    frame = encode_frame(_units([("single", Op.PUT, b"k", b"v" * 5000)] * 4), codec)
    for cut in (1, len(frame.payload) // 2):
        with pytest.raises(FrameError, match=r"does not decompress|raw, header says"):
            decode_frame(dataclasses.replace(frame, payload=frame.payload[:-cut]))


@pytest.mark.parametrize("codec", list(Codec))
def test_raw_payload_ending_inside_a_unit(codec: Codec) -> None:
    raw = encode_units(_units([("single", Op.PUT, b"k", b"v" * 100)] * 3))
    frame = _raw_frame(raw[:-5], 1, 3, codec)  # consistent length and CRC, partial last unit
    with pytest.raises(FrameError, match=r"raw payload ends inside a unit at offset \d+"):
        decode_frame(frame)


@pytest.mark.parametrize("codec", list(Codec))
def test_garbage_payload(codec: Codec) -> None:
    garbage = random.Random(1).randbytes(300)
    frame = Frame(1, 1, codec, 300, zlib.crc32(garbage), garbage)
    match = "bad unit" if codec == Codec.NONE else r"does not decompress|preamble"
    with pytest.raises(FrameError, match=match):
        decode_frame(frame)


@pytest.mark.parametrize("codec", list(Codec))
def test_non_consecutive_units_rejected(codec: Codec) -> None:
    gap = [_put(1), _put(3)]
    with pytest.raises(InvalidArgumentError, match="starts at sequence 3, expected 2"):
        encode_frame(gap, codec)
    with pytest.raises(FrameError, match="starts at sequence 3, expected 2"):
        decode_frame(_raw_frame(encode_units(gap), 1, 3, codec))
    assert len(decode_frame(_raw_frame(encode_units([_put(1), _put(2)]), 1, 2, codec))) == 2


@pytest.mark.parametrize(("first", "last"), [(2, 5), (1, 4), (0, 5), (1, 6)])
def test_seq_mismatch_with_frame_header(first: int, last: int) -> None:
    frame = encode_frame(_units([("single", Op.PUT, b"k", b"v")] * 5), Codec.ZSTD)
    assert (frame.first_seq, frame.last_seq) == (1, 5)
    bad = dataclasses.replace(frame, first_seq=first, last_seq=last)
    with pytest.raises(FrameError, match=r"units span sequences 1\.\.5"):
        decode_frame(bad)


def test_encode_frame_rejects_bad_arguments() -> None:
    unit = _put(1)
    with pytest.raises(InvalidArgumentError, match="at least one unit"):
        encode_frame([], Codec.ZSTD)
    with pytest.raises(InvalidArgumentError, match="zstd level"):
        encode_frame([unit], Codec.ZSTD, zstd_level=23)
    with pytest.raises(InvalidArgumentError, match="unknown codec"):
        encode_frame([unit], 7)  # type: ignore[arg-type]
    lying = unit._replace(last_seq=2)
    with pytest.raises(InvalidArgumentError, match="does not match its 1 entries"):
        encode_frame([lying], Codec.NONE)
    renumbered = Unit(
        (Entry(1, Op.PUT, b"a"), Entry(3, Op.PUT, b"b")), 0, 0, BatchForm.SEED_HEADER, 1, 2
    )
    with pytest.raises(InvalidArgumentError, match="does not match its 2 entries"):
        encode_frame([renumbered], Codec.NONE)


def test_encode_frame_respects_the_raw_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    unit = _put(1, b"v" * 200)
    monkeypatch.setattr(frames, "FRAME_RAW_BYTES_MAX", unit.length)
    assert encode_frame([unit], Codec.NONE).raw_len == unit.length
    monkeypatch.setattr(frames, "FRAME_RAW_BYTES_MAX", unit.length - 1)
    with pytest.raises(InvalidArgumentError, match=rf"{unit.length} raw bytes is outside"):
        encode_frame([unit], Codec.NONE)


def test_frame_error_is_a_kevo_repl_error() -> None:
    assert issubclass(FrameError, KevoReplError)
    assert [int(c) for c in Codec] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# Fuzz: any frame decodes to units or raises FrameError, nothing else.

_VALID = [encode_frame(_units([("single", Op.PUT, b"k", b"v" * 300)] * 3), c) for c in Codec]


@st.composite
def fuzz_frames(draw: st.DrawFn) -> Frame:
    codec = draw(st.sampled_from([0, 1, 2, 3]))
    if draw(st.booleans()):
        payload = draw(st.binary(max_size=600))
        if draw(st.booleans()):
            payload = b"\x28\xb5\x2f\xfd" + payload  # zstd magic
        raw_len = draw(st.integers(-1, 4 * MiB))
        crc = draw(st.integers(0, 2**32 - 1))
    else:  # a valid frame, damaged
        base = _VALID[draw(st.integers(0, 2))]
        damaged = bytearray(base.payload)
        for _ in range(draw(st.integers(0, 3))):
            damaged[draw(st.integers(0, len(damaged) - 1))] ^= draw(st.integers(1, 255))
        payload = bytes(damaged[: draw(st.integers(0, len(damaged)))])
        raw_len = base.raw_len + draw(st.integers(-2, 2))
        crc = base.crc32 if draw(st.booleans()) else zlib.crc32(payload)
        codec = draw(st.sampled_from([codec, base.codec]))
    return Frame(1, 3, codec, raw_len, crc, payload)  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(fuzz_frames())
def test_fuzz_only_frame_error(frame: Frame) -> None:
    try:
        units = decode_frame(frame, raw_bytes_max=2 * MiB)
    except FrameError:
        return
    assert units and units[0].first_seq == frame.first_seq and units[-1].last_seq == frame.last_seq
