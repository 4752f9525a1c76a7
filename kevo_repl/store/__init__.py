"""The applied key/value state of a node: the Store protocol and its implementations."""

from kevo_repl.store.base import (
    MAX_KEY_BYTES,
    Store,
    StoreClosedError,
    StoreError,
    StoreLockedError,
    StoreStats,
)
from kevo_repl.store.lmdb_store import DEFAULT_MAP_SIZE_BYTES, LmdbStore
from kevo_repl.store.memory import MemoryStore

__all__ = [
    "DEFAULT_MAP_SIZE_BYTES",
    "MAX_KEY_BYTES",
    "LmdbStore",
    "MemoryStore",
    "Store",
    "StoreClosedError",
    "StoreError",
    "StoreLockedError",
    "StoreStats",
]
