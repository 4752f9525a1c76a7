"""Start `kevo-repl serve` subprocesses on 127.0.0.1: shared by the demo and the benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import grpc

from kevo_repl.errors import KevoReplError

# The directory holding the kevo_repl package, so a child finds the same code (installed or not).
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class NodeStartError(KevoReplError):
    """A node subprocess did not come up."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_READY_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 50),
]


def start_node(
    data_dir: str,
    addr: str,
    *extra: str,
    timeout_s: float = 60.0,
    stderr: IO[bytes] | None = None,
    cpus: frozenset[int] | None = None,
) -> subprocess.Popen[bytes]:
    """`kevo-repl serve --data-dir DATA --listen ADDR EXTRA...`, returned once it accepts calls.

    Its log goes to `stderr` (default: ours). `cpus`: the only CPUs it (and all its threads) may
    run on, set in the child before it starts (benchmarks keep nodes off each other's cores)."""
    cmd = [sys.executable, "-m", "kevo_repl.cli", "serve", "--data-dir", data_dir, "--listen", addr]
    env = {**os.environ, "PYTHONPATH": _PACKAGE_ROOT}
    node = subprocess.Popen(
        [*cmd, "--log-level", "warning", *extra],
        env=env,
        stderr=stderr,
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
    )
    # Retry the connection every 50 ms: gRPC's default first backoff of 1 s would report the
    # node ready up to a second late (and skew timings taken from this moment).
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(addr, options=_READY_OPTIONS) as channel:
        ready = grpc.channel_ready_future(channel)
        while True:
            try:
                ready.result(timeout=0.2)
                return node
            except grpc.FutureTimeoutError:
                pass
            if node.poll() is not None:  # it exited (bad flag, port taken): say so at once
                raise NodeStartError(f"the node for {addr} exited with code {node.returncode}")
            if time.monotonic() > deadline:
                node.kill()
                node.wait()
                raise NodeStartError(f"the node did not start on {addr} within {timeout_s}s")
