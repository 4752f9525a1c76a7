"""Kevo-compatible write-ahead log."""

from kevo_repl.wal.codec import BatchForm, CodecError, Entry, Op, Unit
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
