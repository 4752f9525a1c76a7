"""README's first quick-start command: `kevo-repl demo` must work and show what it claims."""

from __future__ import annotations

from pathlib import Path

import pytest
from nodeproc import run_cli


def _demo(tmp_path: Path, *extra: str) -> str:
    result = run_cli("demo", "--dir", str(tmp_path), *extra, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_cluster_demo_replicates_and_catches_up(tmp_path: Path) -> None:
    out = _demo(tmp_path)
    assert out.count("all three nodes hold the same data") == 2
    assert "NOT CONVERGED" not in out
    assert out.count(": 2020 keys, digest ") == 3  # the killed replica caught up
    assert "FAILED_PRECONDITION: this node is a read-only replica; primary node at" in out
    assert out.count("lag 0 entries") == 2


@pytest.mark.slow
def test_wal_demo_shows_recovery(tmp_path: Path) -> None:
    out = _demo(tmp_path, "--wal")
    assert "4000 durable appends" in out
    assert "recovery cut 14 torn bytes" in out
    assert "recovered: last seq 4004, next seq 4005" in out
    assert "wal verify: exit 0" in out
