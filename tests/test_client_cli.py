"""`kevo-repl put|get|delete|scan --addr`: the shell client against a real node."""

from __future__ import annotations

from pathlib import Path

from nodeproc import NodeProcess, free_port, run_cli


def test_put_get_scan_delete_through_the_cli(tmp_path: Path) -> None:
    port = free_port()
    addr = f"127.0.0.1:{port}"
    with NodeProcess(tmp_path / "node", port):
        assert run_cli("put", "--addr", addr, "user:1", "alice").returncode == 0
        assert run_cli("put", "--addr", addr, "user:2", "bob", "--sync").returncode == 0
        assert run_cli("put", "--addr", addr, "zeta", "z").returncode == 0
        got = run_cli("get", "--addr", addr, "user:1")
        assert (got.returncode, got.stdout) == (0, "alice\n")
        scan = run_cli("scan", "--addr", addr, "--prefix", "user:")
        assert scan.stdout.splitlines() == ["user:1\talice", "user:2\tbob"]
        ranged = run_cli("scan", "--addr", addr, "--start", "user:2", "--end", "zz", "--limit", "1")
        assert ranged.stdout.splitlines() == ["user:2\tbob"]
        assert run_cli("delete", "--addr", addr, "user:1").returncode == 0
        missing = run_cli("get", "--addr", addr, "user:1")
        assert missing.returncode == 1 and "not found: user:1" in missing.stderr
        bad = run_cli("scan", "--addr", addr, "--start", "b", "--end", "a")
        assert bad.returncode == 1
        assert "INVALID_ARGUMENT: scan start_key must sort before end_key" in bad.stderr
        empty = run_cli("put", "--addr", addr, "", "x")
        assert empty.returncode == 1 and "INVALID_ARGUMENT: invalid key size 0" in empty.stderr


def test_cli_reports_an_unreachable_node() -> None:
    result = run_cli("get", "--addr", f"127.0.0.1:{free_port()}", "k")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
