"""Seeded fault runs: a primary and two replicas as real processes, a steady write load, faults.

    python tests/faults.py --seed 42 --seconds 60     # one run; prints its seed and every fault
    python tests/faults.py --seconds 600              # a soak (a random seed, printed)

`tests/test_faults.py` runs it in CI with a bounded budget. The fault schedule (which fault,
when, for how long, on whom) comes from one `random.Random(seed)`, so a seed replays the same
schedule; the processes' own timing still varies from run to run.

Topology: the primary P takes writes with sync mode immediate; replica R1 follows it through
proxy X1, replica R2 through proxy X2. R2's data directory is on a tmpfs of its own, sized to
the run, when the harness may mount one (root), so that its disk can fill up.

Faults (see `FAULTS`): SIGKILL of P, R1 or R2 at a random moment, each restarted after a
random pause, some with the start of a record left at the end of their last WAL segment first
(a torn write: what a crash in the middle of an append leaves); a proxy that cuts (FIN), resets
(RST), stalls, slows down, or cuts a stream part way through a message; R2's disk full for a
while.

Checks once the faults stop and every node runs again (`check`):
* every write P acknowledged is on P, with its value (a write is acknowledged once BatchWrite
  returned OK; sync mode immediate means it was fsynced first);
* R1 and R2 converge to P's digest;
* each replica's own WAL holds consecutive sequences, each entry the same as P's at that
  sequence: nothing applied twice, out of order or different;
* no node's resident memory went over `RSS_BOUND_BYTES` (sampled every 0.2 s).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from nodeproc import NodeError, NodeProcess, digest, free_port

from kevo_repl.proto import service_pb2 as pb
from kevo_repl.proto import service_pb2_grpc as pb_grpc
from kevo_repl.wal.codec import Op, Unit, encode_entry
from kevo_repl.walcli import FileVerdict, read_units, resolve

RSS_BOUND_BYTES = 400 * 1024 * 1024
SEGMENT_BYTES = 1024 * 1024
SLOT_KEEP_BYTES = 1024 * 1024  # small: a replica down for a few seconds is bootstrapped
R2_WAL_RETAIN_BYTES = 4 * 1024 * 1024  # R2's disk is small; P and R1 keep their whole WAL
TMPFS_BASE_BYTES = 96 * 1024 * 1024  # R2's disk: room for its WAL and the store's reserve...
TMPFS_BYTES_PER_S = 1024 * 1024  # ...and what the load adds (~2,000 entries/s of ~150 bytes)
WRITE_BATCH = 20
WRITE_PAUSE_S = 0.01  # ~2,000 entries/s
CONVERGE_TIMEOUT_S = 120.0


# ------------------------------------------------------------------------------ the proxy


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of `target`, whose connections faults can break."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self.stalled_until = 0.0
        self.slow_until = 0.0
        self.slow_bytes_per_s = 0.0
        self.cut_after: int | None = None  # bytes to pass downstream before cutting mid-message
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            for src, dst, down in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, down), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while not self._closed:
                if time.monotonic() < self.stalled_until:
                    time.sleep(0.02)
                    continue
                ready, _, _ = select.select([src], [], [], 0.1)
                if ready and not self._forward(src, dst, down):
                    break
        except (OSError, ValueError):  # ValueError: the other pump closed the socket
            pass
        self._drop(src, dst)

    def _forward(self, src: socket.socket, dst: socket.socket, down: bool) -> bool:
        data = src.recv(64 * 1024)
        if not data:
            return False
        if down and self.cut_after is not None:
            part, self.cut_after = data[: self.cut_after], None
            dst.sendall(part)  # part of a message, then the connection goes
            return False
        if time.monotonic() < self.slow_until:
            time.sleep(len(data) / self.slow_bytes_per_s)
        dst.sendall(data)
        return True

    def _drop(self, a: socket.socket, b: socket.socket, reset: bool = False) -> None:
        with self._lock:
            if (a, b) in self._pairs:
                self._pairs.remove((a, b))
            if (b, a) in self._pairs:
                self._pairs.remove((b, a))
        for s in (a, b):
            with contextlib.suppress(OSError):
                if reset:  # linger 0: close sends RST instead of FIN
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()

    def cut(self, reset: bool = False) -> None:
        with self._lock:
            pairs = list(self._pairs)
        for a, b in pairs:
            self._drop(a, b, reset)

    def clear(self) -> None:
        self.stalled_until = self.slow_until = 0.0
        self.cut_after = None

    def close(self) -> None:
        self._closed = True
        self._server.close()
        self.cut()


# ------------------------------------------------------------------------------ the cluster


@dataclass
class Cluster:
    root: Path
    primary: NodeProcess
    replicas: dict[str, NodeProcess]
    proxies: dict[str, Proxy]
    tmpfs: Path | None  # R2's data directory when it is a tmpfs of its own

    def nodes(self) -> dict[str, NodeProcess]:
        return {"P": self.primary, **self.replicas}


def start_cluster(root: Path, seconds: float) -> Cluster:
    common = ["--segment-bytes", str(SEGMENT_BYTES), "--log-level", "info"]
    p_port = free_port()
    primary = NodeProcess(
        root / "P",
        p_port,
        "--role",
        "primary",
        "--sync-mode",
        "immediate",
        "--slot-keep-bytes",
        str(SLOT_KEEP_BYTES),
        *common,
    )
    tmpfs = _mount_tmpfs(root / "R2", TMPFS_BASE_BYTES + int(seconds * TMPFS_BYTES_PER_S))
    proxies = {name: Proxy(p_port) for name in ("R1", "R2")}
    replicas = {
        name: NodeProcess(
            root / name,
            free_port(),
            "--role",
            "replica",
            "--primary",
            f"127.0.0.1:{proxies[name].port}",
            *common,
            *(["--wal-retain-bytes", str(R2_WAL_RETAIN_BYTES)] if name == "R2" else []),
        )
        for name in ("R1", "R2")
    }
    return Cluster(root, primary, replicas, proxies, tmpfs)


def _mount_tmpfs(path: Path, size: int) -> Path | None:
    path.mkdir(parents=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return None
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return path if done.returncode == 0 else None


def stop_cluster(cluster: Cluster) -> None:
    for proxy in cluster.proxies.values():
        proxy.close()
    for node in cluster.nodes().values():
        node.close()
    if cluster.tmpfs is not None:
        subprocess.run(["umount", "-l", str(cluster.tmpfs)], capture_output=True, check=False)


# ------------------------------------------------------------------------------ load and memory


@dataclass
class Writer:
    """BatchWrites of unique keys to the primary; remembers what was acknowledged."""

    address: str
    acked: dict[bytes, bytes] = field(default_factory=dict)
    failed: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        n = 0
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.KevoServiceStub(channel)  # type: ignore[no-untyped-call]
            while not self.stop.is_set():
                batch = {b"k%09d" % (n + i): b"v%d-" % (n + i) * 8 for i in range(WRITE_BATCH)}
                n += WRITE_BATCH
                ops = [
                    pb.Operation(type=pb.Operation.PUT, key=k, value=v) for k, v in batch.items()
                ]
                try:
                    stub.BatchWrite(pb.BatchWriteRequest(operations=ops), timeout=5)
                    self.acked.update(batch)
                except grpc.RpcError:
                    self.failed += 1  # the primary is down or restarting: not acknowledged
                self.stop.wait(WRITE_PAUSE_S)


@dataclass
class MemorySampler:
    nodes: Callable[[], dict[str, NodeProcess]]
    peak: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for name, node in self.nodes().items():
                rss = _rss(node)
                if rss > self.peak.get(name, 0):
                    self.peak[name] = rss


def _rss(node: NodeProcess) -> int:
    if node.proc is None or node.poll() is not None:
        return 0
    try:
        with open(f"/proc/{node.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------------------ faults


@dataclass
class Fault:
    name: str
    run: Callable[[Cluster, random.Random], str]  # returns what it did, for the log


def _kill(name: str) -> Callable[[Cluster, random.Random], str]:
    def fault(cluster: Cluster, rng: random.Random) -> str:
        node = cluster.nodes()[name]
        node.kill()
        torn = rng.random() < 0.5
        if torn:
            _tear_wal_tail(Path(node.data_dir) / "wal", rng)
        pause = rng.uniform(0.1, 4.0 if name != "P" else 1.5)
        time.sleep(pause)
        what = f"SIGKILL {name}, {'torn WAL tail, ' if torn else ''}restarted after {pause:.1f} s"
        try:
            node.start()
        except NodeError as err:  # `supervise` tries again, and reports an unexpected exit
            return f"{what}: it did not start ({str(err).strip().splitlines()[-1][:120]})"
        return what

    return fault


def _tear_wal_tail(wal: Path, rng: random.Random) -> None:
    """What a crash in the middle of an append leaves after the last record (never acked, as
    its fsync never returned): the first bytes of a record, sometimes then zeros where the file
    system had allocated blocks the data never reached."""
    segments = sorted(p for p in wal.iterdir() if p.is_file() and p.name.endswith(".wal"))
    if not segments:
        return
    record = encode_entry(2**40, Op.PUT, b"torn-key", rng.randbytes(rng.randint(1, 3000)))
    torn = record[: rng.randint(1, len(record) - 1)]
    if rng.random() < 0.5:
        torn += bytes(rng.randint(1, 8192))
    with open(segments[-1], "ab") as f:
        f.write(torn)


def _proxy(kind: str) -> Callable[[Cluster, random.Random], str]:
    def fault(cluster: Cluster, rng: random.Random) -> str:
        name = rng.choice(sorted(cluster.proxies))
        proxy = cluster.proxies[name]
        if kind in ("cut", "reset"):
            proxy.cut(reset=kind == "reset")
            return f"proxy {name}: {kind} every connection"
        if kind == "mid-message":
            proxy.cut_after = rng.randint(1, 20_000)
            return f"proxy {name}: cut the stream after {proxy.cut_after} more bytes"
        seconds = rng.uniform(0.5, 4.0)
        if kind == "stall":
            proxy.stalled_until = time.monotonic() + seconds
            return f"proxy {name}: stall for {seconds:.1f} s"
        proxy.slow_bytes_per_s = rng.choice([20_000.0, 100_000.0, 500_000.0])
        proxy.slow_until = time.monotonic() + seconds
        return f"proxy {name}: {proxy.slow_bytes_per_s / 1000:.0f} kB/s for {seconds:.1f} s"

    return fault


def _disk_full(cluster: Cluster, rng: random.Random) -> str:
    if cluster.tmpfs is None:
        return "disk full: skipped (no tmpfs: not root or mount refused)"
    ballast = cluster.tmpfs / "ballast"
    # Until the disk refuses. A run (seed 2517366248) once failed with ENOSPC raised at this
    # `with` when the suppress sat inside the file's context and covered only the writes; it
    # now covers the open and the close too, and the file is unbuffered (nothing left to
    # flush at close). I could not reproduce which of the two raised.
    with contextlib.suppress(OSError), open(ballast, "wb", buffering=0) as f:
        while True:
            f.write(b"\0" * (1024 * 1024))
    seconds = rng.uniform(1.0, 4.0)
    time.sleep(seconds)
    ballast.unlink(missing_ok=True)
    return f"R2's disk full for {seconds:.1f} s"


FAULTS = [
    Fault("kill-primary", _kill("P")),
    Fault("kill-replica-1", _kill("R1")),
    Fault("kill-replica-2", _kill("R2")),
    Fault("proxy-cut", _proxy("cut")),
    Fault("proxy-reset", _proxy("reset")),
    Fault("proxy-stall", _proxy("stall")),
    Fault("proxy-slow", _proxy("slow")),
    Fault("proxy-mid-message", _proxy("mid-message")),
    Fault("disk-full", _disk_full),
]


# ------------------------------------------------------------------------------ a run


EXPECTED_EXITS = ("No space left on device",)  # a node stops itself on a full disk (fail-stop)


def supervise(cluster: Cluster, seconds: float, restarts: list[str], problems: list[str]) -> None:
    """For `seconds`, restart any node that exited by itself, as a container's restart
    policy would (server/ and docker-compose.yml run nodes that way). An exit for another
    reason than `EXPECTED_EXITS` is a problem."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        for name, node in cluster.nodes().items():
            code = node.poll()
            if code is None:
                continue
            tail = node.stderr()[-3000:]
            if not any(reason in tail for reason in EXPECTED_EXITS):
                problems.append(f"{name} exited {code} by itself:\n{tail}")
            last_line = (tail.strip().splitlines() or ["no output"])[-1][:120]
            restarts.append(f"{name} exited {code} ({last_line}); restarted")
            with contextlib.suppress(NodeError):  # still failing: tried again next time round
                node.start()
        time.sleep(0.1)


@dataclass
class Report:
    seed: int
    faults: list[str]
    restarts: list[str]  # nodes that stopped by themselves, restarted by `supervise`
    acked: int
    failed_batches: int
    checks_s: float  # from the faults' end to the checks' end, convergence included
    peak_rss: dict[str, int]
    problems: list[str]

    def lines(self) -> Iterator[str]:
        yield f"seed {self.seed}: {len(self.faults)} faults, {self.acked} writes acknowledged"
        yield f"  ({self.failed_batches} batches refused or lost while the primary was down)"
        yield f"  {len(self.restarts)} nodes stopped by themselves and were restarted"
        yield f"  checks done {self.checks_s:.1f} s after the faults stopped (convergence in it)"
        peaks = ", ".join(f"{n} {b / 2**20:.0f} MiB" for n, b in sorted(self.peak_rss.items()))
        yield f"  peak RSS: {peaks} (bound {RSS_BOUND_BYTES / 2**20:.0f} MiB)"
        yield from (
            (f"  PROBLEM: {p}" for p in self.problems) if self.problems else ["  all checks passed"]
        )


def run(seed: int, seconds: float, root: Path, log: Callable[[str], None] = print) -> Report:
    rng = random.Random(seed)
    log(f"fault run: seed {seed}, {seconds:.0f} s of faults, in {root}")
    cluster = start_cluster(root, seconds)
    writer = Writer(cluster.primary.address)
    sampler = MemorySampler(cluster.nodes)
    threads = [threading.Thread(target=w.run, daemon=True) for w in (writer, sampler)]
    for t in threads:
        t.start()
    done: list[str] = []
    restarts: list[str] = []
    problems: list[str] = []
    try:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            supervise(cluster, rng.uniform(0.3, 2.0), restarts, problems)
            fault = rng.choice(FAULTS)
            what = fault.run(cluster, rng)
            done.append(what)
            log(f"  {time.monotonic() - started:6.1f} s  {what}")
        for proxy in cluster.proxies.values():
            proxy.clear()
        writer.stop.set()
        threads[0].join()
        calm = time.monotonic()
        supervise(cluster, 1.0, restarts, problems)
        problems += check(cluster, writer.acked)
        checks_s = time.monotonic() - calm
    finally:
        writer.stop.set()
        sampler.stop.set()
        stop_cluster(cluster)
    problems += [
        f"{name} used {rss / 2**20:.0f} MiB, over the bound"
        for name, rss in sampler.peak.items()
        if rss > RSS_BOUND_BYTES
    ]
    acked = len(writer.acked)
    return Report(seed, done, restarts, acked, writer.failed, checks_s, sampler.peak, problems)


# ------------------------------------------------------------------------------ checks


def check(cluster: Cluster, acked: dict[bytes, bytes]) -> list[str]:
    problems = _missing_writes(cluster.primary, acked)
    target = _wait_converged(cluster)
    if target is not None:
        problems.append(target)
    for replica in cluster.replicas.values():
        replica.stop()
    cluster.primary.stop()
    primary_wal = _wal_entries(Path(cluster.primary.data_dir) / "wal")
    for name, replica in cluster.replicas.items():
        problems += _wal_order(name, Path(replica.data_dir) / "wal", primary_wal)
    return problems


def _missing_writes(primary: NodeProcess, acked: dict[bytes, bytes]) -> list[str]:
    held: dict[bytes, bytes] = {}
    with primary.channel() as channel:
        stub = pb_grpc.KevoServiceStub(channel)  # type: ignore[no-untyped-call]
        for row in stub.Scan(pb.ScanRequest(prefix=b"k"), timeout=120):
            held[row.key] = row.value
    wrong = [k for k, v in acked.items() if held.get(k) != v]
    if not wrong:
        return []
    return [f"{len(wrong)} acknowledged writes missing or changed on P, e.g. {wrong[:3]}"]


def _wait_converged(cluster: Cluster) -> str | None:
    dead = {n: node for n, node in cluster.nodes().items() if node.poll() is not None}
    if dead:
        return "; ".join(
            f"{n} exited {node.poll()}:\n{node.stderr()[-3000:]}" for n, node in dead.items()
        )
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    while True:
        want = digest(cluster.primary)
        behind = [n for n, r in cluster.replicas.items() if digest(r) != want]
        if not behind:
            return None
        if time.monotonic() > deadline:
            logs = "\n".join(cluster.replicas[n].stderr()[-2000:] for n in behind)
            return f"{behind} did not converge in {CONVERGE_TIMEOUT_S:.0f} s:\n{logs}"
        time.sleep(0.2)


Entry = tuple[int, bytes, bytes]  # (op, key, value)


def _wal_units(wal: Path) -> Iterator[Unit]:
    """Every unit of a (stopped) node's WAL directory, in log order."""
    verdicts: list[FileVerdict] = []
    for path in resolve(str(wal))[1]:
        yield from read_units(path, verdicts)


def _wal_entries(wal: Path) -> dict[int, Entry]:
    return {e.seq: (int(e.op), e.key, e.value) for u in _wal_units(wal) for e in u.entries}


def _wal_order(name: str, wal: Path, primary: dict[int, Entry]) -> list[str]:
    """A replica's WAL: consecutive sequences, each entry as the primary wrote it."""
    previous: int | None = None
    for unit in _wal_units(wal):
        for e in unit.entries:
            if previous is not None and e.seq != previous + 1:
                return [f"{name}'s WAL has sequence {e.seq} after {previous}"]
            previous = e.seq
            theirs = primary.get(e.seq)
            if theirs is not None and theirs != (int(e.op), e.key, e.value):
                return [f"{name}'s WAL entry {e.seq} differs from the primary's"]
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long faults go on")
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    root = Path(tempfile.mkdtemp(prefix="kevo-faults-"))
    try:
        report = run(seed, args.seconds, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    for line in report.lines():
        print(line)
    return 1 if report.problems else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
