"""Kevo-compatible write-ahead log.

The log itself (`kevo_repl.wal.log`: files, threads, asyncio) is imported on first use of one of
its names, so the pure modules under this package (codec, tail) and the pure cores that use them
(repl/frames.py, repl/replica_state.py) can be imported without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kevo_repl.wal.codec import BatchForm, CodecError, Entry, Op, Unit

if TYPE_CHECKING:
    from kevo_repl.wal.log import (
        WAL,
        RecoveryReport,
        RetentionPolicy,
        SyncMode,
        TornTail,
        WalOptions,
        repair_segment,
    )
    from kevo_repl.wal.observer import WalObserver

_LAZY = {
    "WAL": "log",
    "RecoveryReport": "log",
    "RetentionPolicy": "log",
    "SyncMode": "log",
    "TornTail": "log",
    "WalOptions": "log",
    "repair_segment": "log",
    "WalObserver": "observer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "WAL",
    "BatchForm",
    "CodecError",
    "Entry",
    "Op",
    "RecoveryReport",
    "RetentionPolicy",
    "SyncMode",
    "TornTail",
    "Unit",
    "WalObserver",
    "WalOptions",
    "repair_segment",
]
