"""Status and digest answers shared by every role's WALReplicationService servicer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc

from kevo_repl.node.engine import Engine
from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.store import Store


async def store_digest(store: Store, role: str) -> rpb.StoreDigest:
    """The store's digest at its applied sequence, both read in one snapshot (worker thread:
    hashing a large store takes seconds and must not stall the event loop)."""
    applied, sha256 = await asyncio.to_thread(store.digest)
    return rpb.StoreDigest(applied_sequence=applied, sha256=sha256, role=role)


class NoSlots(rpb_grpc.WALReplicationServiceServicer):
    """Slot calls on a node that is not a primary: a clear refusal, not UNIMPLEMENTED."""

    role = ""

    async def ListSlots(
        self, request: rpb.ListSlotsRequest, context: grpc.aio.ServicerContext
    ) -> rpb.SlotList:
        await refuse(context, self._no_slots())

    async def DropSlot(
        self, request: rpb.DropSlotRequest, context: grpc.aio.ServicerContext
    ) -> rpb.DropSlotResponse:
        await refuse(context, self._no_slots())

    async def StreamSnapshot(
        self, request: rpb.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.SnapshotChunk]:
        await refuse(context, f"only a primary sends snapshots; this node is a {self.role} node")
        yield rpb.SnapshotChunk()  # never reached: abort raises

    async def Promote(
        self, request: rpb.PromoteRequest, context: grpc.aio.ServicerContext
    ) -> rpb.PromoteResponse:
        await refuse(context, not_promotable(self.role))

    # Nothing streams from a replica (no cascading) or a standalone node: a refusal that says
    # so, rather than the generated servicer's UNIMPLEMENTED and a traceback in the log.
    async def StreamWAL(
        self, request: rpb.WALStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.WALStreamResponse]:
        await refuse(context, self._not_a_primary())
        yield rpb.WALStreamResponse()  # never reached: abort raises

    async def Acknowledge(
        self, request: rpb.Ack, context: grpc.aio.ServicerContext
    ) -> rpb.AckResponse:
        await refuse(context, self._not_a_primary())

    async def NegativeAcknowledge(
        self, request: rpb.Nack, context: grpc.aio.ServicerContext
    ) -> rpb.NackResponse:
        await refuse(context, self._not_a_primary())

    def _not_a_primary(self) -> str:
        return f"only a primary streams its WAL; this node is a {self.role} node"

    def _no_slots(self) -> str:
        return f"only a primary has replication slots; this node is a {self.role} node"


async def refuse(context: grpc.aio.ServicerContext, message: str) -> NoReturn:
    """End the call with FAILED_PRECONDITION and `message` (abort raises; the raise below only
    tells type checkers so)."""
    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)
    raise AssertionError("abort raises")


def not_promotable(role: str) -> str:
    return f"only a replica can be promoted; this node is a {role} node"


class StandaloneStatusService(NoSlots):
    """A standalone node streams nothing; it answers status and digest only."""

    role = "standalone"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def GetReplicationStatus(
        self, request: rpb.ReplicationStatusRequest, context: grpc.aio.ServicerContext
    ) -> rpb.ReplicationStatus:
        wal = self.engine.wal
        return rpb.ReplicationStatus(
            role="standalone",
            last_sequence=wal.last_seq,
            durable_sequence=wal.durable_seq,
            applied_sequence=self.engine.store.applied_seq(),
        )

    async def GetDigest(
        self, request: rpb.DigestRequest, context: grpc.aio.ServicerContext
    ) -> rpb.StoreDigest:
        return await store_digest(self.engine.store, "standalone")
