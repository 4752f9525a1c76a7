"""Node benchmark: SDK writes end to end and the store's apply rate, beside the WAL append rate.

    python bench/node_bench.py            # full run (a few minutes)
    python bench/node_bench.py --quick    # smoke run used by the test suite

Targets (issue 3): BatchWrite of 1,000 ops >= 100k entries/s end to end through the python-kevo
SDK; store apply with random keys >= 150k entries/s at 1,000,000 keys. The node runs as a
subprocess (sync mode immediate) on 127.0.0.1, the SDK client in this process.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kevo.client import Client  # noqa: E402
from kevo.models import BatchOperation  # noqa: E402
from kevo.options import ClientOptions  # noqa: E402

from kevo_repl.localnode import free_port, start_node  # noqa: E402
from kevo_repl.store import LmdbStore  # noqa: E402
from kevo_repl.wal import WAL, Entry, Op, SyncMode, WalOptions  # noqa: E402

VALUE = b'{"user": 12345, "event": "click", "page": "/products/42", "ts": 1732500000}'.ljust(
    100, b" "
)


def rate(n: int, fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return n / (time.perf_counter() - started)


def wal_rate(root: str, n: int) -> float:
    with WAL.open(os.path.join(root, "wal-ref"), WalOptions(sync_mode=SyncMode.NONE)) as wal:

        def run() -> None:
            for i in range(n):
                wal.append(Op.PUT, b"user:%016x" % i, VALUE)

        return rate(n, run)


def store_rate(root: str, n: int, ordered: bool) -> float:
    keys = [b"user:%016x" % i for i in range(n)]
    if not ordered:
        random.Random(7).shuffle(keys)
    path = os.path.join(root, f"store-{'ordered' if ordered else 'random'}")
    with LmdbStore.open(path) as store:

        def run() -> None:
            for start in range(0, n, 1000):
                chunk = keys[start : start + 1000]
                entries = [Entry(start + i + 1, Op.PUT, k, VALUE) for i, k in enumerate(chunk)]
                store.apply(entries, start + len(chunk))
            store.checkpoint()

        return rate(n, run)


def sdk_rates(addr: str, puts: int, batches: int) -> dict[str, float]:
    client = Client(ClientOptions(endpoint=addr))
    client.connect()
    out: dict[str, float] = {}

    def single() -> None:
        for i in range(puts):
            client.put(b"single:%08d" % i, VALUE)

    out["single Put (1 client)"] = rate(puts, single)
    for size in (100, 1000):

        def batched(size: int = size) -> None:
            for b in range(batches):
                ops = [
                    BatchOperation(BatchOperation.Type.PUT, b"b%d:%d:%06d" % (size, b, i), VALUE)
                    for i in range(size)
                ]
                client.batch_write(ops)

        out[f"BatchWrite of {size} (1 client)"] = rate(batches * size, batched)
    out["BatchWrite of 1000 (2 clients)"] = two_clients(addr, batches)
    client.close()
    return out


def two_clients(addr: str, batches: int) -> float:
    def work(c: int) -> None:
        client = Client(ClientOptions(endpoint=addr))
        client.connect()
        for b in range(batches // 2):
            ops = [
                BatchOperation(BatchOperation.Type.PUT, b"c%d:%d:%06d" % (c, b, i), VALUE)
                for i in range(1000)
            ]
            client.batch_write(ops)
        client.close()

    def run() -> None:
        threads = [threading.Thread(target=work, args=(c,)) for c in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return rate((batches // 2) * 2 * 1000, run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script runs")
    args = parser.parse_args()
    n_store = 20_000 if args.quick else 1_000_000
    puts, batches = (200, 4) if args.quick else (3000, 100)
    root = tempfile.mkdtemp(prefix="node-bench-")
    try:
        ref = wal_rate(root, min(n_store, 300_000))
        rows = [("WAL append, sync none (reference)", ref)]
        rows.append(("store apply, keys in order", store_rate(root, n_store, ordered=True)))
        random_rate = store_rate(root, n_store, ordered=False)
        rows.append(("store apply, random keys", random_rate))
        addr = f"127.0.0.1:{free_port()}"
        proc = start_node(f"{root}/node", addr)
        try:
            sdk = sdk_rates(addr, puts, batches)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        rows += list(sdk.items())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"node benchmark: {n_store} store keys, {len(VALUE)}-byte values, {os.cpu_count()} CPUs")
    print(f"{'measurement':40} {'entries/s':>12} {'ratio to WAL':>13}")
    for name, value in rows:
        print(f"{name:40} {value:12,.0f} {value / ref:13.3f}")
    batch_best = max(sdk["BatchWrite of 1000 (1 client)"], sdk["BatchWrite of 1000 (2 clients)"])
    print(
        "target BatchWrite of 1000 >= 100k entries/s: "
        + ("PASS" if batch_best >= 100_000 else "FAIL")
    )
    print(f"target store apply random >= 150k/s: {'PASS' if random_rate >= 150_000 else 'FAIL'}")
    if args.quick:
        print("(quick run: sizes too small for the targets to mean anything)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
