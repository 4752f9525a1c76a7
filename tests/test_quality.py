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
