"""Fan-out benchmark: the primary's write throughput with 0, 1 and 4 replicas attached.

    python bench/fanout_bench.py            # full run (5 runs of 8 s per configuration)
    python bench/fanout_bench.py --quick    # smoke run used by the test suite
    python bench/fanout_bench.py --share-cpus   # no CPU pinning

In one run, with real node processes on 127.0.0.1: three primaries (sync mode immediate), one
per configuration, with 0, 1 and 4 replicas (`kevo-repl serve --role replica --primary ...`)
started before any measurement and streaming. Each run is the same load: 4 client threads, each
on its own connection, sending BatchWrites of 500 entries of ~100-byte values (requests built
and serialized before the clock starts; each thread cycles through its own keys, so later
batches overwrite earlier keys) for a fixed time. The configurations take turns, in a rotating
order, a few runs each, and the medians are compared. After every run the bench waits until
each replica has applied the primary's last sequence and the primary reports it streaming:
the next run starts from quiet, and the replicas are shown to keep up.

The target is about what serving replicas costs the primary. A replica on a real deployment
runs on its own machine; here all processes share the machine's CPUs, and on 2 CPUs four
replicas applying what the primary writes need about a whole CPU, which the primary would lose
whatever replication did. So by default the primary and the client run on the first CPU and the
replicas on the others, in every configuration (sched_setaffinity, set before each process
starts): the 0-replica primary gets the same one CPU. The replicas still share the disk, the
page cache and the memory bus with the primary. On one shared CPU the four replicas cannot keep
up with the primary and fall behind during a run; the primary then serves them from its
segments, which is part of the cost measured. `--share-cpus` runs everything on every CPU
(the competition for CPU is then part of the figure); the CPU each side used is printed beside
the rates either way.

Target: 4 replicas cost <= 15 % of the primary's throughput with none (1 - rate4 / rate0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from replication_bench import status, stop_all, value  # noqa: E402

from kevo_repl.localnode import free_port, start_node  # noqa: E402
from kevo_repl.proto import service_pb2 as pb  # noqa: E402

CONFIGS = (0, 1, 4)
CLIENTS = 4
BATCH_WRITE = "/kevo.KevoService/BatchWrite"
TICKS = os.sysconf("SC_CLK_TCK")


def requests_for(client: int, count: int, batch: int) -> list[bytes]:
    """`count` serialized BatchWriteRequests of `batch` entries, keys unique to `client`."""
    out = []
    for r in range(count):
        ops = [
            pb.Operation(
                type=pb.Operation.PUT, key=b"fan:%d:%09d" % (client, r * batch + j), value=value(j)
            )
            for j in range(batch)
        ]
        out.append(pb.BatchWriteRequest(operations=ops).SerializeToString())
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class Cluster:
    replicas: int
    primary: str
    primary_proc: subprocess.Popen[bytes]
    replica_addrs: list[str] = field(default_factory=list)
    replica_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def procs(self) -> list[subprocess.Popen[bytes]]:
        return [self.primary_proc, *self.replica_procs]

    def wait_streaming(self, timeout_s: float = 60) -> None:
        """Until the primary reports every replica connected and streaming."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = [r for r in status(self.primary).replicas if r.connected]
            if len(got) == self.replicas and all(r.state == "streaming" for r in got):
                return
            if time.monotonic() > deadline:
                states = [(r.node_id, r.state, r.connected) for r in status(self.primary).replicas]
                raise RuntimeError(f"replicas of {self.primary} not all streaming: {states}")
            time.sleep(0.05)

    def wait_caught_up(self, timeout_s: float = 600) -> float:
        """Seconds until every replica has applied the primary's last sequence, then streaming."""
        started = time.perf_counter()
        target = status(self.primary).last_sequence
        for addr in self.replica_addrs:
            while status(addr).applied_sequence < target:
                if time.perf_counter() - started > timeout_s:
                    raise RuntimeError(f"replica {addr} did not catch up within {timeout_s} s")
                time.sleep(0.02)
        took = time.perf_counter() - started
        self.wait_streaming()
        return took


def start_cluster(
    root: str, replicas: int, pool: ThreadPoolExecutor, pin: Pinning | None
) -> Cluster:
    primary = f"127.0.0.1:{free_port()}"
    proc = start_node(
        os.path.join(root, f"p{replicas}"),
        primary,
        "--role",
        "primary",
        "--sync-mode",
        "immediate",
        cpus=pin.primary if pin else None,
    )
    cluster = Cluster(replicas, primary, proc)
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(replicas)]

    def start_replica(i: int) -> subprocess.Popen[bytes]:
        data = os.path.join(root, f"p{replicas}-r{i}")
        return start_node(
            data,
            addrs[i],
            "--role",
            "replica",
            "--primary",
            primary,
            cpus=pin.replicas if pin else None,
        )

    try:
        cluster.replica_procs = list(pool.map(start_replica, range(replicas)))
    except BaseException:
        stop_all([proc])
        raise
    cluster.replica_addrs = addrs
    return cluster


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the primary (with the client) and the replicas may use."""

    primary: frozenset[int]
    replicas: frozenset[int]


def pinning(share: bool) -> Pinning | None:
    """The primary and the client on the first CPU we may use, the replicas on the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    if share or len(cpus) < 2:
        return None
    return Pinning(frozenset(cpus[:1]), frozenset(cpus[1:]))


@dataclass
class Measured:
    rate: float  # entries/s acknowledged by the primary
    cpu_primary: float  # cores: CPU seconds per second of the run
    cpu_replicas: float
    cpu_client: float
    catchup_s: float  # from the load's end to every replica applied


def load(cluster: Cluster, pools: list[list[bytes]], batch: int, seconds: float) -> Measured:
    counts = [0] * len(pools)
    barrier = threading.Barrier(len(pools) + 1, timeout=120)

    def client(c: int) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
        with grpc.insecure_channel(cluster.primary, options=options) as channel:
            call = channel.unary_unary(
                BATCH_WRITE,
                request_serializer=None,  # the requests are serialized already
                response_deserializer=pb.BatchWriteResponse.FromString,
            )
            requests = pools[c]
            call(requests[0], timeout=30)  # connect before the clock starts (overwritten later)
            barrier.wait()
            deadline = time.perf_counter() + seconds
            i = 0
            while time.perf_counter() < deadline:
                call(requests[i % len(requests)], timeout=30)
                i += 1
            counts[c] = i * batch

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(pools))]
    for t in threads:
        t.start()
    procs = cluster.procs()
    barrier.wait()
    started = time.perf_counter()
    cpu0 = [cpu_seconds(p.pid) for p in procs]
    own0 = time.process_time()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    cpu1 = [cpu_seconds(p.pid) for p in procs]
    own = (time.process_time() - own0) / elapsed
    used = [(b - a) / elapsed for a, b in zip(cpu0, cpu1, strict=True)]
    catchup = cluster.wait_caught_up()
    return Measured(sum(counts) / elapsed, used[0], sum(used[1:]), own, catchup)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script runs")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one run")
    parser.add_argument("--runs", type=int, default=5, help="runs per configuration")
    parser.add_argument(
        "--share-cpus",
        action="store_true",
        help="let every process run on every CPU (default: the primary and the client on one, "
        "the replicas on the others)",
    )
    args = parser.parse_args()
    pin = pinning(args.share_cpus)
    if pin:
        os.sched_setaffinity(0, pin.primary)  # the client threads, made later, inherit it
    seconds, runs = (0.5, 1) if args.quick else (args.seconds, args.runs)
    batch, per_client = (100, 4) if args.quick else (500, 100)
    warmup_s = 0.3 if args.quick else 2.0
    root = tempfile.mkdtemp(prefix="fanout-bench-")
    clusters: list[Cluster] = []
    results: dict[int, list[Measured]] = {n: [] for n in CONFIGS}
    try:
        pools = [requests_for(c, per_client, batch) for c in range(CLIENTS)]
        with ThreadPoolExecutor(max(CONFIGS)) as pool:
            for n in CONFIGS:
                clusters.append(start_cluster(root, n, pool, pin))
        for cluster in clusters:
            cluster.wait_streaming()
            load(cluster, pools, batch, warmup_s)  # first writes: files, maps, connections
        for r in range(runs):
            order = clusters[r % len(clusters) :] + clusters[: r % len(clusters)]
            for cluster in order:
                results[cluster.replicas].append(load(cluster, pools, batch, seconds))
    finally:
        stop_all([p for c in clusters for p in c.procs()])
        shutil.rmtree(root, ignore_errors=True)
    report(results, seconds, batch, args.quick, pin)
    return 0


def report(
    results: dict[int, list[Measured]], seconds: float, batch: int, quick: bool, pin: Pinning | None
) -> None:
    cpus = os.cpu_count()
    runs = len(results[0])
    print("fan-out benchmark: primary write throughput with 0, 1 and 4 replicas attached")
    if pin:
        print(
            f"  CPUs pinned: primary and client on {sorted(pin.primary)}, replicas on "
            f"{sorted(pin.replicas)} (of {cpus}), in every configuration: the replicas' own"
        )
        print("  receive/apply work, which on a real deployment runs on their own machines, does")
        print("  not take the primary's CPU. They still share the disk and memory. --share-cpus")
        print("  lets every process use every CPU.")
    else:
        print(f"  os.cpu_count() = {cpus}: the primary, its replicas and the client share these")
        print("  CPUs, so each replica's receive/fsync/apply work is CPU taken from the primary.")
        print("  Each replica also fsyncs its own WAL on the same disk. The cost below is that")
        print("  competition plus the fan-out itself, not the network alone.")
    print(
        f"  load: {CLIENTS} client threads, BatchWrite of {batch} entries of ~100 bytes, "
        f"{seconds:g} s per run,"
    )
    print(f"  primary sync mode immediate; {runs} run(s) per configuration, in rotating order")
    base = statistics.median(m.rate for m in results[0])
    print(
        f"{'replicas':>8}  {'entries/s':>10}  {'cost':>6}  {'CPU cores used: primary':>23}"
        f"  {'replicas':>8}  {'client':>6}  {'primary CPU/entry':>17}  {'caught up':>9}"
        "  runs (entries/s)"
    )
    cost: dict[int, float] = {}
    for n, ms in results.items():
        rate = statistics.median(m.rate for m in ms)
        cost[n] = 1 - rate / base
        each = ", ".join(f"{m.rate:,.0f}" for m in ms)
        cpu_p = statistics.median(m.cpu_primary for m in ms)
        cpu_r = statistics.median(m.cpu_replicas for m in ms)
        cpu_c = statistics.median(m.cpu_client for m in ms)
        catch = max(m.catchup_s for m in ms)
        print(
            f"{n:>8}  {rate:>10,.0f}  {cost[n]:>6.1%}  {cpu_p:>23.2f}  {cpu_r:>8.2f}"
            f"  {cpu_c:>6.2f}  {cpu_p / rate * 1e6:>14.1f} us  {catch:>7.2f} s  {each}"
        )
    print(
        "  (entries/s and CPU: medians over the runs; primary CPU/entry: its CPU seconds per"
        " entry written;\n   caught up: the longest wait, after a run, until every replica had"
        " applied the primary's last sequence)"
    )
    print(f"cost of 1 replica:  {cost[1]:.3f} of the 0-replica throughput")
    print(f"cost of 4 replicas: {cost[4]:.3f} of the 0-replica throughput")
    print("every replica was streaming and had applied the primary's last sequence after each run")
    verdict = "PASS" if cost[4] <= 0.15 else "FAIL"
    print(f"target 4 replicas cost <= 15% of the primary's throughput: {verdict}")
    if not pin and cpus is not None and cpus <= 2:
        print(
            f"  (on {cpus} CPUs the 4 replica processes run on the primary's cores; a replica "
            "on its own machine would not take this CPU)"
        )
    if quick:
        print("(quick run: sizes too small for the target to mean anything)")


if __name__ == "__main__":
    sys.exit(main())
