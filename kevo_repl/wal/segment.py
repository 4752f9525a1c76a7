"""Segment files: naming, and reading units from one file with three outcomes kept apart.

A segment is a Kevo WAL file: records end to end, no header, named ``%020d.wal`` after its creation
time in Unix nanoseconds so that Kevo's sorted glob sees our files in order.

Reading a segment ends in exactly one of:

* clean end: the file ends at a unit boundary;
* torn tail: the file ends inside a unit, or its last record is damaged and followed by nothing but
  zero bytes (what a crash mid-append leaves; only the last segment may be repaired this way);
* corruption: a damaged record with real data after it. That needs a person, never a silent skip.
"""

from __future__ import annotations

import enum
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from kevo_repl.wal.codec import CodecError, Unit, decode_unit, scan_unit

SEGMENT_RE = re.compile(r"^(\d{20})\.wal$")
READ_CHUNK_BYTES = 1024 * 1024


def gap_reason(prev_last: int, first: int) -> str:
    """Why a segment starting past where the one before ended is damage: a file lost or cut
    short at a unit boundary, which nothing inside either file shows."""
    return (
        f"starts at sequence {first} but the segment before ends at {prev_last}: "
        f"sequences {prev_last + 1}..{first - 1} are missing"
    )


def segment_name(stamp_ns: int) -> str:
    return f"{stamp_ns:020d}.wal"


def list_segments(directory: str) -> list[str]:
    """Segment file names (not paths) in log order.

    Only regular files (or links to them) count: a directory or a FIFO named like a segment is
    not one, and reading it would fail without naming it (or block). An entry that cannot be
    looked at (a dangling link) is kept, so that opening it reports the problem with its path.
    """
    return scan_directory(directory)[0]


def scan_directory(directory: str) -> tuple[list[str], list[str]]:
    """(`list_segments`, names of leftover `*.wal.tmp` files) from one listing of `directory`."""
    segments: list[str] = []
    strays: list[str] = []
    with os.scandir(directory) as it:
        for entry in it:
            name = entry.name
            if SEGMENT_RE.match(name):
                if _is_regular(entry):
                    segments.append(name)
            elif name.endswith(".wal.tmp") and _is_regular(entry):
                strays.append(name)
    segments.sort()
    return segments, strays


def _is_regular(entry: os.DirEntry[str]) -> bool:
    try:
        return stat.S_ISREG(entry.stat().st_mode)
    except OSError:
        return True


class Outcome(enum.Enum):
    CLEAN = "clean"
    TORN = "torn"
    CORRUPT = "corrupt"


@dataclass(frozen=True, slots=True)
class ReadEnd:
    """How a read of one segment ended: `offset` is the end of the last good unit."""

    outcome: Outcome
    offset: int
    reason: str = ""
    bad_offset: int = -1  # where the damage starts (corrupt or torn), -1 when clean


class SegmentReader:
    """Reads units from one open file between `start` and `limit`, in chunks.

    Iterate to get units; afterwards `end` says how the read ended. The reader never raises for bad
    bytes: the caller decides what a torn tail or corruption means where it is.
    """

    def __init__(
        self,
        fd: int,
        start: int = 0,
        limit: int | None = None,
        keep_raw: bool = False,
        light: bool = False,
    ) -> None:
        self._fd = fd
        self._keep_raw = keep_raw or light
        self._light = light  # single-entry units without their Entry (`scan_unit`)
        self._pos = start
        self._limit = os.fstat(fd).st_size if limit is None else limit
        self.end: ReadEnd | None = None

    def __iter__(self) -> Iterator[Unit]:
        buf = b""
        base = self._pos  # file offset of buf[0]
        at = 0
        while True:
            try:
                if self._light:
                    unit = scan_unit(buf, at, base)
                else:
                    unit = decode_unit(buf, at, base, self._keep_raw)
            except CodecError as err:
                self.end = self._classify(err, base + at, base)
                return
            if unit is not None:
                at += unit.length
                yield unit
                continue
            more = self._read(base + len(buf), max(READ_CHUNK_BYTES, len(buf) - at))
            if not more:
                self.end = self._finish(buf, at, base)
                return
            buf = buf[at:] + more
            base += at
            at = 0

    def _read(self, offset: int, size: int) -> bytes:
        size = min(size, self._limit - offset)
        return os.pread(self._fd, size, offset) if size > 0 else b""

    def _finish(self, buf: bytes, at: int, base: int) -> ReadEnd:
        if at == len(buf):
            return ReadEnd(Outcome.CLEAN, base + at)
        if buf.count(0, at) == len(buf) - at:
            return ReadEnd(Outcome.TORN, base + at, "zero bytes after the last unit", base + at)
        return ReadEnd(Outcome.TORN, base + at, "file ends inside a unit", base + at)

    def _classify(self, err: CodecError, unit_start: int, base: int) -> ReadEnd:
        """A damaged record is a torn tail only when nothing but zeros follows it."""
        if self._only_zeros_from(base + err.end):
            return ReadEnd(Outcome.TORN, unit_start, err.reason, base + err.offset)
        return ReadEnd(Outcome.CORRUPT, unit_start, err.reason, base + err.offset)

    def _only_zeros_from(self, offset: int) -> bool:
        pos = offset
        while pos < self._limit:
            chunk = self._read(pos, READ_CHUNK_BYTES)
            if chunk.count(0) != len(chunk):
                return False
            pos += len(chunk)
        return True
