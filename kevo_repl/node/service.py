"""kevo.KevoService for the python-kevo SDK: thin handlers that validate, translate and delegate.

Errors are translated here and nowhere else (`_status_for`): a bad argument is INVALID_ARGUMENT, a
transaction problem FAILED_PRECONDITION, a limit RESOURCE_EXHAUSTED, a node shutting down
UNAVAILABLE. NOT_FOUND is never used: the SDK turns it into KeyNotFoundError, and a missing key is
`found=false`, as in Kevo.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import grpc

from kevo_repl import __version__
from kevo_repl.errors import InvalidArgumentError, KevoReplError, WalClosedError
from kevo_repl.node.engine import Engine, WriteOp
from kevo_repl.node.transactions import (
    Transaction,
    TransactionError,
    TransactionLimitError,
    TxRegistry,
)
from kevo_repl.proto import service_pb2 as pb
from kevo_repl.proto import service_pb2_grpc as pb_grpc
from kevo_repl.store import StoreClosedError
from kevo_repl.wal import Op

log = logging.getLogger(__name__)

SCAN_PAGE = 1000
STATUS_MESSAGE_MAX = 1024
KEVO_VERSION = "1.4.2"  # what Kevo's GetNodeInfo reports; ours goes in the log and --version

R = TypeVar("R")


class ReadOnlyReplicaError(KevoReplError):
    """A write sent to a replica; the message names the primary the way the SDK parses it."""


@dataclass(slots=True)
class Role:
    """What this node is, as GetNodeInfo reports it. A replica's driver keeps it current."""

    name: str = "standalone"  # standalone | primary | replica
    client_address: str = ""  # this node's KevoService address
    primary_client_address: str = ""  # on a replica: where writes go
    replicas: Callable[[], list[pb.ReplicaInfo]] = field(default=lambda: [])
    last_sequence: Callable[[], int] | None = None

    def check_writable(self) -> None:
        if self.name != "replica":
            return
        # python-kevo matches "replica" and r"primary node at (\S+)" to redirect the write,
        # so the address ends the message.
        where = self.primary_client_address or "(unknown: not connected yet)"
        raise ReadOnlyReplicaError(f"this node is a read-only replica; primary node at {where}")


def _status_for(err: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(err, ReadOnlyReplicaError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(err)
    if isinstance(err, InvalidArgumentError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(err)
    if isinstance(err, TransactionError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(err)
    if isinstance(err, TransactionLimitError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)
    if isinstance(err, (WalClosedError, StoreClosedError)):
        # Shutting down, or a replica reopening its store on a snapshot: a retry will do.
        return grpc.StatusCode.UNAVAILABLE, "the store is closed or being reopened; retry"
    return grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}"


@dataclass(slots=True)
class Counters:
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latency_ns: dict[str, list[int]] = field(default_factory=dict)  # name -> [count, sum, min, max]
    bytes_read: int = 0
    bytes_written: int = 0
    checkpoints: int = 0
    compactions: int = 0

    def observe(self, name: str, started_ns: int) -> None:
        took = time.perf_counter_ns() - started_ns
        self.ops[f"{name}_ops"] += 1
        stat = self.latency_ns.setdefault(f"{name}_latency", [0, 0, took, took])
        stat[0] += 1
        stat[1] += took
        stat[2] = min(stat[2], took)
        stat[3] = max(stat[3], took)


async def _abort(
    service: KevoService, name: str, err: KevoReplError, context: grpc.aio.ServicerContext
) -> NoReturn:
    """The one place a handler's error becomes a status (and is counted)."""
    service.counters.errors[name] += 1
    code, message = _status_for(err)
    if len(message) > STATUS_MESSAGE_MAX:
        # Messages quote the request (keys, transaction ids); a huge one would overflow the
        # trailer and reach the client as RESOURCE_EXHAUSTED instead of this status.
        message = message[:STATUS_MESSAGE_MAX] + "... (cut)"
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # it raises; this keeps the types honest


def unary(name: str) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
    """Count, time and translate errors for one unary handler."""

    def wrap(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        @functools.wraps(fn)
        async def handler(self: KevoService, request: Any, context: grpc.aio.ServicerContext) -> R:
            started = time.perf_counter_ns()
            try:
                result = await fn(self, request, context)
            except KevoReplError as err:
                await _abort(self, name, err, context)
            self.counters.observe(name, started)
            return result

        return handler

    return wrap


def streaming(
    name: str,
) -> Callable[[Callable[..., AsyncIterator[R]]], Callable[..., AsyncIterator[R]]]:
    def wrap(fn: Callable[..., AsyncIterator[R]]) -> Callable[..., AsyncIterator[R]]:
        @functools.wraps(fn)
        async def handler(
            self: KevoService, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[R]:
            started = time.perf_counter_ns()
            try:
                async for item in fn(self, request, context):
                    yield item
            except KevoReplError as err:
                await _abort(self, name, err, context)
            self.counters.observe(name, started)

        return handler

    return wrap


@dataclass(frozen=True, slots=True)
class ScanBounds:
    start: bytes
    end: bytes | None
    suffix: bytes
    limit: int  # 0 means unlimited


def scan_bounds(prefix: bytes, start: bytes, end: bytes, suffix: bytes, limit: int) -> ScanBounds:
    """Kevo's scan modes: prefix (+ suffix), suffix only, [start, end) range, or everything."""
    if limit < 0:
        raise InvalidArgumentError(f"scan limit must not be negative: {limit}")
    if (prefix or suffix) and (start or end):
        raise InvalidArgumentError("a prefix or suffix scan does not take start_key/end_key")
    if start and end and start >= end:
        raise InvalidArgumentError("scan start_key must sort before end_key")
    if prefix:
        return ScanBounds(prefix, prefix_end(prefix), suffix, limit)
    return ScanBounds(start, end or None, suffix, limit)


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix` (None: no such key)."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1]) if trimmed else None


class KevoService(pb_grpc.KevoServiceServicer):
    def __init__(
        self, engine: Engine, registry: TxRegistry, counters: Counters, role: Role | None = None
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.counters = counters
        self.role = role or Role()

    # ------------------------------------------------------------------ single keys

    @unary("get")
    async def Get(
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetResponse:
        value = self.engine.get(request.key)
        if value is None:
            return pb.GetResponse(found=False)
        self.counters.bytes_read += len(value)
        return pb.GetResponse(value=value, found=True)

    @unary("put")
    async def Put(
        self, request: pb.PutRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutResponse:
        self.role.check_writable()
        await self.engine.put(request.key, request.value, request.sync)
        self.counters.bytes_written += len(request.key) + len(request.value)
        return pb.PutResponse(success=True)

    @unary("delete")
    async def Delete(
        self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteResponse:
        self.role.check_writable()
        await self.engine.delete(request.key, request.sync)
        return pb.DeleteResponse(success=True)

    @unary("batch")
    async def BatchWrite(
        self, request: pb.BatchWriteRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchWriteResponse:
        self.role.check_writable()
        # Refused before any work: a 64 MiB message can hold millions of empty operations.
        self.engine.limits.check_count(len(request.operations))
        ops: list[WriteOp] = []
        for i, op in enumerate(request.operations):
            if op.type == pb.Operation.PUT:
                ops.append((Op.PUT, op.key, op.value))
            elif op.type == pb.Operation.DELETE:
                ops.append((Op.DELETE, op.key, b""))
            else:
                raise InvalidArgumentError(f"unknown operation type {op.type} at index {i}")
        await self.engine.write_batch(ops, request.sync)
        self.counters.bytes_written += sum(len(k) + len(v) for _, k, v in ops)
        return pb.BatchWriteResponse(success=True)

    # ------------------------------------------------------------------ scans

    @streaming("scan")
    async def Scan(
        self, request: pb.ScanRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScanResponse]:
        bounds = scan_bounds(
            request.prefix, request.start_key, request.end_key, request.suffix, request.limit
        )
        async for key, value in self._scan(bounds, None):
            yield pb.ScanResponse(key=key, value=value)

    async def _scan(
        self, b: ScanBounds, tx: Transaction | None
    ) -> AsyncIterator[tuple[bytes, bytes]]:
        rows = self._store_rows(b.start, b.end)
        if tx is not None and tx.writes:
            rows = _overlay(rows, tx.writes, b.start, b.end)
        sent = 0
        for read, (key, value) in enumerate(rows, 1):
            if read % SCAN_PAGE == 0:
                # A suffix that matches little reads page after page without yielding a row:
                # give the event loop (writes, replication, heartbeats) its turn.
                await asyncio.sleep(0)
            if b.suffix and not key.endswith(b.suffix):
                continue
            yield key, value
            sent += 1
            if b.limit and sent >= b.limit:
                return

    def _store_rows(self, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        # Pages of one read snapshot each: a long scan never pins the store.
        while True:
            page = self.engine.store.scan(start, end, SCAN_PAGE)
            yield from page
            if len(page) < SCAN_PAGE:
                return
            start = page[-1][0] + b"\x00"

    # ------------------------------------------------------------------ transactions

    @unary("tx_begin")
    async def BeginTransaction(
        self, request: pb.BeginTransactionRequest, context: grpc.aio.ServicerContext
    ) -> pb.BeginTransactionResponse:
        if not request.read_only:
            self.role.check_writable()
        tx = self.registry.begin(request.read_only)
        return pb.BeginTransactionResponse(transaction_id=tx.id)

    @unary("tx_commit")
    async def CommitTransaction(
        self, request: pb.CommitTransactionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommitTransactionResponse:
        tx = self.registry.finish(request.transaction_id)
        if tx is not None and tx.writes:
            ops: list[WriteOp] = [
                (Op.DELETE, k, b"") if v is None else (Op.PUT, k, v)
                for k, v in sorted(tx.writes.items())
            ]
            await self.engine.write_checked_batch(ops, sync=False)
        return pb.CommitTransactionResponse(success=True)

    @unary("tx_rollback")
    async def RollbackTransaction(
        self, request: pb.RollbackTransactionRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackTransactionResponse:
        self.registry.finish(request.transaction_id)
        return pb.RollbackTransactionResponse(success=True)

    @unary("tx_get")
    async def TxGet(
        self, request: pb.TxGetRequest, context: grpc.aio.ServicerContext
    ) -> pb.TxGetResponse:
        tx = self.registry.use(request.transaction_id)
        self.engine.limits.check_key(request.key)
        if request.key in tx.writes:
            value = tx.writes[request.key]
        else:
            value = self.engine.store.get(request.key)
        if value is None:
            return pb.TxGetResponse(found=False)
        return pb.TxGetResponse(value=value, found=True)

    @unary("tx_put")
    async def TxPut(
        self, request: pb.TxPutRequest, context: grpc.aio.ServicerContext
    ) -> pb.TxPutResponse:
        tx = self.registry.use(request.transaction_id)
        self.engine.limits.check_key(request.key)
        self.engine.limits.check_value(request.value)
        tx.buffer(request.key, request.value, self.registry.limits)
        return pb.TxPutResponse(success=True)

    @unary("tx_delete")
    async def TxDelete(
        self, request: pb.TxDeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.TxDeleteResponse:
        tx = self.registry.use(request.transaction_id)
        self.engine.limits.check_key(request.key)
        tx.buffer(request.key, None, self.registry.limits)
        return pb.TxDeleteResponse(success=True)

    @streaming("tx_scan")
    async def TxScan(
        self, request: pb.TxScanRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TxScanResponse]:
        tx = self.registry.use(request.transaction_id)
        bounds = scan_bounds(
            request.prefix, request.start_key, request.end_key, request.suffix, request.limit
        )
        async for key, value in self._scan(bounds, tx):
            yield pb.TxScanResponse(key=key, value=value)

    # ------------------------------------------------------------------ node

    @unary("stats")
    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatsResponse:
        stats = self.engine.store.stats()
        c = self.counters
        return pb.GetStatsResponse(
            key_count=stats.key_count,
            storage_size=stats.size_bytes,
            memtable_count=0,
            sstable_count=0,
            write_amplification=1.0,
            read_amplification=1.0,
            operation_counts=dict(c.ops),
            latency_stats={
                name: pb.LatencyStats(count=n, avg_ns=total // n, min_ns=lo, max_ns=hi)
                for name, (n, total, lo, hi) in c.latency_ns.items()
            },
            error_counts=dict(c.errors),
            total_bytes_read=c.bytes_read,
            total_bytes_written=c.bytes_written,
            flush_count=c.checkpoints,
            compaction_count=c.compactions,
            recovery_stats=pb.RecoveryStats(
                wal_files_recovered=self.engine.wal.recovery.segments,
                wal_entries_recovered=self.engine.recovered_entries,
                wal_corrupted_entries=0,
                wal_recovery_duration_ms=self.engine.recovery_ms,
            ),
        )

    @unary("compact")
    async def Compact(
        self, request: pb.CompactRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompactResponse:
        # The store needs no compaction; a checkpoint is the useful thing to do on request.
        await self.engine.checkpoint()
        self.counters.compactions += 1
        return pb.CompactResponse(success=True)

    @unary("node_info")
    async def GetNodeInfo(
        self, request: pb.GetNodeInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetNodeInfoResponse:
        role = self.role
        last = role.last_sequence() if role.last_sequence else self.engine.store.applied_seq()
        return pb.GetNodeInfoResponse(
            node_role=_NODE_ROLES[role.name],
            # Client-API (KevoService) addresses, never replication ports: the SDK dials them.
            primary_address=_primary_address(role),
            replicas=role.replicas(),
            last_sequence=last,
            read_only=role.name == "replica",
            version=f"{KEVO_VERSION} (kevo-repl {__version__})",
        )


_NODE_ROLES = {
    "standalone": pb.GetNodeInfoResponse.STANDALONE,
    "primary": pb.GetNodeInfoResponse.PRIMARY,
    "replica": pb.GetNodeInfoResponse.REPLICA,
}


def _primary_address(role: Role) -> str:
    if role.name == "replica":
        return role.primary_client_address
    return role.client_address if role.name == "primary" else ""


def _overlay(
    rows: Iterator[tuple[bytes, bytes]],
    writes: dict[bytes, bytes | None],
    start: bytes,
    end: bytes | None,
) -> Iterator[tuple[bytes, bytes]]:
    """Merge a transaction's buffered writes over store rows, in key order."""
    mine = sorted((k, v) for k, v in writes.items() if k >= start and (end is None or k < end))
    merged = heapq.merge(((k, 0, v) for k, v in mine), ((k, 1, v) for k, v in rows))
    last: bytes | None = None
    for key, _, value in merged:
        if key == last:
            continue  # the transaction's own write (rank 0) came first and wins
        last = key
        if value is not None:
            yield key, value
