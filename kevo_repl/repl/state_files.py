"""The small files a node keeps beside its WAL and store: NODE_ID, HISTORY and slots.json.

One way to read them and one to write them: a missing file is None (the caller creates what it
needs), anything unreadable is a `StateFileError` naming the file and, for bad JSON, the
offset; writes replace the file atomically and durably (fsutil.atomic_write). The formats
themselves live in pure modules (history.py, slots.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import TypeVar

from kevo_repl import fsutil
from kevo_repl.errors import StateFileError
from kevo_repl.repl.history import History
from kevo_repl.repl.slots import SlotTable, decode_slots, encode_slots

T = TypeVar("T")


def read_state(path: str, parse: Callable[[bytes], T], what: str) -> T | None:
    """`parse` of the file's bytes; None when there is no file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StateFileError(path, 0, f"cannot read it: {err.strerror}") from None
    try:
        return parse(data)
    except json.JSONDecodeError as err:
        raise StateFileError(path, err.pos, f"not valid JSON: {err.msg}") from None
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as err:
        # ValueError includes UnicodeError; OverflowError: a number too large (1e400 -> inf,
        # then int()); RecursionError: JSON nested too deep
        raise StateFileError(path, 0, f"not {what}: {err}") from None


def write_state(path: str, data: bytes) -> None:
    try:
        fsutil.atomic_write(path, data)
    except OSError as err:
        raise StateFileError(path, 0, f"cannot write it: {err.strerror}") from None


def load_slots(path: str) -> SlotTable:
    return read_state(path, decode_slots, "a slot table") or SlotTable()


def save_slots(path: str, table: SlotTable) -> None:
    write_state(path, encode_slots(table))
    table.dirty = False


def load_history(path: str) -> History | None:
    return read_state(path, lambda data: History.from_json(data.decode()), "a history file")


def save_history(path: str, history: History) -> None:
    write_state(path, history.to_json().encode() + b"\n")


def load_or_create_history(path: str) -> History:
    """A primary's log history, created at its first start."""
    history = load_history(path)
    if history is None:
        history = History.new()
        save_history(path, history)
    return history


def load_or_create_node_id(path: str) -> str:
    """This node's durable identity (replicas send it to primaries, who key slots by it)."""
    ident = read_state(path, _node_id, "a node id")
    if ident is None:
        ident = uuid.uuid4().hex
        write_state(path, ident.encode() + b"\n")
    return ident


def _node_id(data: bytes) -> str:
    ident = data.decode("ascii").strip()
    if not ident or not ident.isprintable() or " " in ident:
        raise ValueError(f"{ident!r} is not a node id")
    return ident
