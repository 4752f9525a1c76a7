"""`kevo-repl wal dump|verify|repair`: inspect and mend WAL files without opening a node.

Exit codes: 0 clean; 1 a torn tail was found (`wal repair` cuts it); 3 corruption (needs a
person); 4 the directory is in use by a running node (repair only).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from kevo_repl.errors import CorruptionError, KevoReplError, WalLockedError
from kevo_repl.wal.codec import Op, Unit
from kevo_repl.wal.log import lock_directory, repair_segment
from kevo_repl.wal.segment import Outcome, ReadEnd, SegmentReader, gap_reason, list_segments

EXIT_OK = 0
EXIT_TORN = 1
EXIT_CORRUPT = 3
EXIT_IN_USE = 4

_OP_NAMES = {Op.PUT: "put", Op.DELETE: "delete", Op.MERGE: "merge"}


class WalPathError(KevoReplError):
    """PATH is neither a WAL directory nor a WAL file."""


@dataclass(frozen=True, slots=True)
class FileVerdict:
    path: str
    end: ReadEnd
    units: int
    entries: int
    first_seq: int
    last_seq: int


def resolve(path: str) -> tuple[str | None, list[str]]:
    """(directory or None, segment file paths in log order) for a directory or one file."""
    if os.path.isdir(path):
        return path, [os.path.join(path, n) for n in list_segments(path)]
    if os.path.isfile(path):
        return None, [path]
    raise WalPathError(f"{path}: no such WAL directory or file")


def read_units(path: str, verdicts: list[FileVerdict]) -> Iterator[Unit]:
    """Units of one file; appends how the read ended to `verdicts` once it has."""
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = SegmentReader(fd)
        units = entries = 0
        first = last = -1
        try:
            for unit in reader:
                units += 1
                entries += len(unit.entries)
                first = unit.first_seq if first < 0 else first
                last = unit.last_seq
                yield unit
        except OSError as err:
            # A read on the descriptor (EIO, EISDIR) names no file: name it.
            if err.filename is not None:
                raise
            raise OSError(err.errno, err.strerror, path) from err
        assert reader.end is not None
        verdicts.append(FileVerdict(path, reader.end, units, entries, first, last))
    finally:
        os.close(fd)


def dump(path: str, from_seq: int, as_json: bool, out: TextIO) -> int:
    _, files = resolve(path)
    verdicts: list[FileVerdict] = []
    prev_last = -1  # the highest sequence of the files dumped so far
    for file in files:
        for unit in read_units(file, verdicts):
            batch = unit.first_seq if unit.is_batch else None
            for entry in unit.entries:
                if entry.seq >= from_seq:
                    out.write(_format(entry.seq, entry.op, entry.key, entry.value, batch, as_json))
        v = verdicts[-1]
        if v.end.outcome is not Outcome.CLEAN or _gap(prev_last, v):
            break
        prev_last = _last_so_far(prev_last, v)
    return _outcome(verdicts, files)


def _format(seq: int, op: Op, key: bytes, value: bytes, batch: int | None, as_json: bool) -> str:
    name = _OP_NAMES[op]
    k = key.decode("utf-8", "backslashreplace")
    v = value.decode("utf-8", "backslashreplace")
    if as_json:
        obj: dict[str, object] = {"seq": seq, "op": name, "key": k}
        if op != Op.DELETE:
            obj["value"] = v
        obj["batch"] = batch
        return json.dumps(obj, ensure_ascii=False) + "\n"
    tail = "" if op == Op.DELETE else f" {v!r}"
    in_batch = f" [batch {batch}]" if batch is not None else ""
    return f"{seq} {name} {k!r}{tail}{in_batch}\n"


def verify(path: str, out: TextIO) -> int:
    _, files = resolve(path)
    verdicts: list[FileVerdict] = []
    prev_last = -1
    for file in files:
        for _ in read_units(file, verdicts):
            pass
        v = verdicts[-1]
        out.write(
            f"{v.path}: {v.end.outcome.value}, {v.units} units, {v.entries} entries, "
            f"seq {v.first_seq}..{v.last_seq}\n"
        )
        if 0 <= v.first_seq < prev_last:
            out.write(f"{v.path}: note: sequence numbers restart below {prev_last} (Kevo-style)\n")
        prev_last = max(prev_last, v.last_seq)
    return _outcome(verdicts, files)


def _outcome(verdicts: list[FileVerdict], files: list[str]) -> int:
    """The exit code: damage inside a file first, then sequences missing between files."""
    code = _report_problem(verdicts, files)
    gap = _first_gap(verdicts)
    if code == EXIT_OK and gap:
        print(gap, file=sys.stderr)
        return EXIT_CORRUPT
    return code


def _first_gap(verdicts: list[FileVerdict]) -> str:
    """A file starting past where the files before it ended (a lower start is Kevo's restart
    of the numbers at rotation, not damage)."""
    prev_last = -1
    for v in verdicts:
        if gap := _gap(prev_last, v):
            return gap
        prev_last = _last_so_far(prev_last, v)
    return ""


def _gap(prev_last: int, v: FileVerdict) -> str:
    """The gap before file `v`, given the highest sequence of the files before it."""
    if v.units and prev_last >= 0 and v.first_seq > prev_last + 1:
        return f"{v.path}: corruption: {gap_reason(prev_last, v.first_seq)}"
    return ""


def _last_so_far(prev_last: int, v: FileVerdict) -> int:
    return max(prev_last, v.last_seq) if v.units else prev_last


def _report_problem(verdicts: list[FileVerdict], files: list[str]) -> int:
    for v in verdicts:
        end = v.end
        if end.outcome is Outcome.CLEAN:
            continue
        # A torn tail is only a crash artefact in the newest file; anywhere else it is damage.
        torn_here = end.outcome is Outcome.TORN and v.path == files[-1]
        kind = "torn tail" if torn_here else "corruption"
        print(f"{v.path}: {kind} at offset {end.bad_offset}: {end.reason}", file=sys.stderr)
        return EXIT_TORN if torn_here else EXIT_CORRUPT
    return EXIT_OK


def repair(path: str, out: TextIO) -> int:
    directory, files = resolve(path)
    lock_dir = directory or os.path.dirname(os.path.abspath(path))
    try:
        lock_fd = lock_directory(lock_dir) if directory or _has_lock(lock_dir) else -1
    except WalLockedError as err:
        print(f"error: {err}; stop the node first", file=sys.stderr)
        return EXIT_IN_USE
    try:
        return _repair_files(files, out)
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)


def _has_lock(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, "LOCK"))


def _repair_files(files: list[str], out: TextIO) -> int:
    if not files:
        out.write("nothing to repair: no WAL files\n")
        return EXIT_OK
    verdicts: list[FileVerdict] = []
    for file in files[:-1]:
        for _ in read_units(file, verdicts):
            pass
        if verdicts[-1].end.outcome is not Outcome.CLEAN:
            return _report_problem(verdicts, [*files[:-1], "<not the last file>"])
    try:
        torn = repair_segment(files[-1])
    except CorruptionError as err:
        print(f"error: {err}; not repairable automatically", file=sys.stderr)
        return EXIT_CORRUPT
    if torn is None:
        out.write(f"{files[-1]}: clean, nothing to repair\n")
    else:
        out.write(
            f"{torn.path}: cut a torn tail of {torn.bytes_cut} bytes at offset {torn.offset} "
            f"({torn.reason}); the cut bytes are kept in {torn.kept_at}\n"
        )
    return EXIT_OK
