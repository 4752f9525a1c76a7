"""Log histories: which log a sequence number belongs to.

Sequence numbers alone cannot tell two logs apart: a primary rebuilt from empty, or another node
promoted, numbers its entries from the same range again. So every log has a history: the ids of
the lines of writes it is made of, each with the first sequence written under it (PostgreSQL's
timelines). A position is (history id, sequence); it is on a history when the entry covering
that sequence carries that id.

A primary's first start creates a history ``[(id, 1)]``. A replica adopts its primary's history
and, on every connect, says under which id it holds its last entry: a primary on whose history
that position does not lie refuses to stream (the replica would otherwise apply entries onto a
store that diverged). Pure: the file is read and written by `kevo_repl/repl/state_files.py`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class History:
    entries: tuple[tuple[str, int], ...]  # (id, first sequence under it), oldest first

    @classmethod
    def new(cls) -> History:
        return cls(((uuid.uuid4().hex, 1),))

    @property
    def current(self) -> str:
        return self.entries[-1][0] if self.entries else ""

    def id_at(self, seq: int) -> str | None:
        """The id under which `seq` was written, None before the first entry's start."""
        found = None
        for ident, start in self.entries:
            if start <= seq:
                found = ident
        return found

    def contains(self, ident: str, seq: int) -> bool:
        """Is position (ident, seq) on this history? Sequence 0 (nothing held) always is."""
        return seq == 0 or self.id_at(seq) == ident

    def to_json(self) -> str:
        return json.dumps({"version": FORMAT_VERSION, "entries": [list(e) for e in self.entries]})

    @classmethod
    def from_json(cls, text: str) -> History:
        """Raises ValueError for anything but a well-formed history."""
        try:
            obj = json.loads(text)
            if not isinstance(obj, dict) or obj.get("version") != FORMAT_VERSION:
                raise ValueError("not a history (unknown version)")
            entries = tuple((str(i), int(s)) for i, s in obj["entries"])
        except (KeyError, TypeError, OverflowError, RecursionError) as err:
            # OverflowError: a start of Infinity; RecursionError: JSON nested too deep. The text
            # comes from a peer or a file: every way it can be wrong is the one ValueError.
            raise ValueError(f"not a history: {type(err).__name__}: {err}") from None
        starts = [s for _, s in entries]
        if not entries or starts[0] != 1 or starts != sorted(set(starts)):
            raise ValueError(f"history entries out of order: {entries!r}")
        return cls(entries)


def fork(history: History | None, start: int) -> History:
    """`history` with a new line of writes from `start` on (a promoted replica's log). Lines
    that start at or after `start` had no writes kept: they are replaced. With no history at
    all, the new line covers everything from 1."""
    fresh = History.new().current
    if history is None:
        return History(((fresh, 1),))
    kept = tuple((ident, first) for ident, first in history.entries if first < start)
    return History((*kept, (fresh, start)) if kept else ((fresh, 1),))
