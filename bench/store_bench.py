"""Store choice benchmark: SQLite (stdlib) against LmdbStore, measured in the same run.

    python bench/store_bench.py            # full run: 1,000,000 upserts per store (about a minute)
    python bench/store_bench.py --quick    # smoke run used by the test suite

The workload (issue text): upserts of ~100-byte JSON-like values at 1,000 rows per transaction, each
transaction also recording the applied sequence, as a node's apply loop does. Random-order keys
(b"user:%016x" of a random u64, so nearly all are new keys) are the normal case; in-order keys are
the best case for a B-tree. Only the apply calls are timed, not building the rows. The target: the
store applies random keys at >= 150k rows/s without an fsync per transaction.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kevo_repl.store import LmdbStore
from kevo_repl.wal.codec import Entry, Op

ROWS_PER_TXN = 1000
TARGET_ROWS_PER_S = 150_000
Batch = list[tuple[bytes, bytes]]

SQLITE_UPSERT = "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
SQLITE_REPLACE = "INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)"


def value(i: int) -> bytes:
    raw = b'{"id":%d,"name":"user-%d","email":"u%d@example.com","plan":"pro","score":%d}' % (
        i,
        i,
        i,
        i % 1000,
    )
    return raw.ljust(100, b" ")


def batches(rows: int, in_order: bool, seed: int = 1) -> Iterator[Batch]:
    rng = random.Random(seed)
    for start in range(0, rows, ROWS_PER_TXN):
        ids = range(start, min(start + ROWS_PER_TXN, rows))
        yield [(b"user:%016x" % (i if in_order else rng.getrandbits(64)), value(i)) for i in ids]


def timed(rows: int, in_order: bool, apply: Callable[[Batch, int], None]) -> float:
    """rows/s of `apply(batch, last_seq)` over all batches, timing only the apply calls."""
    spent = 0.0
    seq = 0
    for batch in batches(rows, in_order):
        seq += len(batch)
        started = time.perf_counter()
        apply(batch, seq)
        spent += time.perf_counter() - started
    return rows / spent


def bench_sqlite(root: str, name: str, statement: str, rows: int, in_order: bool) -> float:
    conn = sqlite3.connect(os.path.join(root, f"{name}.sqlite"), isolation_level=None)
    try:
        for pragma in (
            "journal_mode=WAL",
            "synchronous=NORMAL",
            "cache_size=-524288",  # 512 MiB: the whole working set stays cached
            "temp_store=MEMORY",
            # Checkpoint every 100k pages instead of 1k: random keys dirty a page per row, and the
            # default made the full run 2.6x slower (25k rows/s against 67k).
            "wal_autocheckpoint=100000",
        ):
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
        conn.execute("CREATE TABLE meta (id INTEGER PRIMARY KEY, applied_seq INTEGER NOT NULL)")
        conn.execute("INSERT INTO meta VALUES (1, 0)")

        def apply(batch: Batch, seq: int) -> None:
            conn.execute("BEGIN")
            conn.executemany(statement, batch)
            conn.execute("UPDATE meta SET applied_seq = ? WHERE id = 1", (seq,))
            conn.execute("COMMIT")

        return timed(rows, in_order, apply)
    finally:
        conn.close()


def bench_lmdb(root: str, name: str, rows: int, in_order: bool, sync_each_txn: bool) -> float:
    with LmdbStore.open(os.path.join(root, name), sync_each_txn=sync_each_txn) as store:

        def apply(batch: Batch, seq: int) -> None:
            first = seq - len(batch) + 1
            entries = [Entry(first + i, Op.PUT, k, v) for i, (k, v) in enumerate(batch)]
            store.apply(entries, seq)

        rate = timed(rows, in_order, apply)
        assert store.stats().key_count == rows, store.stats()
        return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script runs")
    parser.add_argument("--dir", help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    rows = 20_000 if args.quick else 1_000_000
    synced_rows = 5_000 if args.quick else 200_000
    root = tempfile.mkdtemp(prefix="store-bench-", dir=args.dir)
    try:
        return report(root, rows, synced_rows, args.quick)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure(root: str, rows: int, synced_rows: int) -> list[tuple[str, int, float]]:
    upsert = bench_sqlite(root, "upsert-random", SQLITE_UPSERT, rows, in_order=False)
    replace = bench_sqlite(root, "replace-random", SQLITE_REPLACE, rows, in_order=False)
    best = SQLITE_UPSERT if upsert >= replace else SQLITE_REPLACE
    best_name = "ON CONFLICT DO UPDATE" if upsert >= replace else "INSERT OR REPLACE"
    return [
        ("SQLite ON CONFLICT DO UPDATE, random", rows, upsert),
        ("SQLite INSERT OR REPLACE, random", rows, replace),
        (f"SQLite {best_name}, in order", rows, bench_sqlite(root, "seq", best, rows, True)),
        ("LmdbStore, random", rows, bench_lmdb(root, "lmdb-random", rows, False, False)),
        ("LmdbStore, in order", rows, bench_lmdb(root, "lmdb-seq", rows, True, False)),
        (
            "LmdbStore sync_each_txn, random",
            synced_rows,
            bench_lmdb(root, "lmdb-sync", synced_rows, False, True),
        ),
    ]


def report(root: str, rows: int, synced_rows: int, quick: bool) -> int:
    results = measure(root, rows, synced_rows)
    print(
        f"Store benchmark: ~100-byte values, {ROWS_PER_TXN} rows per transaction, "
        f"{os.cpu_count()} CPUs, sqlite {sqlite3.sqlite_version}"
    )
    print(f"{'measurement':38} {'rows':>10} {'rows/s':>12}")
    for name, n, rate in results:
        print(f"{name:38} {n:10,} {rate:12,.0f}")
    rates = {name: rate for name, _, rate in results}
    lmdb_random = rates.pop("LmdbStore, random")
    rates.pop("LmdbStore sync_each_txn, random")
    sqlite_random = max(rate for name, rate in rates.items() if name.endswith("random"))
    print(f"LmdbStore random / best SQLite random = {lmdb_random / sqlite_random:.2f}x")
    verdict = "PASS" if lmdb_random >= TARGET_ROWS_PER_S else "FAIL"
    print(f"target store apply random >= {TARGET_ROWS_PER_S // 1000}k/s: {verdict}")
    if quick:
        print("(quick run: sizes too small for the target to mean anything)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
