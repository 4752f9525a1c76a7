"""Status and digest answers shared by every role's WALReplicationService servicer."""

from __future__ import annotations

import asyncio

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


class StandaloneStatusService(rpb_grpc.WALReplicationServiceServicer):
    """A standalone node streams nothing; it answers status and digest only."""

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
