"""Benchmark report: runs the benches end to end and writes a folder with report.md and plots.

    python bench/report.py [--out DIR] [--quick]

Runs bench/wal_bench.py, bench/replication_bench.py, bench/fanout_bench.py and
bench/stall_bench.py one after another as subprocesses (with --quick when given), keeping their
output, then takes three time series of its own with real node processes on 127.0.0.1:

* lag over time: a primary and a replica, BatchWrites of 100 every 5 ms (20,000 entries/s);
  lag is the time from a batch's acknowledgement on the primary to its last key being readable
  on the replica (every 4th batch), and the primary's own view (lag in entries) every 0.1 s;
* catch-up progress: a replica whose slot is N entries behind, its applied sequence every
  50 ms from the moment its process is launched;
* throughput by codec and frame size: replica catch-up rate over the same WAL with
  --replication-codecs none / snappy / zstd (the replica's choice) and
  --replication-frame-bytes 64 KiB / 256 KiB / 1 MiB (the primary's).

It writes DIR/report.md (machine, command, a table of headline figures beside their targets,
the plots, each bench's full output), lag_over_time.png, catchup_progress.png,
throughput_by_codec.png and the series as CSV. DIR defaults to bench/out/<timestamp>
(git-ignored). Not a *_bench.py: the test suite does not run it.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from replication_bench import (  # noqa: E402
    build_wal,
    give_slot,
    percentile,
    status,
    steady_state,
    stop_all,
)

from kevo_repl.localnode import free_port, start_node  # noqa: E402
from kevo_repl.proto import replication_pb2 as rpb  # noqa: E402
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc  # noqa: E402

BENCHES = ("wal_bench.py", "replication_bench.py", "fanout_bench.py", "stall_bench.py")
CODECS = ("none", "snappy", "zstd")
FRAME_SIZES = (64 * 1024, 256 * 1024, 1024 * 1024)
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 50),
]


# -- the benches -------------------------------------------------------------------------------


@dataclass
class BenchRun:
    script: str
    command: str
    seconds: float
    code: int
    stdout: str
    stderr: str


def run_bench(script: str, quick: bool) -> BenchRun:
    args = [sys.executable, str(HERE / script), *(["--quick"] if quick else [])]
    shown = f"python bench/{script}" + (" --quick" if quick else "")
    print(f"running {shown} ...", flush=True)
    started = time.perf_counter()
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=False)
    took = time.perf_counter() - started
    print(f"  done in {took:.1f} s (exit {done.returncode})", flush=True)
    return BenchRun(script, shown, took, done.returncode, done.stdout, done.stderr)


# -- time series -------------------------------------------------------------------------------


@dataclass
class LagSeries:
    written_rate: float = 0.0
    probes: list[tuple[float, float]] = field(default_factory=list)  # (s since start, lag ms)
    seen: list[tuple[float, int, float]] = field(default_factory=list)  # (s, entries, lag s)


def lag_over_time(root: str, seconds: float) -> LagSeries:
    """BatchWrites of 100 every 5 ms to a primary with one replica; lag as in replication_bench."""
    out = LagSeries()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        primary = f"127.0.0.1:{free_port()}"
        procs.append(start_node(os.path.join(root, "lag-p"), primary, "--role", "primary"))
        replica = f"127.0.0.1:{free_port()}"
        procs.append(
            start_node(
                os.path.join(root, "lag-r"), replica, "--role", "replica", "--primary", primary
            )
        )
        while not [r for r in status(primary).replicas if r.state == "streaming"]:
            time.sleep(0.05)
        done = threading.Event()
        t0 = time.perf_counter()

        def watcher() -> None:
            while not done.is_set():
                st = status(primary)
                for r in st.replicas[:1]:
                    out.seen.append((time.perf_counter() - t0, r.lag_entries, r.lag_seconds))
                done.wait(0.1)

        thread = threading.Thread(target=watcher)
        thread.start()
        begun = time.perf_counter() - t0  # steady_state's samples count from its own start
        try:
            out.written_rate, samples = steady_state(primary, replica, seconds, prefix=b"lag")
        finally:
            done.set()
            thread.join(60)
        out.probes = [(begun + at, lag * 1000) for at, lag in samples]
    finally:
        stop_all(procs)
    return out


@dataclass
class Progress:
    samples: list[tuple[float, int]]  # (s since launch, applied sequence)
    rate: float | None  # entries/s from its first answer to all applied

    def done_s(self, n: int) -> float:
        return next((t for t, a in self.samples if a >= n), float("nan"))


def follow_replica(data_dir: str, primary: str, n: int, *extra: str) -> Progress:
    """Launch a replica and sample its applied sequence every 50 ms until it reaches `n`.

    The rate counts from the first sample it answered (it streams while starting up, so what it
    applied by then is subtracted, as replication_bench does) to the first at `n` or beyond."""
    addr = f"127.0.0.1:{free_port()}"
    samples: list[tuple[float, int]] = []
    launched = time.perf_counter()
    done = threading.Event()

    def sample() -> None:
        with grpc.insecure_channel(addr, options=FAST_RECONNECT) as channel:
            stub = rpb_grpc.WALReplicationServiceStub(channel)  # type: ignore[no-untyped-call]
            while not done.is_set():
                try:
                    st = stub.GetReplicationStatus(rpb.ReplicationStatusRequest(), timeout=1)
                    samples.append((time.perf_counter() - launched, int(st.applied_sequence)))
                    if st.applied_sequence >= n:
                        return
                except grpc.RpcError:
                    pass  # not listening yet
                done.wait(0.05)

    thread = threading.Thread(target=sample)
    thread.start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = start_node(data_dir, addr, "--role", "replica", "--primary", primary, *extra)
        thread.join(600)
    finally:
        done.set()
        thread.join(10)
        if proc is not None:
            stop_all([proc])
    answered = [s for s in samples if s[1] > 0] or samples
    if not answered:
        return Progress(samples, None)
    t1, a1 = answered[0]
    t2 = next((t for t, a in samples if a >= n), float("nan"))
    rate = (n - a1) / (t2 - t1) if t2 > t1 and n > a1 else None
    return Progress(samples, rate)


@dataclass
class CatchupSeries:
    n: int
    progress: Progress
    by_codec: dict[tuple[int, str], float | None] = field(default_factory=dict)


def catchup_and_codecs(root: str, n: int) -> CatchupSeries:
    """A replica catching up from a slot N behind; then new replicas per codec and frame size."""
    primary_dir = os.path.join(root, "cu-p")
    build_wal(primary_dir, n, transactions=False)
    give_slot(primary_dir, os.path.join(root, "cu-r"), "report-catchup")
    primary = f"127.0.0.1:{free_port()}"
    proc = start_node(primary_dir, primary, "--role", "primary")
    try:
        progress = follow_replica(os.path.join(root, "cu-r"), primary, n)
    finally:
        stop_all([proc])
    series = CatchupSeries(n, progress)
    # The primary keeps its WAL (wal_retain_bytes, 1 GiB by default): each new replica below
    # streams all N entries from sequence 1.
    for frame in FRAME_SIZES:
        proc = start_node(
            primary_dir, primary, "--role", "primary", "--replication-frame-bytes", str(frame)
        )
        try:
            for codec in CODECS:
                data = os.path.join(root, f"codec-{codec}-{frame}")
                got = follow_replica(data, primary, n, "--replication-codecs", codec)
                series.by_codec[(frame, codec)] = got.rate
                shutil.rmtree(data, ignore_errors=True)
        finally:
            stop_all([proc])
    return series


# -- plots -------------------------------------------------------------------------------------


def plot_lag(lag: LagSeries, path: Path) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    xs, ys = [p[0] for p in lag.probes], [p[1] for p in lag.probes]
    top.plot(xs, ys, ".", markersize=3)
    p50, p99 = percentile(ys, 50), percentile(ys, 99)
    top.axhline(10, color="red", linestyle="--", linewidth=1, label="target p99 10 ms")
    top.set_ylabel("ack -> readable on replica (ms)")
    top.set_title(
        f"Lag at {lag.written_rate:,.0f} entries/s written: p50 {p50:.2f} ms, p99 {p99:.2f} ms"
    )
    top.legend(loc="upper right")
    bottom.plot([s[0] for s in lag.seen], [s[1] for s in lag.seen], linewidth=1)
    bottom.set_ylabel("lag seen by primary (entries)")
    bottom.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_catchup(cu: CatchupSeries, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    p = cu.progress
    ax.plot([s[0] for s in p.samples], [s[1] for s in p.samples], marker=".", markersize=3)
    ax.axhline(cu.n, color="grey", linestyle=":", linewidth=1, label=f"primary's last ({cu.n:,})")
    if p.samples:
        first = p.samples[0][0]
        ax.axvline(first, color="orange", linestyle="--", linewidth=1, label="first answer")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    rate = f"{p.rate:,.0f} entries/s" if p.rate else "n/a"
    ax.set_title(f"Replica catching up from a slot {cu.n:,} entries behind: {rate}")
    ax.set_xlabel("seconds since the replica process was launched")
    ax.set_ylabel("applied sequence")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_codecs(cu: CatchupSeries, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.27
    for i, codec in enumerate(CODECS):
        xs = [j + (i - 1) * width for j in range(len(FRAME_SIZES))]
        got = [cu.by_codec.get((f, codec)) for f in FRAME_SIZES]
        bars = ax.bar(xs, [r or 0.0 for r in got], width, label=codec)
        labels = [f"{r / 1000:,.0f}k" if r else "n/a" for r in got]
        ax.bar_label(bars, labels=labels, fontsize=8)
    ax.set_xticks(range(len(FRAME_SIZES)), [f"{f // 1024} KiB" for f in FRAME_SIZES])
    ax.set_xlabel("--replication-frame-bytes (primary)")
    ax.set_ylabel("catch-up entries/s")
    ax.set_title(f"Replica catch-up rate over {cu.n:,} entries by codec and frame size")
    ax.margins(y=0.25)  # room above the bars for the legend
    ax.legend(title="--replication-codecs", ncols=len(CODECS), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csvs(out: Path, lag: LagSeries, cu: CatchupSeries) -> None:
    with open(out / "lag_over_time.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seconds", "lag_ms"])
        w.writerows((f"{t:.4f}", f"{ms:.3f}") for t, ms in lag.probes)
    with open(out / "catchup_progress.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seconds_since_launch", "applied_sequence"])
        w.writerows((f"{t:.3f}", a) for t, a in cu.progress.samples)
    with open(out / "throughput_by_codec.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["frame_bytes", "codec", "entries_per_s"])
        w.writerows(
            (frame, codec, "" if r is None else f"{r:.0f}")
            for (frame, codec), r in cu.by_codec.items()
        )


# -- the report --------------------------------------------------------------------------------


def machine() -> list[tuple[str, str]]:
    model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    mem = "unknown"
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
                break
    return [
        ("CPUs (os.cpu_count())", str(os.cpu_count())),
        ("CPU model", model),
        ("Memory", mem),
        ("Python", f"{platform.python_version()} ({sys.executable})"),
        ("OS", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("Date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")),
    ]


def grab(text: str, pattern: str, default: str = "not found") -> str:
    m = re.search(pattern, text, re.MULTILINE)
    return " / ".join(m.groups()) if m else default


@dataclass
class Row:
    figure: str
    value: str
    limit: str  # the reference from the same run, or the bound
    target: str
    verdict: str


def headline(runs: dict[str, BenchRun], lag: LagSeries, cu: CatchupSeries) -> list[Row]:
    wal = runs["wal_bench.py"].stdout
    rep = runs["replication_bench.py"].stdout
    fan = runs["fanout_bench.py"].stdout
    stall = runs["stall_bench.py"].stdout
    encode = grab(wal, r"raw encode \(reference\)\s+([\d,]+)") + " entries/s (raw encode)"
    replay = grab(rep, r"local replay.*?:\s+([\d,]+) entries/s") + " entries/s (local replay)"
    rate0 = grab(fan, r"^\s+0\s+([\d,]+)\s")
    mem = re.search(
        r"stalled replica:\n\s+before\s+([\d,.]+ MB)\s+([\d,.]+ MB).*\n"
        r"\s+peak\s+([\d,.]+ MB)\s+([\d,.]+ MB)",
        stall,
    )
    rss, anon = ("not found", "not found")
    if mem:
        rss, anon = f"{mem[1]} / {mem[3]}", f"RssAnon before / peak: {mem[2]} / {mem[4]}"
    lag_ms = [p[1] for p in lag.probes]
    best = max(((r, k) for k, r in cu.by_codec.items() if r), default=None)
    worst = min(((r, k) for k, r in cu.by_codec.items() if r), default=None)

    def verdict(text: str, target: str) -> str:
        return grab(text, re.escape(target) + r".*?: (PASS|FAIL)", "-")

    def combo(x: tuple[float, tuple[int, str]] | None) -> str:
        return f"{x[0]:,.0f} entries/s ({x[1][1]}, {x[1][0] // 1024} KiB)" if x else "n/a"

    return [
        Row(
            "WAL append, sync none",
            grab(wal, r"append, sync none\s+([\d,]+)") + " appends/s",
            encode,
            ">= 400k appends/s",
            verdict(wal, "target sync none"),
        ),
        Row(
            "WAL group commit, 16 writers / 1 writer",
            grab(wal, r"group commit: 16 writers / 1 writer = ([\d.]+x)"),
            "1 writer",
            ">= 5x",
            verdict(wal, "target immediate 16 writers"),
        ),
        Row(
            "WAL entries_from, cold",
            grab(wal, r"entries_from \(cold, from seq 1\)\s+([\d,]+)") + " entries/s",
            encode,
            ">= 400k entries/s",
            verdict(wal, "target entries_from"),
        ),
        Row(
            "catch-up from a slot (replication_bench)",
            grab(
                rep, r"catch-up from a slot \d+ behind:\s+([\d,]+ entries/s \([\d.]+ of replay\))"
            ),
            replay,
            ">= 0.7 of replay",
            verdict(rep, "target catch-up"),
        ),
        Row(
            "lag p50 / p99 (replication_bench)",
            grab(rep, r"p50 ([\d.]+ ms), p99 ([\d.]+ ms)"),
            grab(rep, r"steady state: ([\d,]+) entries/s written") + " entries/s written",
            "p99 <= 10 ms at 20,000 entries/s",
            verdict(rep, "target p99 lag"),
        ),
        Row(
            "zstd wire bytes",
            grab(rep, r"wire bytes, zstd\s*:\s*[\d,]+ \(([\d.]+) of raw") + " of raw",
            "raw (codec none) = 1.000",
            "<= 0.3 of raw",
            verdict(rep, "target zstd"),
        ),
        Row(
            "bootstrap / local copy rate (median; against cp's fastest run)",
            grab(rep, r"bootstrap / local copy rate: ([\d.]+)")
            + "; "
            + grab(rep, r"against cp's fastest run \([\d.]+ s\): ([\d.]+)"),
            "cp of data.mdb = 1.0",
            ">= 0.5 (against cp's fastest)",
            verdict(rep, "target bootstrap"),
        ),
        Row(
            "primary throughput with 0 / 1 / 4 replicas",
            " / ".join(grab(fan, rf"^\s+{n}\s+([\d,]+)\s") for n in (0, 1, 4)) + " entries/s",
            f"{rate0} entries/s (0 replicas); os.cpu_count() = {os.cpu_count()};"
            + (
                " primary+client pinned to one CPU, replicas to the rest"
                if "CPUs pinned" in fan
                else " shared with the replicas"
            ),
            "",
            "",
        ),
        Row(
            "cost of 1 / 4 replicas (fraction of 0-replica throughput)",
            grab(fan, r"cost of 1 replica:\s+(-?[\d.]+)")
            + " / "
            + grab(fan, r"cost of 4 replicas:\s+(-?[\d.]+)"),
            "0 replicas",
            "4 replicas <= 0.15",
            verdict(fan, "target 4 replicas"),
        ),
        Row(
            "primary VmRSS before / peak, replica stalled",
            rss,
            anon,
            grab(stall, r"^target primary memory bounded while a replica is stalled \((.*)\):"),
            verdict(stall, "target primary memory bounded"),
        ),
        Row(
            "stopped replica's connection, as the primary saw it",
            "dropped "
            + grab(stall, r"primary dropped the stopped replica's connection ([\d.]+ s) after")
            + " after SIGSTOP"
            if "dropped the stopped" in stall
            else "kept throughout",
            "",
            "",
            "",
        ),
        Row(
            "stalled replica's catch-up after SIGCONT",
            grab(stall, r"\) ([\d.]+ s) after SIGCONT"),
            grab(stall, r"caught up \(([\d,]+) entries behind") + " entries behind",
            "",
            "",
        ),
        Row(
            "lag over time (this report), p50 / p99",
            f"{percentile(lag_ms, 50):.2f} / {percentile(lag_ms, 99):.2f} ms",
            f"{lag.written_rate:,.0f} entries/s written",
            "(p99 <= 10 ms, as replication_bench)",
            "",
        ),
        Row(
            "catch-up progress (this report)",
            f"{cu.progress.rate:,.0f} entries/s" if cu.progress.rate else "n/a",
            f"{cu.n:,} entries behind, done {cu.progress.done_s(cu.n):.2f} s after launch",
            "",
            "",
        ),
        Row("catch-up by codec x frame: best", combo(best), "", "", ""),
        Row("catch-up by codec x frame: worst", combo(worst), "", "", ""),
    ]


def write_report(
    out: Path,
    command: str,
    total_s: float,
    runs: dict[str, BenchRun],
    lag: LagSeries,
    cu: CatchupSeries,
    quick: bool,
) -> None:
    lines = ["# kevo-repl benchmark report", ""]
    if quick:
        lines += ["**Quick run: sizes too small for any figure or target to mean anything.**", ""]
    lines += [f"Command: `{command}` (took {total_s:.0f} s in all)", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine()]
    lines += [
        "",
        "The benches run real node processes on 127.0.0.1 beside the client, all on these CPUs;",
        "the machine may be shared with other work.",
        "",
        "## Headline figures",
        "",
        "Every figure and its reference come from this run.",
        "",
        "| figure | this run | reference / limit (same run) | target | result |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.figure} | {r.value} | {r.limit} | {r.target} | {r.verdict} |"
        for r in headline(runs, lag, cu)
    ]
    lines += ["", "## Plots", ""]
    lines += [
        "Lag over time: a primary and a replica, BatchWrites of 100 every 5 ms; the time from each",
        "sampled batch's acknowledgement on the primary to its last key being readable on the",
        "replica, and the lag in entries the primary's status reported every 0.1 s.",
        "",
        "![lag over time](lag_over_time.png)",
        "",
        f"Catch-up progress: a new replica whose slot is {cu.n:,} entries behind, its applied",
        "sequence every 50 ms from the moment its process was launched (the rate counts from its",
        "first answer, minus what it had applied by then).",
        "",
        "![catch-up progress](catchup_progress.png)",
        "",
        f"Throughput by codec and frame size: a new replica catching up the same {cu.n:,}",
        "entries (one entry per WAL unit) from sequence 1, per replica codec and primary frame",
        "size, measured as the catch-up progress above.",
        "",
        "![throughput by codec](throughput_by_codec.png)",
        "",
        "| frame bytes | " + " | ".join(CODECS) + " |",
        "|---|" + "---|" * len(CODECS),
    ]
    for frame in FRAME_SIZES:
        cells = [cu.by_codec.get((frame, c)) for c in CODECS]
        shown = [f"{r:,.0f}" if r else "n/a" for r in cells]
        lines.append(f"| {frame // 1024} KiB | " + " | ".join(shown) + " |")
    lines += ["", "(entries/s; the series are in the CSV files beside this report)", ""]
    lines += ["## Bench outputs", ""]
    for run in runs.values():
        lines += [f"### `{run.command}`", "", f"Took {run.seconds:.1f} s, exit code {run.code}."]
        lines += ["", "```text", run.stdout.rstrip(), "```", ""]
        if run.code != 0 and run.stderr.strip():
            lines += ["stderr:", "", "```text", run.stderr.rstrip()[-5000:], "```", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="report folder (default: bench/out/<timestamp>)")
    parser.add_argument("--quick", action="store_true", help="every bench in --quick mode")
    args = parser.parse_args()
    started = time.perf_counter()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else HERE / "out" / stamp
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "bench/report.py", *sys.argv[1:]])
    runs = {script: run_bench(script, args.quick) for script in BENCHES}
    lag_s, n = (2.0, 20_000) if args.quick else (15.0, 500_000)
    root = tempfile.mkdtemp(prefix="report-bench-")
    try:
        print(f"lag over time: {lag_s:g} s at 20,000 entries/s ...", flush=True)
        lag = lag_over_time(root, lag_s)
        print(f"catch-up progress and codec x frame size: {n:,} entries ...", flush=True)
        cu = catchup_and_codecs(root, n)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    plot_lag(lag, out / "lag_over_time.png")
    plot_catchup(cu, out / "catchup_progress.png")
    plot_codecs(cu, out / "throughput_by_codec.png")
    write_csvs(out, lag, cu)
    total = time.perf_counter() - started
    write_report(out, command, total, runs, lag, cu, args.quick)
    print(f"report written to {out / 'report.md'} in {total:.0f} s")
    failed = [r.script for r in runs.values() if r.code != 0]
    if failed:
        print(f"benches that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
