"""The replica's driver: the thin asyncio shell around `ReplicaCore` that does the I/O.

The core decides; this module only carries out its actions, in order: open the stream
(`Connect`), write units to the replica's own WAL with the primary's sequence numbers
(`WriteUnits`), fsync it (`Fsync`), apply to the store with the applied position in the same
transaction (`Apply`), acknowledge with all three rungs of the ladder (`SendAck`), back off
(`Sleep`) and reconnect. Responses come from a reader task through a bounded queue, so waiting
with a timeout (for `on_tick`: dead-primary detection, owed acks) never cancels the RPC itself.

A failure of the replica's own WAL write or fsync is fatal (nobody knows what the file holds
after a failed fsync; a restart's recovery does): it propagates and stops the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc

from kevo_repl.errors import KevoReplError
from kevo_repl.node.engine import Engine
from kevo_repl.node.service import Role
from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.repl.bootstrap import STORE_FORMAT, BootstrapError, fetch_snapshot
from kevo_repl.repl.frames import Codec, FrameError, decode_frame_raw
from kevo_repl.repl.history import History
from kevo_repl.repl.primary import REFUSAL_KEY, REFUSED_COMPACTED, REFUSED_DIVERGED
from kevo_repl.repl.progress import ProgressMeter
from kevo_repl.repl.replica_state import (
    Action,
    Apply,
    Bootstrap,
    Connect,
    Disconnect,
    Fsync,
    ProtocolError,
    ReplicaCore,
    Rerequest,
    SendAck,
    Sleep,
    State,
    WriteUnits,
)
from kevo_repl.repl.state_files import load_history, save_history
from kevo_repl.repl.status import NoSlots, store_digest
from kevo_repl.repl.wire import from_message
from kevo_repl.wal import Entry, Unit

log = logging.getLogger(__name__)

TICK_S = 0.05
# Responses read and decoded ahead of the applier: bounds replica memory to a few frames
# (256 KiB raw each by default, plus their decoded entries).
QUEUE_MAX = 10
# Frames already waiting are applied together, up to this many entries, in one store
# transaction: a replica that is behind then commits as rarely as a local replay does
# (per-transaction page copies dominated catch-up with one transaction per frame).
MERGE_ENTRIES_MAX = 20_000
PROGRESS_LOG_S = 5.0  # while behind, log how the catch-up goes this often
PROGRESS_LOG_BEHIND = 10_000  # entries behind the primary that count as "catching up"
RPC_TIMEOUT_S = 5.0
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 128 * 1024 * 1024),
]


@dataclass(frozen=True, slots=True)
class _Received:
    """Frames as the reader task decoded them, ahead of the write/fsync/apply pipeline.

    One frame, or several consecutive ones merged (`_merge_waiting`): `parts` keeps each frame's raw
    payload with the units whose offsets index into it, for the WAL write.
    """

    response: rpb.WALStreamResponse  # the newest frame's (primary clock and position)
    parts: tuple[tuple[bytes, list[Unit]], ...]
    units: list[Unit]
    entries: list[Entry]  # every entry of `units`, in order


_Item = rpb.WALStreamResponse | _Received | BaseException


@dataclass(slots=True)
class _Stream:
    call: grpc.aio.UnaryStreamCall
    reader: asyncio.Task[None]
    queue: asyncio.Queue[_Item]
    session_id: str = ""
    held: _Item | None = None  # taken from the queue while merging, handled next


class ReplicaDriver:
    def __init__(
        self,
        engine: Engine,
        primary: str,
        node_id: str,
        client_address: str,
        role: Role,
        rng: random.Random | None = None,
        codecs: Sequence[Codec] = (Codec.ZSTD, Codec.SNAPPY, Codec.NONE),
        history_path: str | None = None,
        data_dir: str | None = None,
        reopen: Callable[[], Awaitable[None]] | None = None,
        on_divergence: str = "rebootstrap",
    ) -> None:
        self.engine = engine
        self.primary = primary
        self.node_id = node_id
        self.client_address = client_address
        self.role = role
        self.codecs = [c.name for c in codecs]  # accepted, most preferred first
        # The primary's history as last adopted (kevo_repl/repl/history.py); None until then.
        self.history_path = history_path
        self.history = load_history(history_path) if history_path else None
        # Bootstrap: where a snapshot goes, and how the node closes its store and WAL, switches
        # to the snapshot and opens them again (None: this driver cannot bootstrap).
        self.data_dir = data_dir
        self.reopen = reopen
        self.on_divergence = on_divergence  # "rebootstrap" or "refuse"
        self.bootstrap_bytes = (0, 0)  # (received, estimated total) while bootstrapping
        self.core = ReplicaCore(
            applied_seq=engine.store.applied_seq(),
            received_seq=engine.wal.last_seq,
            clock=time.monotonic,
            rng=rng or random.Random(),
        )
        self._channel: grpc.aio.Channel | None = None
        self._stop = asyncio.Event()  # run()'s
        self._stream: _Stream | None = None
        self._frame: _Received | None = None  # the frame the pipeline is working on
        self._stub: rpb_grpc.WALReplicationServiceStub | None = None
        # At most one ack in flight and one waiting (a newer one replaces it: it carries newer
        # positions), so a slow primary cannot pile up ack tasks on the replica.
        self._ack_next: tuple[rpb.Ack, tuple[tuple[str, str], ...]] | None = None
        self._ack_task: asyncio.Task[None] | None = None
        self._frame_primary_ms = 0  # the primary's clock when it sent the newest frame
        self.progress = ProgressMeter()  # of the applied position
        self._progress_logged = time.monotonic()
        self.last_error = ""

    def lag_seconds(self) -> float:
        """Approximate: how old the newest frame is, by the primary's clock."""
        if not self._frame_primary_ms:
            return 0.0
        return max(0.0, time.time() - self._frame_primary_ms / 1000)

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self._channel = grpc.aio.insecure_channel(self.primary, options=CHANNEL_OPTIONS)
        self._stub = rpb_grpc.WALReplicationServiceStub(self._channel)  # type: ignore[no-untyped-call]
        try:
            pending = list(self.core.start())
            while not stop.is_set():
                if pending:
                    action = pending.pop(0)
                    pending.extend(await self._execute(action))
                else:
                    pending.extend(await self._next_event(stop))
        finally:
            self._drop_stream()
            if self._ack_task is not None:
                self._ack_task.cancel()
            await self._channel.close()

    # ------------------------------------------------------------------ events

    def _tick(self) -> list[Action]:
        """The core's tick; a failure it finds (a primary silent past dead_after_s) is logged
        and shown in `status` like any other."""
        before = self.core.state
        actions = self.core.on_tick()
        if before is not State.ERROR and self.core.state is State.ERROR and self.core.last_error:
            self.last_error = self.core.last_error
            log.warning("replication from %s: %s", self.primary, self.last_error)
        return actions

    async def _next_event(self, stop: asyncio.Event) -> list[Action]:
        stream = self._stream
        if stream is None:
            await asyncio.sleep(TICK_S)
            return self._tick()
        item, stream.held = stream.held, None
        if item is None:
            try:
                item = await asyncio.wait_for(stream.queue.get(), TICK_S)
            except TimeoutError:
                return self._tick()
        if isinstance(item, _Received):
            item = _merge_waiting(item, stream)
        if isinstance(item, BaseException):
            return self._error(_describe(item))
        try:
            actions = self._on_response(item)
        except ProtocolError as err:
            return self._error(str(err))
        if self.core.state is State.ERROR and self.core.last_error:  # e.g. a gap the core saw
            self.last_error = self.core.last_error
            log.warning("replication from %s: %s", self.primary, self.last_error)
        return actions

    def _on_response(self, item: rpb.WALStreamResponse | _Received) -> list[Action]:
        response = item.response if isinstance(item, _Received) else item
        if response.primary_client_address:
            self.role.primary_client_address = response.primary_client_address
        if not isinstance(item, _Received):
            return self.core.on_heartbeat(response.primary_durable_sequence)
        self._frame = item
        self._frame_primary_ms = response.primary_time_unix_ms
        units = item.units
        return self.core.on_frame(
            units[0].first_seq,
            units[-1].last_seq,
            [(u.first_seq, u.last_seq) for u in units],
            primary_last_seq=response.primary_durable_sequence or None,
        )

    def _error(self, reason: str) -> list[Action]:
        self.last_error = reason
        log.warning("replication from %s: %s", self.primary, reason)
        return self.core.on_error(reason)

    # ------------------------------------------------------------------ actions

    async def _execute(self, action: Action) -> list[Action]:
        if isinstance(action, Connect):
            return await self._connect(action.start_seq)
        if isinstance(action, WriteUnits):
            assert self._frame is not None
            for raw, units in self._frame.parts:
                if units[0].first_seq < action.units_first:  # the frame began with duplicates
                    units = [u for u in units if u.first_seq >= action.units_first]
                if units:
                    self.engine.wal.append_units_nowait(units, raw)
            return []
        if isinstance(action, Fsync):
            await asyncio.to_thread(self.engine.wal.sync_to, action.seq)
            return self.core.on_fsynced(action.seq)
        if isinstance(action, Apply):
            await self._apply(action.from_seq, action.up_to_seq)
            self._note_progress(action.up_to_seq)
            return self.core.on_applied(action.up_to_seq)
        if isinstance(action, SendAck):
            return await self._ack(action)
        if isinstance(action, Disconnect):
            self._drop_stream()
            return []
        if isinstance(action, Sleep):
            with contextlib.suppress(TimeoutError):  # a stop (or promotion) ends the back-off
                await asyncio.wait_for(self._stop.wait(), max(0.0, action.until - time.monotonic()))
            return self.core.on_retry()
        if isinstance(action, Rerequest):
            return []  # we reconnect from the next expected sequence instead of a Nack
        if isinstance(action, Bootstrap):
            return await self._bootstrap()
        raise AssertionError(f"unknown action {action!r}")

    async def _connect(self, start_seq: int) -> list[Action]:
        assert self._stub is not None
        self._drop_stream()
        request = rpb.WALStreamRequest(
            start_sequence=start_seq,
            protocol_version=1,
            compression_supported=self.codecs[0] != "NONE",
            preferred_codec=self.codecs[0],
            listener_address=self.client_address,
            frames=True,
            accepted_codecs=self.codecs,
            node_id=self.node_id,
            client_address=self.client_address,
            history_id=(self.history.id_at(start_seq - 1) or "") if self.history else "",
        )
        call = self._stub.StreamWAL(request)
        queue: asyncio.Queue[_Item] = asyncio.Queue(QUEUE_MAX)
        stream = _Stream(call, asyncio.create_task(_pump(call, queue)), queue)
        self._stream = stream
        try:
            metadata = await asyncio.wait_for(call.initial_metadata(), RPC_TIMEOUT_S)
        except (grpc.aio.AioRpcError, TimeoutError) as err:
            self._drop_stream()
            return self._error(f"cannot stream from {self.primary}: {_describe(err)}")
        headers = dict(metadata or ())
        if "session-id" not in headers:  # refused before it began: say why, act on it
            return await self._refused(call)
        stream.session_id = str(headers.get("session-id", ""))
        problem, refusal = await self._adopt_history(str(headers.get("history", "")), start_seq - 1)
        if problem:
            self._drop_stream()
            return self._after_refusal(problem, refusal)
        log.info("streaming from %s, starting at sequence %d", self.primary, start_seq)
        return self.core.on_connected()

    async def _refused(self, call: grpc.aio.UnaryStreamCall) -> list[Action]:
        try:
            code = await asyncio.wait_for(call.code(), RPC_TIMEOUT_S)
            details = await call.details()
            trailing = dict(await call.trailing_metadata() or ())
        except TimeoutError:
            self._drop_stream()
            return self._error(f"{self.primary} neither streams nor refuses")
        self._drop_stream()
        reason = f"{self.primary} refused to stream: {code.name}: {details}"
        return self._after_refusal(reason, str(trailing.get(REFUSAL_KEY, "")))

    def _after_refusal(self, reason: str, refusal: str) -> list[Action]:
        """Bootstrap when a snapshot is the cure and we may take one; otherwise an error."""
        if refusal == REFUSED_DIVERGED and self.on_divergence != "rebootstrap":
            return self._error(
                f"{reason} (on_divergence = {self.on_divergence!r}: this replica keeps its "
                "diverged store and does not follow; rebuild it, or set on_divergence = "
                '"rebootstrap")'
            )
        if refusal in (REFUSED_COMPACTED, REFUSED_DIVERGED) and self.data_dir and self.reopen:
            log.warning("%s; bootstrapping from a snapshot of the primary's store", reason)
            self.last_error = reason
            return self.core.on_bootstrap_needed(reason)
        return self._error(reason)

    async def _bootstrap(self) -> list[Action]:
        assert self._stub is not None and self.data_dir and self.reopen
        request = rpb.SnapshotRequest(
            node_id=self.node_id,
            accepted_codecs=self.codecs,
            client_address=self.client_address,
            store_format=STORE_FORMAT,
        )
        self.progress = ProgressMeter()  # of bytes received, while bootstrapping
        started = time.monotonic()
        fetch = asyncio.ensure_future(
            fetch_snapshot(self._stub, request, self.data_dir, self._note_bootstrap)
        )
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            # A stop (SIGTERM, or a promotion) must not wait for a long snapshot: the partial
            # image is left behind and deleted at the next attempt or start.
            await asyncio.wait((fetch, stopping), return_when=asyncio.FIRST_COMPLETED)
            if not fetch.done():
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError, BootstrapError):
                    await fetch
                return self._error("bootstrap abandoned: stopping")
            seq = fetch.result()
        except BootstrapError as err:
            return self._error(f"bootstrap failed: {err}")
        finally:
            stopping.cancel()
            self.bootstrap_bytes = (0, 0)
        # Fatal if it fails: the node has closed its store and WAL; the next start finishes
        # the switch (bootstrap.ready is the commit point) and opens them again.
        await self.reopen()
        self.history = load_history(self.history_path) if self.history_path else None
        self._frame = None
        self.progress = ProgressMeter()
        self.last_error = ""
        log.info(
            "bootstrapped from a snapshot of %s at sequence %d in %.1f s",
            self.primary,
            seq,
            time.monotonic() - started,
        )
        return self.core.on_bootstrapped(seq)

    def _note_bootstrap(self, received: int, total: int) -> None:
        now = time.monotonic()
        self.bootstrap_bytes = (received, total)
        self.progress.observe(received, now)
        if now - self._progress_logged < PROGRESS_LOG_S:
            return
        self._progress_logged = now
        eta = self.progress.eta_s(max(0, total - received), now)
        log.info(
            "bootstrapping from %s: %.1f of about %.1f MB, %.1f MB/s, %s left",
            self.primary,
            received / 1e6,
            total / 1e6,
            self.progress.rate(now) / 1e6,
            "unknown time" if eta is None else f"about {eta:.0f} s",
        )

    async def _adopt_history(self, text: str, held: int) -> tuple[str, str]:
        """Take the primary's history if our position lies on it; else (why not, refusal):
        REFUSED_DIVERGED only for a real divergence, not for a header we cannot read."""
        if not text:
            return "", ""  # a primary that predates histories, or not a kevo-repl primary
        try:
            theirs = History.from_json(text)
        except (ValueError, KeyError, TypeError) as err:
            return f"the primary sent a bad history header: {err}", ""
        ours = self.history
        if ours is not None and not theirs.contains(ours.id_at(held) or "", held):
            return (
                f"diverged: this replica holds sequence {held} under history "
                f"{ours.id_at(held)}, which is not the primary's"
            ), REFUSED_DIVERGED
        if theirs != ours:
            if self.history_path:
                await asyncio.to_thread(save_history, self.history_path, theirs)
            self.history = theirs
        return "", ""

    async def _apply(self, from_seq: int, up_to_seq: int) -> None:
        frame = self._frame
        if frame is not None and frame.units[0].first_seq <= from_seq:
            entries = frame.entries
            if entries[0].seq != from_seq or entries[-1].seq != up_to_seq:
                entries = [e for e in entries if from_seq <= e.seq <= up_to_seq]
            # On the event loop, not a worker thread: the apply holds the GIL for most of its
            # time anyway, and handing it to a thread cost ~7 % of catch-up throughput in
            # GIL hand-offs (bench/replication_bench.py).
            self.engine.store.apply(entries, up_to_seq)
            return
        # After an interrupted pipeline the range (at most one frame) comes from our own WAL.
        await asyncio.to_thread(self._apply_from_own_wal, from_seq, up_to_seq)

    def _note_progress(self, applied: int) -> None:
        now = time.monotonic()
        self.progress.observe(applied, now)
        behind = self.lag_entries()
        if behind < PROGRESS_LOG_BEHIND or now - self._progress_logged < PROGRESS_LOG_S:
            return
        self._progress_logged = now
        eta = self.progress.eta_s(behind, now)
        log.info(
            "catching up from %s: applied %d, %d behind, %.0f entries/s, %s left",
            self.primary,
            applied,
            behind,
            self.progress.rate(now),
            "unknown time" if eta is None else f"about {eta:.0f} s",
        )

    def lag_entries(self) -> int:
        return self.core.lag_entries or 0  # unknown before the primary's first report

    def _apply_from_own_wal(self, from_seq: int, up_to_seq: int) -> None:
        entries = list(self.engine.wal.entries_from(from_seq, max_seq=up_to_seq))
        self.engine.store.apply(entries, up_to_seq)

    async def _ack(self, action: SendAck) -> list[Action]:
        stream = self._stream
        if stream is None:
            return self.core.on_ack_sent()  # the connection is gone; positions go next time
        ack = rpb.Ack(
            acknowledged_up_to=action.applied,
            received_sequence=action.received,
            flushed_sequence=action.flushed,
            applied_sequence=action.applied,
            node_id=self.node_id,
        )
        # Sent in the background: waiting for the primary's answer would stall the pipeline by a
        # round trip per frame. A lost ack is harmless (the next one carries newer positions); a
        # broken link shows up on the stream itself.
        self._ack_next = (ack, (("session-id", stream.session_id),))
        if self._ack_task is None or self._ack_task.done():
            self._ack_task = asyncio.create_task(self._send_acks())
        return self.core.on_ack_sent()

    async def _send_acks(self) -> None:
        assert self._stub is not None
        while self._ack_next is not None:
            ack, metadata = self._ack_next
            self._ack_next = None
            try:
                await self._stub.Acknowledge(ack, metadata=metadata, timeout=RPC_TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                log.info("acknowledge to %s failed: %s", self.primary, _describe(err))

    def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.reader.cancel()
            stream.call.cancel()


class ReplicaStatusService(NoSlots):
    """On a replica only status and digest are served (nothing streams from a replica yet)."""

    role = "replica"

    async def GetDigest(
        self, request: rpb.DigestRequest, context: grpc.aio.ServicerContext
    ) -> rpb.StoreDigest:
        return await store_digest(self.driver.engine.store, "replica")

    def __init__(self, driver: ReplicaDriver) -> None:
        self.driver = driver
        # Set by the node: stops the driver and makes this node a primary; returns the last
        # sequence under the old history and the new history.
        self.promote: Callable[[], Awaitable[tuple[int, History]]] | None = None
        self._promoting = False

    async def Promote(
        self, request: rpb.PromoteRequest, context: grpc.aio.ServicerContext
    ) -> rpb.PromoteResponse:
        if self.promote is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node cannot be promoted")
        assert self.promote is not None
        if self._promoting:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a promotion is running")
        self._promoting = True
        try:
            last, history = await self.promote()
        except KevoReplError as err:
            await context.abort(grpc.StatusCode.INTERNAL, f"promotion failed: {err}")
        finally:
            self._promoting = False
        return rpb.PromoteResponse(sequence=last, history_id=history.current)

    async def GetReplicationStatus(
        self, request: rpb.ReplicationStatusRequest, context: grpc.aio.ServicerContext
    ) -> rpb.ReplicationStatus:
        d = self.driver
        core = d.core
        primary_last = core.primary_last_seq or 0
        lag = d.lag_entries()
        now = time.monotonic()
        received, total = d.bootstrap_bytes
        left = max(0, total - received) if core.state is State.BOOTSTRAPPING else lag
        eta = d.progress.eta_s(left, now)
        return rpb.ReplicationStatus(
            role="replica",
            last_sequence=d.engine.wal.last_seq,
            durable_sequence=d.engine.wal.durable_seq,
            applied_sequence=core.applied_seq,
            primary_address=d.primary,
            state=core.state.name,
            primary_durable_sequence=primary_last,
            lag_entries=lag,
            lag_seconds=d.lag_seconds() if lag else 0.0,
            last_error=d.last_error,
            apply_rate=d.progress.rate(now),
            eta_seconds=-1.0 if eta is None else eta,
            bootstrap_bytes=received,
            bootstrap_total_bytes=total,
            history_id=(d.history.id_at(core.received_seq) or "") if d.history else "",
        )


async def _pump(call: grpc.aio.UnaryStreamCall, queue: asyncio.Queue[_Item]) -> None:
    """Read and decode responses into the bounded queue; an error or the end goes in last.

    Decoding here, not in the driver, is what pipelines the replica: the next frame is
    decompressed and parsed on the event loop while the driver waits for the fsync and the
    apply of the one before on worker threads (both release the GIL for most of their time).
    """
    try:
        async for response in call:
            try:
                item = _decode(response)
            except FrameError as err:
                await queue.put(err)  # the driver drops this stream and asks again
                return
            await queue.put(item)
        await queue.put(KevoReplError("the primary ended the stream"))
    except asyncio.CancelledError:
        raise
    except grpc.aio.AioRpcError as err:
        with contextlib.suppress(asyncio.CancelledError):
            await queue.put(err)


def _decode(response: rpb.WALStreamResponse) -> rpb.WALStreamResponse | _Received:
    if not response.HasField("frame"):
        return response
    raw, units = decode_frame_raw(from_message(response.frame))
    return _Received(response, ((raw, units),), units, [e for u in units for e in u.entries])


def _merge_waiting(first: _Received, stream: _Stream) -> _Received:
    """`first` and the consecutive frames already in the queue, up to MERGE_ENTRIES_MAX entries.

    A caught-up replica finds the queue empty and goes on with `first` alone: merging costs no
    latency. Anything else met in the queue (a heartbeat, an error, a frame that does not
    continue) is held for the next event, so the core still sees it, in order.
    """
    merged = [first]
    count = len(first.entries)
    while count < MERGE_ENTRIES_MAX and not stream.queue.empty():
        item = stream.queue.get_nowait()
        if not isinstance(item, _Received) or item.units[0].first_seq != (
            merged[-1].units[-1].last_seq + 1
        ):
            stream.held = item
            break
        merged.append(item)
        count += len(item.entries)
    if len(merged) == 1:
        return first
    return _Received(
        merged[-1].response,
        tuple(part for r in merged for part in r.parts),
        [u for r in merged for u in r.units],
        [e for r in merged for e in r.entries],
    )


def _describe(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    if isinstance(err, TimeoutError):
        return "timed out"
    return str(err)
