"""The names inside a node's data directory, in one place (the node, bootstrap and promotion
all find their files by them)::

    LOCK                 flock'd while a node runs on the directory
    store/               the store (LMDB)
    wal/                 the WAL segments
    HISTORY              the log's history (kevo_repl/repl/history.py)
    NODE_ID              a replica's identity, which its primary keys its slot by
    slots.json           a primary's replication slots
    PROMOTED             written when a replica was promoted: it stays a primary
    bootstrap.partial/   a snapshot being received (kevo_repl/repl/bootstrap.py)
    bootstrap.ready/     a received snapshot the node switches to
"""

from __future__ import annotations

import os

STORE = "store"
WAL = "wal"
HISTORY = "HISTORY"
NODE_ID = "NODE_ID"
SLOTS = "slots.json"
PROMOTED = "PROMOTED"
BOOTSTRAP_PARTIAL = "bootstrap.partial"
BOOTSTRAP_READY = "bootstrap.ready"


def path(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, name)
