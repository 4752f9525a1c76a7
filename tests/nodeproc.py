"""Run a real `kevo-repl serve` node in a subprocess, for tests that talk to it over gRPC.

`NodeProcess(data_dir, port, *extra_args)` starts the node on 127.0.0.1:port and returns once the
port answers gRPC health checks; `.stop()` sends SIGTERM and returns the exit code, `.kill()` sends
SIGKILL. It is a context manager whose exit stops the node (killing it if it does not stop in
time), so a fixture can `with NodeProcess(...) as node: yield node`.

Helpers shared by the cluster tests: `digest(node)` / `wait_same(a, b)` compare stores over gRPC,
`write_batches(node, tag, count)` fills a node, `run_cli(...)` runs the `kevo-repl` CLI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kevo_repl.localnode import free_port as free_port  # re-exported: tests import it from here
from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.proto import service_pb2 as pb
from kevo_repl.proto import service_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0


def node_env() -> dict[str, str]:
    """The environment for a node subprocess: the repository root first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_cli(
    *args: str, timeout: float = 30.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m kevo_repl.cli ARGS` to completion (for commands that exit by themselves).

    `env` is merged over `node_env()`."""
    return subprocess.run(
        [sys.executable, "-m", "kevo_repl.cli", *args],
        cwd=REPO,
        env={**node_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class NodeError(RuntimeError):
    """The node process died or never became ready."""


class NodeProcess:
    """One `kevo-repl serve` subprocess listening on 127.0.0.1:port."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int,
        *extra_args: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.extra_env = env or {}
        self._setup(
            ["--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}", *extra_args],
            port,
            str(data_dir),
        )

    @classmethod
    def from_args(cls, serve_args: list[str], port: int, data_dir: str = "") -> NodeProcess:
        """`kevo-repl serve SERVE_ARGS` (e.g. only `--config FILE`) that listens on `port`."""
        node = cls.__new__(cls)
        node.extra_env = {}
        node._setup(serve_args, port, data_dir)
        return node

    def _setup(self, serve_args: list[str], port: int, data_dir: str) -> None:
        self.data_dir = data_dir
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.args = [sys.executable, "-m", "kevo_repl.cli", "serve", *serve_args]
        # stderr goes to a file, not a pipe: a chatty node must never block on a full pipe.
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise NodeError("node already running")
        self._stderr.seek(0)
        self._stderr.truncate()
        self.proc = subprocess.Popen(
            self.args,
            cwd=REPO,
            env={**node_env(), **self.extra_env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                code = self.poll()
                if code is not None:
                    raise NodeError(f"node exited with {code} before serving:\n{self.stderr()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NodeError(
                        f"node not serving on {self.address} after {START_TIMEOUT_S}s:\n"
                        f"{self.stderr()}"
                    )
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=min(1.0, left))
                except grpc.RpcError:
                    time.sleep(0.05)
                    continue
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                time.sleep(0.05)

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise NodeError("node not started")
        return self.proc.pid

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILL after `timeout`, then raises)."""
        proc = self.proc
        if proc is None:
            raise NodeError("node not started")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise NodeError(f"node ignored SIGTERM for {timeout}s:\n{self.stderr()}") from None
        return proc.returncode

    def kill(self) -> int:
        """SIGKILL and wait; returns the exit code (-9 unless it had exited already)."""
        proc = self.proc
        if proc is None:
            raise NodeError("node not started")
        if proc.poll() is None:
            proc.kill()
        return proc.wait()

    def stderr(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def close(self) -> None:
        """Stop the node if it still runs (killing it if SIGTERM does not work) and clean up."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                with contextlib.suppress(NodeError):  # stop() killed it already
                    self.stop()
        finally:
            self._stderr.close()

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def channel(self, **options: Any) -> grpc.Channel:
        """A new insecure channel to the node; keyword options become channel options."""
        return grpc.insecure_channel(
            self.address, options=[(f"grpc.{k}", v) for k, v in options.items()]
        )


def kevo_stub(channel: grpc.Channel) -> Any:
    """A raw `kevo.KevoService` stub (the generated module is untyped)."""
    return pb_grpc.KevoServiceStub(channel)  # type: ignore[no-untyped-call]


def store_digest(node: NodeProcess) -> rpb.StoreDigest:
    """The node's GetDigest answer (what `kevo-repl digest` prints), straight over gRPC."""
    with node.channel() as channel:
        stub = rpb_grpc.WALReplicationServiceStub(channel)  # type: ignore[no-untyped-call]
        reply: rpb.StoreDigest = stub.GetDigest(rpb.DigestRequest(), timeout=30)
        return reply


def digest(node: NodeProcess) -> tuple[int, str]:
    """(applied sequence, sha256 of the store): equal on two nodes holding the same data."""
    d = store_digest(node)
    return d.applied_sequence, d.sha256


def wait_same(a: NodeProcess, b: NodeProcess, timeout: float = 30.0) -> None:
    """Wait until `b`'s digest equals `a`'s (b is typically a replica of a)."""
    deadline = time.monotonic() + timeout
    while digest(a) != digest(b):
        assert time.monotonic() < deadline, (
            f"{b.address} did not converge with {a.address} in {timeout} s:\n{b.stderr()[-3000:]}"
        )
        time.sleep(0.1)


def write_batches(node: NodeProcess, tag: str, count: int, batch: int = 1000) -> None:
    """`count` puts of 60-byte values under keys `TAG:0000000`..., `batch` to a BatchWrite."""
    with node.channel() as channel:
        stub = pb_grpc.KevoServiceStub(channel)  # type: ignore[no-untyped-call]
        for start in range(0, count, batch):
            ops = [
                pb.Operation(
                    type=pb.Operation.PUT, key=b"%s:%07d" % (tag.encode(), i), value=b"v" * 60
                )
                for i in range(start, min(start + batch, count))
            ]
            stub.BatchWrite(pb.BatchWriteRequest(operations=ops), timeout=30)
