"""`kevo-repl put|get|delete|scan --addr`: the shell client against a real node."""

from __future__ import annotations

from pathlib import Path

from nodeproc import NodeProcess, free_port, run_cli

from kevo_repl.client_cli import format_status
from kevo_repl.proto import replication_pb2 as rpb


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


def test_status_shows_bootstrap_progress_on_both_sides() -> None:
    replica = rpb.ReplicationStatus(
        role="replica",
        primary_address="127.0.0.1:1",
        state="BOOTSTRAPPING",
        bootstrap_bytes=3_000_000,
        bootstrap_total_bytes=12_000_000,
        apply_rate=1_500_000,
        eta_seconds=6,
        history_id="0123456789abcdef",
    )
    text = format_status(replica, as_json=False)
    assert "history 0123456789ab" in text
    assert "state BOOTSTRAPPING, snapshot 3.0 of about 12.0 MB, 1.5 MB/s, done in about 6 s" in text
    primary = rpb.ReplicationStatus(
        role="primary",
        replicas=[
            rpb.ReplicaStatus(
                node_id="n1", state="bootstrapping", bootstrap_bytes=0, bootstrap_total_bytes=5
            )
        ],
    )
    assert "replica n1: bootstrapping; snapshot 0.0 of about 0.0 MB" in format_status(
        primary, as_json=False
    )
    assert '"bootstrap_total_bytes": "5"' in format_status(primary, as_json=True)


def test_bytes_that_are_not_utf8_and_a_limit_out_of_range_are_handled(tmp_path: Path) -> None:
    out_of_range = run_cli("scan", "--addr", "127.0.0.1:1", "--limit", "3000000000")
    assert out_of_range.returncode == 2 and "limit out of range" in out_of_range.stderr
    port = free_port()
    addr = f"127.0.0.1:{port}"
    with NodeProcess(tmp_path / "node", port):
        key = "k\udcff"  # the byte 0xff on the command line, as os.fsdecode gives it
        assert run_cli("put", "--addr", addr, key, "v").returncode == 0
        got = run_cli("get", "--addr", addr, key)
        assert (got.returncode, got.stdout) == (0, "v\n"), got.stderr
        assert "Traceback" not in got.stderr
