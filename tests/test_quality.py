"""The project's own standards, enforced as tests: lint, format, strict typing, runnable benches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_ruff_check() -> None:
    result = _run("-m", "ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = _run("-m", "ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_strict() -> None:
    result = _run("-m", "mypy", "kevo_repl", "tests", "bench", "proto")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "bench").glob("*_bench.py")))
def test_bench_runs_quick(script: str) -> None:
    result = _run(f"bench/{script}", "--quick")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "target" in result.stdout


def test_pure_cores_import_no_io_machinery() -> None:
    """The codecs, the tail window and the replica state machine load without asyncio, gRPC,
    sqlite3 or the WAL's file machinery (a fresh interpreter, so nothing is loaded already)."""
    pure = [
        "kevo_repl.wal.codec",
        "kevo_repl.wal.tail",
        "kevo_repl.repl.frames",
        "kevo_repl.repl.replica_state",
        "kevo_repl.repl.progress",
        "kevo_repl.repl.slots",
        "kevo_repl.repl.history",
    ]
    banned = ["asyncio", "grpc", "sqlite3", "fcntl", "kevo_repl.wal.log", "kevo_repl.fsutil"]
    code = (
        "import importlib, sys\n"
        f"for m in {pure!r}: importlib.import_module(m)\n"
        f"print([m for m in {banned!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
