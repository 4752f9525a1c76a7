"""Bad input to a real node: precise gRPC status codes and messages, and the `serve` CLI's exits.

KevoService maps a malformed request to INVALID_ARGUMENT and a transaction problem to
FAILED_PRECONDITION (never NOT_FOUND, which the SDK reads as a missing key); `kevo-repl serve`
exits 2 for a bad flag or config, 3 when it cannot listen and 4 when the data dir is in use.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from nodeproc import NodeProcess, free_port, kevo_stub, run_cli

from kevo_repl.proto import service_pb2 as pb

MiB = 1024 * 1024
VALUE_MAX = 10 * MiB


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path_factory.mktemp("bad-input-node"), free_port()) as proc:
        yield proc
        assert proc.poll() is None, f"the node died:\n{proc.stderr()}"
        assert proc.stop() == 0, proc.stderr()


@pytest.fixture(scope="module")
def stub(node: NodeProcess) -> Iterator[Any]:
    # Large enough for a value over the node's limit and a 1001-operation batch.
    with node.channel(max_send_message_length=64 * MiB, max_receive_message_length=64 * MiB) as ch:
        yield kevo_stub(ch)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    """The error `call` raises (streams are drained, so their errors surface too)."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    return info.value


def assert_status(call: Callable[[], Any], code: grpc.StatusCode, message: str) -> None:
    err = rpc_error(call)
    details = err.details() or ""
    assert err.code() == code, f"{err.code()}: {details}"
    assert re.search(message, details), details


def begin(stub: Any, read_only: bool = False) -> str:
    reply = stub.BeginTransaction(pb.BeginTransactionRequest(read_only=read_only), timeout=10)
    tx_id: str = reply.transaction_id
    return tx_id


BAD_KEYS = [pytest.param(b"", id="empty"), pytest.param(b"k" * 512, id="512-bytes")]


# ---------------------------------------------------------------------- keys and values


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_key_single_key_rpcs(stub: Any, key: bytes) -> None:
    message = rf"^invalid key size {len(key)}: keys must be 1\.\.511 bytes$"
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert_status(lambda: stub.Get(pb.GetRequest(key=key), timeout=10), invalid, message)
    assert_status(
        lambda: stub.Put(pb.PutRequest(key=key, value=b"v"), timeout=10), invalid, message
    )
    assert_status(lambda: stub.Delete(pb.DeleteRequest(key=key), timeout=10), invalid, message)
    batch = pb.BatchWriteRequest(
        operations=[
            pb.Operation(type=pb.Operation.PUT, key=b"badkey/ok", value=b"v"),
            pb.Operation(type=pb.Operation.PUT, key=key, value=b"v"),
        ]
    )
    assert_status(lambda: stub.BatchWrite(batch, timeout=10), invalid, message)
    # The batch was rejected whole.
    assert stub.Get(pb.GetRequest(key=b"badkey/ok"), timeout=10).found is False


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_key_transaction_rpcs(stub: Any, key: bytes) -> None:
    message = rf"^invalid key size {len(key)}: keys must be 1\.\.511 bytes$"
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    tx = begin(stub)
    assert_status(
        lambda: stub.TxGet(pb.TxGetRequest(transaction_id=tx, key=key), timeout=10),
        invalid,
        message,
    )
    assert_status(
        lambda: stub.TxPut(pb.TxPutRequest(transaction_id=tx, key=key, value=b"v"), timeout=10),
        invalid,
        message,
    )
    assert_status(
        lambda: stub.TxDelete(pb.TxDeleteRequest(transaction_id=tx, key=key), timeout=10),
        invalid,
        message,
    )
    # Unlike Kevo (which drops the transaction on a bad TxGet key), the transaction lives on.
    key_ok = b"badtxkey/%d" % len(key)
    stub.TxPut(pb.TxPutRequest(transaction_id=tx, key=key_ok, value=b"v"), timeout=10)
    assert stub.TxGet(pb.TxGetRequest(transaction_id=tx, key=key_ok), timeout=10).found
    assert stub.CommitTransaction(pb.CommitTransactionRequest(transaction_id=tx), timeout=10)
    assert stub.Get(pb.GetRequest(key=key_ok), timeout=10).value == b"v"


def test_value_limit(stub: Any) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    message = rf"^value too large: {VALUE_MAX + 1} bytes, the limit is {VALUE_MAX}$"
    too_big = b"x" * (VALUE_MAX + 1)
    assert_status(
        lambda: stub.Put(pb.PutRequest(key=b"vlimit/k", value=too_big), timeout=60),
        invalid,
        message,
    )
    batch = pb.BatchWriteRequest(
        operations=[pb.Operation(type=pb.Operation.PUT, key=b"vlimit/b", value=too_big)]
    )
    assert_status(lambda: stub.BatchWrite(batch, timeout=60), invalid, message)
    tx = begin(stub)
    assert_status(
        lambda: stub.TxPut(
            pb.TxPutRequest(transaction_id=tx, key=b"vlimit/t", value=too_big), timeout=60
        ),
        invalid,
        message,
    )
    stub.RollbackTransaction(pb.RollbackTransactionRequest(transaction_id=tx), timeout=10)
    for key in (b"vlimit/k", b"vlimit/b", b"vlimit/t"):
        assert stub.Get(pb.GetRequest(key=key), timeout=10).found is False
    # Exactly the limit is fine.
    exact = b"y" * VALUE_MAX
    assert stub.Put(pb.PutRequest(key=b"vlimit/exact", value=exact), timeout=60).success
    got = stub.Get(pb.GetRequest(key=b"vlimit/exact"), timeout=60)
    assert got.found and got.value == exact


def test_batch_limit(stub: Any) -> None:
    def ops(n: int) -> list[pb.Operation]:
        return [
            pb.Operation(type=pb.Operation.PUT, key=b"blimit/%04d" % i, value=b"v")
            for i in range(n)
        ]

    assert_status(
        lambda: stub.BatchWrite(pb.BatchWriteRequest(operations=ops(1001)), timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"^batch size exceeds maximum allowed \(1000\): 1001 operations$",
    )
    assert list(stub.Scan(pb.ScanRequest(prefix=b"blimit/"), timeout=30)) == []
    assert stub.BatchWrite(pb.BatchWriteRequest(operations=ops(1000)), timeout=30).success
    assert len(list(stub.Scan(pb.ScanRequest(prefix=b"blimit/"), timeout=30))) == 1000
    # An empty batch succeeds and writes nothing.
    assert stub.BatchWrite(pb.BatchWriteRequest(), timeout=10).success


def test_huge_batch_is_refused_before_any_work(stub: Any) -> None:
    """Hundreds of thousands of empty operations fit one message; they are counted first."""
    batch = pb.BatchWriteRequest(operations=[pb.Operation()] * 300_000)
    assert_status(
        lambda: stub.BatchWrite(batch, timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"^batch size exceeds maximum allowed \(1000\): 300000 operations$",
    )


def test_huge_transaction_id_keeps_its_status(stub: Any) -> None:
    """The id is quoted in the message; a 20 KB one must not overflow the trailer."""
    tx = "tx-rw-" + "x" * 20_000
    assert_status(
        lambda: stub.TxGet(pb.TxGetRequest(transaction_id=tx, key=b"k"), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION,
        r"^transaction not found: tx-rw-x+\.\.\. \(cut\)$",
    )


def test_unknown_batch_operation_type(stub: Any) -> None:
    batch = pb.BatchWriteRequest(
        operations=[
            pb.Operation(type=pb.Operation.PUT, key=b"badop/a", value=b"v"),
            pb.Operation(type=7, key=b"badop/b", value=b"v"),  # type: ignore[arg-type]
        ]
    )
    assert_status(
        lambda: stub.BatchWrite(batch, timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"^unknown operation type 7 at index 1$",
    )
    assert stub.Get(pb.GetRequest(key=b"badop/a"), timeout=10).found is False


# ---------------------------------------------------------------------- transactions


@pytest.mark.parametrize("tx", ["tx-rw-nosuch-1", "tx-ro-nosuch-1", "tx-1", ""])
def test_unknown_transaction_id(stub: Any, tx: str) -> None:
    failed = grpc.StatusCode.FAILED_PRECONDITION
    message = rf"^transaction not found: {re.escape(tx)}$"
    assert_status(
        lambda: stub.TxGet(pb.TxGetRequest(transaction_id=tx, key=b"k"), timeout=10),
        failed,
        message,
    )
    assert_status(
        lambda: stub.TxPut(pb.TxPutRequest(transaction_id=tx, key=b"k", value=b"v"), timeout=10),
        failed,
        message,
    )
    assert_status(
        lambda: stub.TxDelete(pb.TxDeleteRequest(transaction_id=tx, key=b"k"), timeout=10),
        failed,
        message,
    )
    assert_status(
        lambda: stub.TxScan(pb.TxScanRequest(transaction_id=tx), timeout=10), failed, message
    )
    assert stub.Get(pb.GetRequest(key=b"k"), timeout=10).found is False


def test_read_only_transaction_rejects_writes(stub: Any) -> None:
    tx = begin(stub, read_only=True)
    assert tx.startswith("tx-ro-")
    assert_status(
        lambda: stub.TxPut(
            pb.TxPutRequest(transaction_id=tx, key=b"rotx/k", value=b"v"), timeout=10
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        rf"^cannot write to read-only transaction {re.escape(tx)}$",
    )
    assert_status(
        lambda: stub.TxDelete(pb.TxDeleteRequest(transaction_id=tx, key=b"rotx/k"), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION,
        rf"^cannot delete in read-only transaction {re.escape(tx)}$",
    )
    # Still usable for reads, and commits.
    assert stub.TxGet(pb.TxGetRequest(transaction_id=tx, key=b"rotx/k"), timeout=10).found is False
    assert stub.CommitTransaction(pb.CommitTransactionRequest(transaction_id=tx), timeout=10)
    assert stub.Get(pb.GetRequest(key=b"rotx/k"), timeout=10).found is False


def test_commit_and_rollback_of_unknown_ids(stub: Any) -> None:
    # The SDK may send a read-only commit to a node that never saw it: that must succeed.
    ok = stub.CommitTransaction(pb.CommitTransactionRequest(transaction_id="tx-ro-xxx"), timeout=10)
    assert ok.success is True
    ok = stub.RollbackTransaction(
        pb.RollbackTransactionRequest(transaction_id="tx-ro-xxx"), timeout=10
    )
    assert ok.success is True
    for call in (
        lambda: stub.CommitTransaction(
            pb.CommitTransactionRequest(transaction_id="tx-rw-xxx"), timeout=10
        ),
        lambda: stub.RollbackTransaction(
            pb.RollbackTransactionRequest(transaction_id="tx-rw-xxx"), timeout=10
        ),
    ):
        assert_status(
            call,
            grpc.StatusCode.FAILED_PRECONDITION,
            r"^transaction not found or already finished: tx-rw-xxx$",
        )


def test_commit_twice(stub: Any) -> None:
    tx = begin(stub)
    stub.TxPut(pb.TxPutRequest(transaction_id=tx, key=b"twice/k", value=b"1"), timeout=10)
    assert stub.CommitTransaction(pb.CommitTransactionRequest(transaction_id=tx), timeout=10)
    assert_status(
        lambda: stub.CommitTransaction(pb.CommitTransactionRequest(transaction_id=tx), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION,
        rf"^transaction not found or already finished: {re.escape(tx)}$",
    )
    assert_status(
        lambda: stub.RollbackTransaction(
            pb.RollbackTransactionRequest(transaction_id=tx), timeout=10
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "transaction not found or already finished",
    )
    assert stub.Get(pb.GetRequest(key=b"twice/k"), timeout=10).value == b"1"


def test_transaction_byte_limit_counts_buffered_bytes_not_rewrites(stub: Any) -> None:
    tx = begin(stub)
    value = b"r" * VALUE_MAX
    try:
        for _ in range(7):  # 70 MiB sent, one 10 MiB value buffered
            stub.TxPut(
                pb.TxPutRequest(transaction_id=tx, key=b"rewrite/k", value=value), timeout=60
            )
    finally:
        stub.RollbackTransaction(pb.RollbackTransactionRequest(transaction_id=tx), timeout=10)


def test_transaction_byte_limit(stub: Any) -> None:
    tx = begin(stub)
    value = b"L" * VALUE_MAX
    for i in range(6):  # 60 MiB of distinct keys
        stub.TxPut(pb.TxPutRequest(transaction_id=tx, key=b"txbig/%d" % i, value=value), timeout=60)
    assert_status(
        lambda: stub.TxPut(
            pb.TxPutRequest(transaction_id=tx, key=b"txbig/6", value=value), timeout=60
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        rf"^transaction {re.escape(tx)} exceeds 67108864 buffered bytes$",
    )
    assert stub.RollbackTransaction(pb.RollbackTransactionRequest(transaction_id=tx), timeout=10)
    assert list(stub.Scan(pb.ScanRequest(prefix=b"txbig/"), timeout=10)) == []


# ---------------------------------------------------------------------- scans


SCAN_CASES = [
    pytest.param(
        {"start_key": b"b", "end_key": b"a"},
        "scan start_key must sort before end_key",
        id="start>end",
    ),
    pytest.param(
        {"start_key": b"a", "end_key": b"a"},
        "scan start_key must sort before end_key",
        id="start=end",
    ),
    pytest.param(
        {"prefix": b"p", "start_key": b"a"},
        "a prefix or suffix scan does not take start_key/end_key",
        id="prefix+start",
    ),
    pytest.param(
        {"prefix": b"p", "end_key": b"z"},
        "a prefix or suffix scan does not take start_key/end_key",
        id="prefix+end",
    ),
    pytest.param({"limit": -1}, "scan limit must not be negative: -1", id="negative-limit"),
]


@pytest.mark.parametrize(("fields", "message"), SCAN_CASES)
def test_bad_scan(stub: Any, fields: dict[str, Any], message: str) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert_status(
        lambda: stub.Scan(pb.ScanRequest(**fields), timeout=10), invalid, f"^{re.escape(message)}$"
    )
    tx = begin(stub, read_only=True)
    assert_status(
        lambda: stub.TxScan(pb.TxScanRequest(transaction_id=tx, **fields), timeout=10),
        invalid,
        f"^{re.escape(message)}$",
    )
    stub.RollbackTransaction(pb.RollbackTransactionRequest(transaction_id=tx), timeout=10)


def test_scan_with_overlong_start_key_is_fine(stub: Any) -> None:
    # Bounds are not keys: a start key longer than any stored key is legal and just sorts.
    stub.Put(pb.PutRequest(key=b"zzlong/a", value=b"1"), timeout=10)
    stub.Put(pb.PutRequest(key=b"zzlong/b", value=b"2"), timeout=10)
    start = b"zzlong/a" + b"\xff" * 600
    rows = list(stub.Scan(pb.ScanRequest(start_key=start, end_key=b"zzlong/c"), timeout=10))
    assert [(r.key, r.value) for r in rows] == [(b"zzlong/b", b"2")]


def test_too_many_open_transactions(stub: Any) -> None:
    opened: list[str] = []
    try:
        for _ in range(1024 + 1):
            try:
                opened.append(begin(stub, read_only=True))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                assert "too many open transactions (1024)" in (err.details() or "")
                break
        else:
            pytest.fail("1025 transactions were opened")
        # Earlier tests may have left a few open (they expire after 30 s idle).
        assert 1000 <= len(opened) <= 1024
    finally:
        for tx in opened:
            stub.RollbackTransaction(pb.RollbackTransactionRequest(transaction_id=tx), timeout=10)
    begin(stub)  # room again


# ---------------------------------------------------------------------- still serving


def test_zz_node_still_serves_after_bad_input(node: NodeProcess, stub: Any) -> None:
    assert node.poll() is None, node.stderr()
    assert stub.Put(pb.PutRequest(key=b"after/k", value=b"fine", sync=True), timeout=10).success
    reply = stub.Get(pb.GetRequest(key=b"after/k"), timeout=10)
    assert (reply.found, reply.value) == (True, b"fine")
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=10)
    assert sum(stats.error_counts.values()) > 0  # the rejections above were counted
    assert "Traceback" not in node.stderr()


# ---------------------------------------------------------------------- the serve CLI


def serve(*args: str) -> Any:
    return run_cli("serve", *args)


def test_cli_bad_sync_mode(tmp_path: Path) -> None:
    r = serve("--data-dir", str(tmp_path), "--listen", "127.0.0.1:1", "--sync-mode", "fast")
    assert r.returncode == 2, r.stderr
    assert "sync_mode must be none, batch or immediate" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "store").exists()  # nothing was created


def test_cli_bad_listen_address(tmp_path: Path) -> None:
    r = serve("--data-dir", str(tmp_path), "--listen", "127.0.0.1:port")
    assert r.returncode == 2, r.stderr
    assert "expected HOST:PORT" in r.stderr


def test_cli_missing_data_dir() -> None:
    r = serve("--listen", "127.0.0.1:1")
    assert r.returncode == 2, r.stderr
    assert "data_dir is required" in r.stderr


def test_cli_unknown_flag(tmp_path: Path) -> None:
    r = serve("--data-dir", str(tmp_path), "--no-such-flag")
    assert r.returncode == 2, r.stderr
    assert "--no-such-flag" in r.stderr


def test_cli_bad_log_level(tmp_path: Path) -> None:
    r = serve("--data-dir", str(tmp_path), "--listen", "127.0.0.1:1", "--log-level", "loud")
    assert r.returncode == 2, r.stderr
    assert "log_level" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_config_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    r = serve("--config", str(missing))
    assert r.returncode == 2, r.stderr
    assert f"cannot read config file {missing}" in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a mode-000 file")
def test_cli_config_file_unreadable(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{tmp_path}"\n')
    config.chmod(0)
    r = serve("--config", str(config))
    assert r.returncode == 2, r.stderr
    assert "cannot read config file" in r.stderr


def test_cli_config_file_is_a_directory(tmp_path: Path) -> None:
    r = serve("--config", str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert "cannot read config file" in r.stderr


def test_cli_config_file_invalid_toml(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('data_dir = "unterminated\n')
    r = serve("--config", str(config))
    assert r.returncode == 2, r.stderr
    assert f"config file {config} is not valid TOML" in r.stderr


def test_cli_config_file_not_utf8(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_bytes(b'data_dir = "/tmp/\xff"\n')
    r = serve("--config", str(config))
    assert r.returncode == 2, r.stderr
    assert f"config file {config}" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_config_file_unknown_key(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{tmp_path}"\nsync_mod = "none"\n')
    r = serve("--config", str(config))
    assert r.returncode == 2, r.stderr
    assert "unknown setting 'sync_mod'" in r.stderr
    assert str(config) in r.stderr


def test_cli_config_file_wrong_type(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{tmp_path}"\nsync_bytes = "lots"\n')
    r = serve("--config", str(config))
    assert r.returncode == 2, r.stderr
    assert "sync_bytes must be int" in r.stderr


def test_cli_data_dir_in_use(node: NodeProcess, stub: Any) -> None:
    """A second node on a running node's data directory is refused, naming the directory."""
    r = serve("--data-dir", node.data_dir, "--listen", f"127.0.0.1:{free_port()}")
    assert r.returncode == 4, r.stderr
    assert "data directory in use" in r.stderr
    assert node.data_dir in r.stderr and "Traceback" not in r.stderr
    assert node.poll() is None  # the running node is unharmed
    assert stub.Put(pb.PutRequest(key=b"dircheck/k", value=b"v"), timeout=10).success


def test_cli_port_in_use(node: NodeProcess, stub: Any, tmp_path: Path) -> None:
    r = serve("--data-dir", str(tmp_path), "--listen", node.address)
    assert r.returncode == 3, r.stderr
    assert f"cannot listen on {node.address}" in r.stderr
    assert node.poll() is None
    # The port still belongs to the first node.
    assert stub.Put(pb.PutRequest(key=b"portcheck/k", value=b"v"), timeout=10).success
    assert stub.Get(pb.GetRequest(key=b"portcheck/k"), timeout=10).found


def test_cli_config_file_only(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(
        f'data_dir = "{data}"\nlisten = "127.0.0.1:{port}"\nsync-mode = "batch"\n'
        "checkpoint_interval_ms = 200\n"
    )
    with NodeProcess.from_args(["--config", str(config)], port, str(data)) as proc:
        with proc.channel() as ch:
            s = kevo_stub(ch)
            assert s.Put(pb.PutRequest(key=b"cfg/k", value=b"v"), timeout=10).success
            assert s.Get(pb.GetRequest(key=b"cfg/k"), timeout=10).value == b"v"
        assert proc.stop() == 0, proc.stderr()
    assert (data / "store").is_dir() and (data / "wal").is_dir()


@pytest.mark.parametrize("command", [["serve", "--listen", "127.0.0.1:0"], ["wal", "repair"]])
def test_unusable_directory_is_a_message_not_a_traceback(
    tmp_path: Path, command: list[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    where = str(blocker / "data")
    args = [*command, "--data-dir", where] if command[0] == "serve" else [*command, where]
    out = run_cli(*args)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    assert str(blocker) in out.stderr


def test_cli_bad_failpoint_setting(tmp_path: Path) -> None:
    r = run_cli(
        "serve",
        "--data-dir",
        str(tmp_path),
        env={"KEVO_REPL_FAILPOINTS": "snapshot_chunk_delay=soon"},
    )
    assert r.returncode == 2, r.stderr
    assert "snapshot_chunk_delay needs a number of seconds" in r.stderr
    assert "Traceback" not in r.stderr
