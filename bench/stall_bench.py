"""Stall benchmark: the primary's memory while one replica is stopped and the WAL grows under it.

    python bench/stall_bench.py            # full run (2,000,000 entries; a minute or two)
    python bench/stall_bench.py --quick    # smoke run used by the test suite

Real node processes on 127.0.0.1 (sync mode immediate): a primary and one replica, streaming.
After a warm-up write the replica's process is stopped (SIGSTOP): it holds its connection and
its slot but reads nothing. N entries of ~100 bytes are then written to the primary with
BatchWrites of 1,000 from two client threads, while the primary's /proc/PID/status is sampled
every 0.1 s. The replica is then continued (SIGCONT) and timed until it has applied everything.

For comparison the same warm-up and the same N writes go to a fresh primary with no replica at
all (the control): what the primary's memory does anyway under this load.

What bounds the primary's memory (kevo_repl/config.py, repl/primary.py, wal/tail.py):
* the tail window, `replication_window_bytes` (16 MiB by default), counting each unit's bytes
  plus 128 bytes of overhead; shared by all streams, evicting the oldest units as it fills;
* the shared frames, `replication_frame_cache_bytes` (32 MiB by default) of compressed frames,
  oldest dropped first (repl/frame_cache.py);
* per stream, one frame being sent: at most `replication_frame_bytes` (256 KiB) of raw units
  (plus the first unit however large; a BatchWrite of 1,000 is one unit of ~130 KB), its
  compressed copy and its protobuf message, plus what gRPC queues for the stream before flow
  control holds it. Bytes already handed to the kernel sit in its socket buffers, not in ours;
* the backlog is the WAL segments on disk, kept by the replica's slot (`slot_keep_bytes`, set
  here to 1 GiB, well above the ~280 MB this run writes, so the slot is not lost).

The stated bound: peak RssAnon - RssAnon before the stall <= replication_window_bytes +
replication_frame_cache_bytes + 4 x replication_frame_bytes + 16 MiB of allowance for the write
path's own transient buffers (in-flight requests, the allocator's slack). The baseline is taken
after the warm-up, with the tail window (a fixed cost of any primary) already partly full.
RssFile is reported apart: it is the store's LMDB map (writemap), page cache mapped into the
process, which grows with the store's data whether or not a replica exists; the control shows
how much of VmRSS that is. The target also requires the stalled run's VmRSS growth to exceed the
control's by no more than the same bound.

What happens to the stopped replica's connection is printed too: gRPC sets TCP_USER_TIMEOUT on
the primary's sockets to its keepalive timeout (10 s, node/server.py; seen with strace), so
once the stopped reader's receive window has been closed for 10 s the kernel closes the
connection and the primary ends the session (the replica then shows as `disconnected`, its slot
still holding the WAL). After SIGCONT the replica finds its stream broken and reconnects.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from replication_bench import status, stop_all, value  # noqa: E402

from kevo_repl.localnode import free_port, start_node  # noqa: E402
from kevo_repl.proto import replication_pb2 as rpb  # noqa: E402
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc  # noqa: E402
from kevo_repl.proto import service_pb2 as pb  # noqa: E402
from kevo_repl.proto import service_pb2_grpc as pb_grpc  # noqa: E402

MIB = 1024 * 1024
MB = 1e6
WINDOW_BYTES = 16 * MIB  # replication_window_bytes, passed explicitly (the default)
FRAME_BYTES = 256 * 1024  # replication_frame_bytes, passed explicitly (the default)
FRAME_CACHE_BYTES = 32 * MIB  # replication_frame_cache_bytes, passed explicitly (the default)
SLOT_KEEP_BYTES = 1024 * MIB
ALLOWANCE_BYTES = 16 * MIB
BOUND_BYTES = WINDOW_BYTES + FRAME_CACHE_BYTES + 4 * FRAME_BYTES + ALLOWANCE_BYTES
BATCH = 1000
WRITERS = 2
SAMPLE_S = 0.1


def memory_of(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, RssFile) in bytes, from /proc/PID/status."""
    found = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in found:
                found[name] = int(rest.split()[0]) * 1024
    return found["VmRSS"], found["RssAnon"], found["RssFile"]


@dataclass
class Sampler:
    """Samples a process's memory every SAMPLE_S seconds on a thread, tagged by phase."""

    pid: int
    phase: str = "idle"
    samples: list[tuple[float, str, int, int, int]] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _t0: float = field(default_factory=time.perf_counter)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def mark(self, phase: str) -> None:
        """Enter `phase`, sampling at once (a phase may be shorter than the period)."""
        self.phase = phase
        self._sample()

    def _sample(self) -> None:
        rss, anon, file = memory_of(self.pid)
        self.samples.append((time.perf_counter() - self._t0, self.phase, rss, anon, file))

    def _run(self) -> None:
        while not self._done.is_set():
            self._sample()
            self._done.wait(SAMPLE_S)

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(5)

    def of(self, *phases: str) -> list[tuple[float, str, int, int, int]]:
        return [s for s in self.samples if s[1] in phases]


def write(addr: str, tag: str, n: int) -> float:
    """`n` entries in BatchWrites of BATCH from WRITERS threads; returns entries/s."""
    per = n // WRITERS

    def writer(w: int) -> None:
        with grpc.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = pb_grpc.KevoServiceStub(ch)  # type: ignore[no-untyped-call]
            for start in range(0, per, BATCH):
                ops = [
                    pb.Operation(
                        type=pb.Operation.PUT,
                        key=b"%s:%d:%09d" % (tag.encode(), w, i),
                        value=value(i),
                    )
                    for i in range(start, min(per, start + BATCH))
                ]
                stub.BatchWrite(pb.BatchWriteRequest(operations=ops), timeout=60)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return per * WRITERS / (time.perf_counter() - started)


def slots(addr: str) -> rpb.SlotList:
    with grpc.insecure_channel(addr) as channel:
        stub = rpb_grpc.WALReplicationServiceStub(channel)  # type: ignore[no-untyped-call]
        reply: rpb.SlotList = stub.ListSlots(rpb.ListSlotsRequest(), timeout=10)
        return reply


def wait_caught_up(primary: str, replica: str, timeout_s: float = 600) -> float:
    """Seconds until the replica has applied the primary's last sequence."""
    started = time.perf_counter()
    target = status(primary).last_sequence
    while status(replica).applied_sequence < target:
        if time.perf_counter() - started > timeout_s:
            raise RuntimeError(f"the replica did not catch up within {timeout_s} s")
        time.sleep(0.02)
    return time.perf_counter() - started


def wait_streaming(primary: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(r.connected and r.state == "streaming" for r in status(primary).replicas):
        if time.monotonic() > deadline:
            raise RuntimeError("the replica is not streaming from the primary")
        time.sleep(0.05)


def primary_flags() -> tuple[str, ...]:
    return (
        "--role",
        "primary",
        "--sync-mode",
        "immediate",
        "--replication-window-bytes",
        str(WINDOW_BYTES),
        "--replication-frame-bytes",
        str(FRAME_BYTES),
        "--replication-frame-cache-bytes",
        str(FRAME_CACHE_BYTES),
        "--slot-keep-bytes",
        str(SLOT_KEEP_BYTES),
    )


@dataclass
class Run:
    write_rate: float = 0.0
    baseline: tuple[int, int, int] = (0, 0, 0)  # median VmRSS, RssAnon, RssFile before
    peak: tuple[int, int, int] = (0, 0, 0)  # max of each while writing (stalled)
    catchup_peak: tuple[int, int, int] = (0, 0, 0)
    catchup_s: float = 0.0
    replica_state: str = ""
    lag_entries: int = 0
    held_bytes: int = 0
    slot_lost: bool = False
    written_seq: int = 0
    samples: list[tuple[float, str, int, int, int]] = field(default_factory=list)
    seen: list[tuple[float, bool, int]] = field(default_factory=list)  # see `watch`

    def dropped(self) -> tuple[float, int] | None:
        """(s after SIGSTOP, last sequence sent) when the primary first showed the stopped
        replica not connected; None if it stayed connected."""
        sent = 0
        for t, connected, seq in self.seen:
            if not connected:
                return t, sent
            sent = seq
        return None


def medians(samples: list[tuple[float, str, int, int, int]]) -> tuple[int, int, int]:
    return (
        int(statistics.median(s[2] for s in samples)),
        int(statistics.median(s[3] for s in samples)),
        int(statistics.median(s[4] for s in samples)),
    )


def peaks(samples: list[tuple[float, str, int, int, int]]) -> tuple[int, int, int]:
    return max(s[2] for s in samples), max(s[3] for s in samples), max(s[4] for s in samples)


def watch(
    primary: str, since: float, done: threading.Event, seen: list[tuple[float, bool, int]]
) -> None:
    """The primary's view of its replica every 0.5 s: (s since SIGSTOP, connected, sent seq)."""
    while not done.is_set():
        for r in status(primary).replicas[:1]:
            seen.append((time.perf_counter() - since, r.connected, r.sent_sequence))
        done.wait(0.5)


def stalled_run(root: str, n: int, warmup: int) -> Run:
    run = Run()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        primary = f"127.0.0.1:{free_port()}"
        primary_proc = start_node(os.path.join(root, "primary"), primary, *primary_flags())
        procs.append(primary_proc)
        replica = f"127.0.0.1:{free_port()}"
        replica_proc = start_node(
            os.path.join(root, "replica"), replica, "--role", "replica", "--primary", primary
        )
        procs.append(replica_proc)
        wait_streaming(primary)
        sampler = Sampler(primary_proc.pid)
        sampler.start()
        sampler.mark("warmup")
        write(primary, "warm", warmup)
        wait_caught_up(primary, replica)
        sampler.mark("before")
        time.sleep(1.0)
        replica_proc.send_signal(signal.SIGSTOP)
        stopped = time.perf_counter()
        sampler.mark("stalled")
        watching = threading.Event()
        watcher = threading.Thread(target=watch, args=(primary, stopped, watching, run.seen))
        watcher.start()
        run.write_rate = write(primary, "stall", n)
        time.sleep(1.0)  # the stream keeps trying while the replica stays stopped
        watching.set()
        watcher.join(30)
        st = status(primary)
        run.written_seq = st.last_sequence
        mine = list(st.replicas)
        run.replica_state = ", ".join(
            f"{r.state} ({'connected' if r.connected else 'not connected'})" for r in mine
        )
        run.lag_entries = max((r.lag_entries for r in mine), default=0)
        slot_list = slots(primary).slots
        run.held_bytes = max((s.held_bytes for s in slot_list), default=0)
        run.slot_lost = any(s.lost for s in slot_list)
        sampler.mark("catchup")
        continued = time.perf_counter()
        replica_proc.send_signal(signal.SIGCONT)
        while status(replica).applied_sequence < run.written_seq:
            if time.perf_counter() - continued > 600:
                raise RuntimeError("the replica did not catch up within 600 s")
            time.sleep(0.02)
        run.catchup_s = time.perf_counter() - continued
        sampler.mark("after")
        time.sleep(0.3)
        sampler.stop()
        run.samples = sampler.samples
        run.baseline = medians(sampler.of("before"))
        run.peak = peaks(sampler.of("stalled"))
        run.catchup_peak = peaks(sampler.of("catchup"))
    finally:
        stop_all(procs)
    return run


def control_run(root: str, n: int, warmup: int) -> Run:
    """The same warm-up and writes to a primary with no replica at all."""
    run = Run()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        primary = f"127.0.0.1:{free_port()}"
        proc = start_node(os.path.join(root, "control"), primary, *primary_flags())
        procs.append(proc)
        sampler = Sampler(proc.pid)
        sampler.start()
        sampler.mark("warmup")
        write(primary, "warm", warmup)
        sampler.mark("before")
        time.sleep(1.0)
        sampler.mark("stalled")
        run.write_rate = write(primary, "stall", n)
        time.sleep(1.0)
        sampler.stop()
        run.samples = sampler.samples
        run.baseline = medians(sampler.of("before"))
        run.peak = peaks(sampler.of("stalled"))
    finally:
        stop_all(procs)
    return run


def mb(b: float) -> str:
    return f"{b / MB:,.1f} MB"


def report(n: int, warmup: int, stalled: Run, control: Run, quick: bool) -> None:
    print(f"stall benchmark: {n:,} entries of ~100 bytes written while one replica is stopped")
    print(f"  {os.cpu_count()} CPUs; BatchWrites of {BATCH} from {WRITERS} client threads;")
    print(
        "  primary: sync mode immediate, replication_window_bytes "
        f"{WINDOW_BYTES // MIB} MiB, replication_frame_bytes {FRAME_BYTES // 1024} KiB,"
        f" replication_frame_cache_bytes {FRAME_CACHE_BYTES // MIB} MiB,"
    )
    print(f"  slot_keep_bytes {SLOT_KEEP_BYTES // MIB} MiB; memory sampled every {SAMPLE_S} s")
    per_entry = stalled.held_bytes / max(1, stalled.lag_entries)  # WAL bytes per entry
    print(
        f"  'before' is after a warm-up of {warmup:,} entries ({mb(warmup * per_entry)} of WAL):"
        " the tail window,"
    )
    print("  a fixed cost of any primary, is already that full (at most 16 MiB) at the stall")
    print(
        f"write rate while the replica was stopped: {stalled.write_rate:,.0f} entries/s "
        f"(control, no replica: {control.write_rate:,.0f} entries/s)"
    )
    print(
        f"replica as the primary saw it after the writes: {stalled.replica_state or 'absent'}; "
        f"{stalled.lag_entries:,} entries behind"
    )
    dropped = stalled.dropped()
    if dropped is None:
        print("  the primary kept the stopped replica's connection throughout the stall")
    else:
        print(
            f"  the primary dropped the stopped replica's connection {dropped[0]:.1f} s after "
            f"SIGSTOP (polled every 0.5 s),"
        )
        print(
            f"  having sent up to sequence {dropped[1]:,}. gRPC sets TCP_USER_TIMEOUT on the "
            "primary's sockets to its keepalive"
        )
        print(
            "  timeout (10 s); data left behind the stopped reader's zero window that long "
            "closes the connection (tcp(7))"
        )
    lost = "LOST" if stalled.slot_lost else "kept"
    print(f"its slot: {lost}, holding {mb(stalled.held_bytes)} of WAL on disk")
    print("primary memory          VmRSS        RssAnon      RssFile (LMDB map)")
    for name, run in (("stalled replica", stalled), ("control, no replica", control)):
        (r0, a0, f0), (r1, a1, f1) = run.baseline, run.peak
        print(f"  {name}:")
        print(f"    before        {mb(r0):>12} {mb(a0):>12} {mb(f0):>12}")
        print(f"    peak          {mb(r1):>12} {mb(a1):>12} {mb(f1):>12}")
        print(f"    peak - before {mb(r1 - r0):>12} {mb(a1 - a0):>12} {mb(f1 - f0):>12}")
    r2, a2, _ = stalled.catchup_peak
    r0, a0, _ = stalled.baseline
    print(
        f"  peak while the replica caught up: VmRSS {mb(r2)}, RssAnon {mb(a2)} "
        f"({mb(a2 - a0)} over before)"
    )
    print(
        f"replica caught up ({stalled.lag_entries:,} entries behind, to sequence "
        f"{stalled.written_seq:,}) {stalled.catchup_s:.2f} s after SIGCONT"
    )
    anon_growth = stalled.peak[1] - stalled.baseline[1]
    rss_growth = stalled.peak[0] - stalled.baseline[0]
    control_growth = control.peak[0] - control.baseline[0]
    extra = rss_growth - control_growth
    print(
        f"bound: replication_window_bytes {mb(WINDOW_BYTES)} + replication_frame_cache_bytes "
        f"{mb(FRAME_CACHE_BYTES)} + 4 x replication_frame_bytes "
        f"{mb(4 * FRAME_BYTES)} + write-path allowance {mb(ALLOWANCE_BYTES)} = "
        f"{mb(BOUND_BYTES)}"
    )
    print(f"  RssAnon growth with the replica stopped: {mb(anon_growth)}")
    print(
        f"  VmRSS growth beyond the control's: {mb(extra)} "
        f"({mb(rss_growth)} - {mb(control_growth)})"
    )
    ok = anon_growth <= BOUND_BYTES and extra <= BOUND_BYTES and not stalled.slot_lost
    verdict = "PASS" if ok else "FAIL"
    print(
        f"target primary memory bounded while a replica is stalled "
        f"(RssAnon growth and VmRSS growth beyond the control <= {mb(BOUND_BYTES)}): {verdict}"
    )
    if quick:
        print("(quick run: the writes do not even fill the tail window; the target means nothing)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script runs")
    parser.add_argument("--entries", type=int, default=2_000_000)
    parser.add_argument("--keep", action="store_true", help="keep the data; print where")
    args = parser.parse_args()
    n = 20_000 if args.quick else args.entries
    warmup = 4_000 if args.quick else 100_000
    root = tempfile.mkdtemp(prefix="stall-bench-")
    try:
        stalled = stalled_run(root, n, warmup)
        control = control_run(root, n, warmup)
    finally:
        if args.keep:
            print(f"data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report(n, warmup, stalled, control, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
