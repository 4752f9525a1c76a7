"""README's first quick-start command: `kevo-repl demo` must work and show what it claims."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_and_shows_recovery(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kevo_repl.cli", "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "4000 durable appends" in out
    assert "recovery cut 14 torn bytes" in out
    assert "recovered: last seq 4004, next seq 4005" in out
    assert "wal verify: exit 0" in out
    assert "after restart: 110 keys (expected 110), key_count 110" in out
