"""Promotion: a replica stops following and becomes a primary, without a restart.

`Promote` (kevo-repl promote --addr) on a replica:

1. stops the replica's driver and waits for it (no entry arrives after this);
2. applies whatever its WAL holds beyond its store, so the last applied sequence P is the last
   entry it has;
3. starts a new history at P + 1 (kevo_repl/repl/history.py) and saves it, with a PROMOTED
   marker in the data directory: a restart keeps serving as a primary even though the config
   still says replica (delete PROMOTED, and the data, to make it a replica again);
4. swaps the replication service behind the node's ports for a primary's, and the role for one
   that takes writes.

Replicas pointed at it afterwards continue from their position when it lies on the new history
(they had at most P entries of the old one), and are rebuilt from a snapshot when it does not.

gRPC binds a service's handlers when it is added to a server, so the node adds a
`ReplicationDispatch` whose every call goes to its current `target`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from kevo_repl.node.engine import Engine
from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.repl.history import History, fork
from kevo_repl.repl.replica import ReplicaDriver
from kevo_repl.repl.state_files import save_history, write_state

log = logging.getLogger(__name__)


class ReplicationDispatch(rpb_grpc.WALReplicationServiceServicer):
    """Forwards every call to `target`, which promotion may replace while the node serves."""

    def __init__(self, target: rpb_grpc.WALReplicationServiceServicer) -> None:
        # Any: the generated servicer's methods are untyped; every target implements them all.
        self.target: Any = target

    async def StreamWAL(
        self, request: rpb.WALStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.WALStreamResponse]:
        async for response in self.target.StreamWAL(request, context):
            yield response

    async def StreamSnapshot(
        self, request: rpb.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.SnapshotChunk]:
        async for chunk in self.target.StreamSnapshot(request, context):
            yield chunk

    async def Acknowledge(
        self, request: rpb.Ack, context: grpc.aio.ServicerContext
    ) -> rpb.AckResponse:
        return await self.target.Acknowledge(request, context)  # type: ignore[no-any-return]

    async def NegativeAcknowledge(
        self, request: rpb.Nack, context: grpc.aio.ServicerContext
    ) -> rpb.NackResponse:
        return await self.target.NegativeAcknowledge(request, context)  # type: ignore[no-any-return]

    async def GetReplicationStatus(
        self, request: rpb.ReplicationStatusRequest, context: grpc.aio.ServicerContext
    ) -> rpb.ReplicationStatus:
        return await self.target.GetReplicationStatus(request, context)  # type: ignore[no-any-return]

    async def GetDigest(
        self, request: rpb.DigestRequest, context: grpc.aio.ServicerContext
    ) -> rpb.StoreDigest:
        return await self.target.GetDigest(request, context)  # type: ignore[no-any-return]

    async def ListSlots(
        self, request: rpb.ListSlotsRequest, context: grpc.aio.ServicerContext
    ) -> rpb.SlotList:
        return await self.target.ListSlots(request, context)  # type: ignore[no-any-return]

    async def DropSlot(
        self, request: rpb.DropSlotRequest, context: grpc.aio.ServicerContext
    ) -> rpb.DropSlotResponse:
        return await self.target.DropSlot(request, context)  # type: ignore[no-any-return]

    async def Promote(
        self, request: rpb.PromoteRequest, context: grpc.aio.ServicerContext
    ) -> rpb.PromoteResponse:
        return await self.target.Promote(request, context)  # type: ignore[no-any-return]


@dataclass
class Promotion:
    """What a replica node needs to become a primary; `run` does it."""

    engine: Engine
    driver: ReplicaDriver
    stop_driver: asyncio.Event
    driver_done: asyncio.Event
    history_path: str
    promoted_path: str
    # Builds the primary's replication service on the engine, with this history, and switches
    # the node's role and dispatch to it.
    become_primary: Callable[[History], None]

    async def run(self) -> tuple[int, History]:
        """Promote; (last sequence under the old history, the new history). After a failure
        (a state file could not be written) the driver stays stopped and `run` may be retried.
        """
        self.stop_driver.set()
        await self.driver_done.wait()
        await self.engine.replay_wal()
        last = self.engine.wal.last_seq
        history = fork(self.driver.history, last + 1)
        await asyncio.to_thread(save_history, self.history_path, history)
        marker = json.dumps({"history": history.current, "sequence": last}).encode() + b"\n"
        await asyncio.to_thread(write_state, self.promoted_path, marker)
        self.become_primary(history)
        log.warning(
            "promoted to primary: history %s starts at sequence %d (the config still says "
            "replica; %s keeps this node a primary across restarts)",
            history.current,
            last + 1,
            self.promoted_path,
        )
        return last, history
