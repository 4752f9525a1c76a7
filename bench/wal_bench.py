"""WAL benchmark: every rate beside the raw encode rate measured in the same run.

    python bench/wal_bench.py            # full run (about a minute)
    python bench/wal_bench.py --quick    # smoke run used by the test suite

Targets (issue 2, 100-byte values): sync none >= 400k appends/s; immediate with 16 concurrent
writers >= 5x immediate with one; entries_from >= 400k entries/s. The machine is shared and noisy:
compare the ratios, which move less than the absolute rates.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kevo_repl.wal import WAL, Op, SyncMode, WalOptions
from kevo_repl.wal.codec import encode_entry

VALUE = b'{"user": 12345, "event": "click", "page": "/products/42", "ts": 1732500000}xxxxxxxx'[:100]
VALUE = VALUE.ljust(100, b"x")


def key(i: int) -> bytes:
    return b"user:%08d" % i


def rate(n: int, fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return n / (time.perf_counter() - started)


def bench_encode(n: int) -> float:
    def run() -> None:
        for i in range(n):
            encode_entry(i + 1, Op.PUT, key(i), VALUE)

    return rate(n, run)


def bench_append(root: str, mode: SyncMode, n: int) -> float:
    with WAL.open(os.path.join(root, f"append-{mode.value}"), WalOptions(sync_mode=mode)) as wal:

        def run() -> None:
            append = wal.append
            for i in range(n):
                append(Op.PUT, key(i), VALUE)

        return rate(n, run)


def bench_threads(root: str, writers: int, each: int) -> float:
    path = os.path.join(root, f"threads-{writers}")
    with WAL.open(path, WalOptions(sync_mode=SyncMode.IMMEDIATE)) as wal:

        def writer(w: int) -> None:
            for i in range(each):
                wal.append(Op.PUT, key(w * each + i), VALUE)

        def run() -> None:
            threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        return rate(writers * each, run)


def bench_tasks(root: str, tasks: int, each: int) -> float:
    path = os.path.join(root, f"tasks-{tasks}")
    with WAL.open(path, WalOptions(sync_mode=SyncMode.IMMEDIATE)) as wal:

        async def writer(w: int) -> None:
            for i in range(each):
                await wal.append_async(Op.PUT, key(w * each + i), VALUE)

        async def main() -> None:
            await asyncio.gather(*(writer(w) for w in range(tasks)))

        return rate(tasks * each, lambda: asyncio.run(main()))


def bench_entries_from(root: str, n: int) -> float:
    path = os.path.join(root, "read")
    with WAL.open(path, WalOptions(sync_mode=SyncMode.NONE)) as wal:
        for i in range(n):
            wal.append(Op.PUT, key(i), VALUE)
        wal.sync()
    with WAL.open(path, WalOptions(sync_mode=SyncMode.NONE)) as wal:  # closed segments, cold index

        def run() -> None:
            count = sum(1 for _ in wal.entries_from(1))
            assert count == n, count

        return rate(n, run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script runs")
    parser.add_argument("--dir", help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    n = 5_000 if args.quick else 500_000
    each = 20 if args.quick else 300
    root = tempfile.mkdtemp(prefix="wal-bench-", dir=args.dir)
    try:
        return report(root, n, each, args.quick)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(root: str, n: int, each: int, quick: bool) -> int:
    encode = bench_encode(n)
    rows = [("raw encode (reference)", encode)]
    none = bench_append(root, SyncMode.NONE, n)
    rows.append(("append, sync none", none))
    rows.append(("append, sync batch", bench_append(root, SyncMode.BATCH, n)))
    t1 = bench_threads(root, 1, each * 4)
    t16 = bench_threads(root, 16, each)
    a1 = bench_tasks(root, 1, each * 4)
    a16 = bench_tasks(root, 16, each)
    rows += [
        ("immediate, 1 thread", t1),
        ("immediate, 16 threads", t16),
        ("immediate, 1 asyncio task", a1),
        ("immediate, 16 asyncio tasks", a16),
    ]
    read = bench_entries_from(root, n)
    rows.append(("entries_from (cold, from seq 1)", read))
    print(f"WAL benchmark: {n} entries of {len(VALUE)}-byte values, {os.cpu_count()} CPUs")
    print(f"{'measurement':36} {'entries/s':>12} {'ratio to encode':>16}")
    for name, value in rows:
        print(f"{name:36} {value:12,.0f} {value / encode:16.3f}")
    group = max(t16, a16) / max(t1, a1)
    print(
        f"group commit: 16 writers / 1 writer = {group:.1f}x "
        f"(threads {t16 / t1:.1f}x, tasks {a16 / a1:.1f}x)"
    )
    checks = [
        ("sync none >= 400k appends/s", none >= 400_000),
        ("immediate 16 writers >= 5x one writer", group >= 5),
        ("entries_from >= 400k entries/s", read >= 400_000),
    ]
    for name, ok in checks:
        print(f"target {name}: {'PASS' if ok else 'FAIL'}")
    if quick:
        print("(quick run: sizes too small for the targets to mean anything)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
