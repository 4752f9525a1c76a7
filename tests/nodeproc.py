"""Run a real `kevo-repl serve` node in a subprocess, for tests that talk to it over gRPC.

`NodeProcess(data_dir, port, *extra_args)` starts the node on 127.0.0.1:port and returns once the
port answers gRPC health checks; `.stop()` sends SIGTERM and returns the exit code, `.kill()` sends
SIGKILL. It is a context manager whose exit stops the node (killing it if it does not stop in
time), so a fixture can `with NodeProcess(...) as node: yield node`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def node_env() -> dict[str, str]:
    """The environment for a node subprocess: the repository root first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `python -m kevo_repl.cli ARGS` to completion (for commands that exit by themselves)."""
    return subprocess.run(
        [sys.executable, "-m", "kevo_repl.cli", *args],
        cwd=REPO,
        env=node_env(),
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
    from kevo_repl.proto import service_pb2_grpc

    return service_pb2_grpc.KevoServiceStub(channel)  # type: ignore[no-untyped-call]
