"""The primary's side of replication: kevo.replication.WALReplicationService over the node's WAL.

A stream ships only what the WAL made durable, one bounded frame at a time, from one of two
sources, chosen again for every frame so that moving between them can neither skip nor repeat a
unit (both answer "whole units from the one holding `next_seq`"):

* live tail: the WAL's in-memory tail window (`WAL.tail_take`) holds the newest units as the
  bytes written. A caught-up replica is served from it on the event loop: no disk read, no
  decoding, no thread hop (which cost milliseconds of lag under load);
* catch-up: a replica behind the window reads units from the segments (`units_from`) on a
  worker thread.

A slow or stalled replica therefore costs the primary at most one frame of memory and never
blocks a writer: gRPC flow control holds the stream, the window is shared and bounded, and the
segments on disk are the backlog. When caught up, the stream waits for the WAL's sync listener
(no polling) or, after `heartbeat_s` of quiet, sends a heartbeat that carries the primary's
durable position and clock, so the replica can tell lag and a dead link.

Our replicas ask for frames: whole units in the WAL's record format, compressed as one. A client
that speaks Kevo's own protocol (no `frames` flag) gets what a Kevo primary sends: per-entry
payloads, uncompressed, with strictly consecutive sequence numbers, and the `session-id` header.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field

import grpc

from kevo_repl import failpoints
from kevo_repl.errors import CorruptionError, KevoReplError, SequenceCompactedError
from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.repl.frame_cache import Built, FrameCache
from kevo_repl.repl.frames import Codec, Frame, encode_raw_frame
from kevo_repl.repl.history import History
from kevo_repl.repl.progress import ProgressMeter
from kevo_repl.repl.slots import SlotTable, encode_slots
from kevo_repl.repl.snapshot_source import ImageReader
from kevo_repl.repl.state_files import load_slots, write_state
from kevo_repl.repl.status import not_promotable, refuse, store_digest
from kevo_repl.repl.wire import to_message, wire_codec
from kevo_repl.store import Store
from kevo_repl.wal import WAL, Unit
from kevo_repl.wal.codec import entry_payload

log = logging.getLogger(__name__)

KEVO_ENTRIES_PER_RESPONSE = 100  # what a Kevo primary sends at most
# Frames from the window up to this size are compressed on the event loop (tens of µs); larger
# ones on a worker thread, so the loop never stalls for a whole 256 KiB compression.
INLINE_COMPRESS_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class StreamLimits:
    frame_bytes_max: int = 256 * 1024
    frame_entries_max: int = 20_000
    linger_s: float = 0.002  # only while frames follow each other closely
    heartbeat_s: float = 1.0
    zstd_level: int = 1
    snapshot_zstd_level: int = -2  # a negative level: zstd's fast levels (see frames.py)
    streams_max: int = 16  # concurrent streams, and slots; more are RESOURCE_EXHAUSTED
    frame_cache_bytes: int = 32 * 1024 * 1024  # compressed frames the streams share


@dataclass(slots=True)
class Session:
    id: str
    node_id: str
    client_address: str
    peer: str
    codec: Codec
    frames: bool
    sent_seq: int = 0
    received_seq: int = 0
    flushed_seq: int = 0
    applied_seq: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    rewind_to: int = 0  # a Kevo client's Nack: resend from here
    live: bool = False  # the last frame came from the tail window
    progress: ProgressMeter = field(default_factory=ProgressMeter)  # of applied_seq


@dataclass(slots=True)
class BootstrapSession:
    """A snapshot being streamed to a replica (for status)."""

    id: str
    node_id: str
    client_address: str
    peer: str
    snapshot_seq: int = 0  # these three: once the export has begun
    size_estimate: int = 0
    store_format: str = ""
    sent_bytes: int = 0
    progress: ProgressMeter = field(default_factory=ProgressMeter)  # of sent_bytes


SLOT_HOLD = "replication-slots"
# Why a stream was refused, for a replica to act on (trailing metadata "refusal"): it needs a
# snapshot because the WAL no longer reaches its position, or its history diverged from ours.
REFUSAL_KEY = "refusal"
REFUSED_COMPACTED = "wal-compacted"
REFUSED_DIVERGED = "diverged"


class SlotKeeper:
    """The primary's replication slots (`kevo_repl/repl/slots.py`).

    The service updates the table in memory as replicas connect and acknowledge; `maintain`,
    run before every checkpoint (whose retention honours the hold), marks slots over the cap
    lost, moves the WAL hold to what the remaining slots need and saves the table if it changed.
    """

    def __init__(self, wal: WAL, path: str | None, keep_bytes: int) -> None:
        self.wal = wal
        self.path = path  # None: in memory only (tests)
        self.keep_bytes = keep_bytes
        self.table = load_slots(path) if path else SlotTable()
        # A drop and a checkpoint may both maintain at once; one writer of the file at a time.
        self._lock = asyncio.Lock()
        self._hold()

    async def maintain(self) -> None:
        async with self._lock:
            await self._maintain_locked()

    async def _maintain_locked(self) -> None:
        for slot in self.table.enforce_cap(self.wal.bytes_from, self.keep_bytes):
            log.warning(
                "replication slot of %s (%s) is lost: keeping its WAL from sequence %d would "
                "take more than slot_keep_bytes (%d); it will need a new copy of the data",
                slot.node_id,
                slot.client_address or "?",
                slot.restart_seq,
                self.keep_bytes,
            )
        self._hold()
        if self.path is not None and self.table.dirty:
            data = encode_slots(self.table)
            self.table.dirty = False  # acks arriving during the write mark it dirty again
            try:
                await asyncio.to_thread(write_state, self.path, data)
            except BaseException:
                self.table.dirty = True  # not saved: the next checkpoint tries again
                raise

    def _hold(self) -> None:
        seq = self.table.hold_seq()
        if seq is None:
            self.wal.release(SLOT_HOLD)
        else:
            self.wal.hold(SLOT_HOLD, seq)


class Sessions:
    """The primary's connected replicas. Woken from the WAL's sync thread, thread-safely."""

    def __init__(self, wal: WAL, keeper: SlotKeeper | None = None) -> None:
        self._wal = wal
        self.keeper = keeper or SlotKeeper(wal, None, 2**63)
        self._by_id: dict[str, Session] = {}
        self.bootstraps: dict[str, BootstrapSession] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        # (durable seq, wall time) per fsync round, bounded: the basis of lag in seconds.
        self._durable_at: collections.deque[tuple[int, float]] = collections.deque(maxlen=8192)
        self.on_wake: list[Callable[[], None]] = []  # run on the loop after each durable advance

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._wal.add_sync_listener(self._on_synced)

    def lag_seconds(self, applied_seq: int, now: float) -> float:
        """How long the oldest entry the replica has not applied has been durable here."""
        for seq, at in tuple(self._durable_at):
            if seq > applied_seq:
                return max(0.0, now - at)
        return 0.0

    def _on_synced(self, durable_seq: int) -> None:
        self._durable_at.append((durable_seq, time.time()))  # deque.append is thread-safe
        loop = self._loop
        if loop is not None and self._by_id:
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(self.wake_all)

    def wake_all(self) -> None:
        for session in self._by_id.values():
            session.wake.set()
        for listener in self.on_wake:
            listener()

    def open(self, request: rpb.WALStreamRequest, peer: str, codec: Codec) -> Session:
        session = Session(
            id=f"replica-{time.time_ns()}-{next(self._ids)}",
            node_id=request.node_id,
            client_address=request.client_address or request.listener_address,
            peer=peer,
            codec=codec,
            frames=request.frames,
            sent_seq=max(request.start_sequence, 1) - 1,  # what the replica says it has
        )
        self._by_id[session.id] = session
        if session.node_id:
            start = session.sent_seq + 1
            self.keeper.table.connect(
                session.node_id, session.client_address, start, self._wal.first_seq, time.time()
            )
        return session

    def close(self, session: Session) -> None:
        self._by_id.pop(session.id, None)

    def open_bootstrap(self, request: rpb.SnapshotRequest, peer: str) -> BootstrapSession:
        """Registered before the export begins, so it counts against streams_max at once."""
        boot = BootstrapSession(
            f"snapshot-{time.time_ns()}-{next(self._ids)}",
            request.node_id,
            request.client_address,
            peer,
        )
        self.bootstraps[boot.id] = boot
        return boot

    def streams(self) -> int:
        return len(self._by_id) + len(self.bootstraps)

    def get(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    def all(self) -> list[Session]:
        return list(self._by_id.values())


def first_known_codec(accepted: Iterable[int]) -> Codec | None:
    known = {int(c) for c in Codec}
    for wire in accepted:
        if int(wire) in known:
            return Codec(int(wire))
    return None


def choose_codec(request: rpb.WALStreamRequest) -> Codec:
    """The first codec the replica accepts that we speak; Kevo's flags as a fallback."""
    codec = first_known_codec(request.accepted_codecs)
    if codec is not None:
        return codec
    preferred = int(request.preferred_codec)
    if request.compression_supported and preferred in (Codec.ZSTD, Codec.SNAPPY):
        return Codec(preferred)
    return Codec.NONE


class ReplicationService(rpb_grpc.WALReplicationServiceServicer):
    def __init__(
        self,
        wal: WAL,
        sessions: Sessions,
        client_address: str,
        limits: StreamLimits,
        store: Store | None = None,
        history: History | None = None,
    ) -> None:
        self.wal = wal
        self.sessions = sessions
        self.client_address = client_address
        self.limits = limits
        self.store = store
        self.history = history or History.new()
        self.frame_cache = FrameCache(limits.frame_cache_bytes)
        # The frames built ahead of the streams, per codec: up to which sequence, and when.
        self._built_to: dict[Codec, int] = {}
        self._built_at = 0.0
        self._producing: asyncio.Future[None] | None = None
        sessions.on_wake.append(self._produce_soon)

    async def GetReplicationStatus(
        self, request: rpb.ReplicationStatusRequest, context: grpc.aio.ServicerContext
    ) -> rpb.ReplicationStatus:
        durable = self.wal.durable_seq
        now = time.time()
        return rpb.ReplicationStatus(
            role="primary",
            last_sequence=self.wal.last_seq,
            durable_sequence=durable,
            applied_sequence=self.store.applied_seq() if self.store else 0,
            replicas=[
                *(self._replica_status(s, durable, now) for s in self.sessions.all()),
                *(self._bootstrap_status(b, durable) for b in self.sessions.bootstraps.values()),
                *self._absent_replicas(durable, now),
            ],
            history_id=self.history.current,
        )

    def _bootstrap_status(self, boot: BootstrapSession, durable: int) -> rpb.ReplicaStatus:
        now = time.monotonic()
        left = max(0, boot.size_estimate - boot.sent_bytes)
        eta = boot.progress.eta_s(left, now)
        return rpb.ReplicaStatus(
            node_id=boot.node_id,
            client_address=boot.client_address,
            state="bootstrapping",
            lag_entries=max(0, durable - boot.snapshot_seq),
            connected=True,
            apply_rate=boot.progress.rate(now),  # bytes per second while bootstrapping
            eta_seconds=-1.0 if eta is None else eta,
            bootstrap_bytes=boot.sent_bytes,
            bootstrap_total_bytes=boot.size_estimate,
        )

    def _absent_replicas(self, durable: int, now: float) -> list[rpb.ReplicaStatus]:
        """Replicas known by their slot that are not streaming now."""
        streaming = {s.node_id for s in self.sessions.all()}
        streaming |= {b.node_id for b in self.sessions.bootstraps.values()}
        out = []
        for slot in self.sessions.keeper.table:
            if slot.node_id in streaming:
                continue
            has = slot.restart_seq - 1
            lag = max(0, durable - has)
            out.append(
                rpb.ReplicaStatus(
                    node_id=slot.node_id,
                    client_address=slot.client_address,
                    state="lost" if slot.lost else "disconnected",
                    flushed_sequence=has,
                    lag_entries=lag,
                    lag_seconds=self.sessions.lag_seconds(has, now) if lag else 0.0,
                    connected=False,
                )
            )
        return out

    async def GetDigest(
        self, request: rpb.DigestRequest, context: grpc.aio.ServicerContext
    ) -> rpb.StoreDigest:
        if self.store is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this service has no store")
        assert self.store is not None
        return await store_digest(self.store, "primary")

    async def ListSlots(
        self, request: rpb.ListSlotsRequest, context: grpc.aio.ServicerContext
    ) -> rpb.SlotList:
        active = {s.node_id for s in self.sessions.all()}
        keeper = self.sessions.keeper
        return rpb.SlotList(
            slots=[
                rpb.SlotInfo(
                    node_id=slot.node_id,
                    client_address=slot.client_address,
                    restart_sequence=slot.restart_seq,
                    held_bytes=0 if slot.lost else self.wal.bytes_from(slot.restart_seq),
                    lost=slot.lost,
                    active=slot.node_id in active,
                    updated_unix=slot.updated_unix,
                )
                for slot in keeper.table
            ],
            keep_bytes=keeper.keep_bytes,
        )

    async def DropSlot(
        self, request: rpb.DropSlotRequest, context: grpc.aio.ServicerContext
    ) -> rpb.DropSlotResponse:
        node = request.node_id
        if any(s.node_id == node for s in self.sessions.all()):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"replica {node} is streaming now; stop it before dropping its slot",
            )
        if not self.sessions.keeper.table.drop(node):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no replication slot for node {node!r}")
        await self.sessions.keeper.maintain()  # release its WAL now, and make the drop durable
        log.info("replication slot of %s dropped", node)
        return rpb.DropSlotResponse()

    def _replica_status(self, s: Session, durable: int, now: float) -> rpb.ReplicaStatus:
        lag = max(0, durable - s.applied_seq)
        state = "streaming" if s.live or s.sent_seq >= durable else "catching up"
        eta = s.progress.eta_s(lag, time.monotonic())
        return rpb.ReplicaStatus(
            node_id=s.node_id,
            client_address=s.client_address,
            state=state,
            sent_sequence=s.sent_seq,
            received_sequence=s.received_seq,
            flushed_sequence=s.flushed_seq,
            applied_sequence=s.applied_seq,
            lag_entries=lag,
            lag_seconds=self.sessions.lag_seconds(s.applied_seq, now) if lag else 0.0,
            connected=True,
            lag_bytes=self.wal.bytes_from(s.applied_seq + 1) if lag else 0,
            apply_rate=s.progress.rate(time.monotonic()),
            eta_seconds=-1.0 if eta is None else eta,
        )

    async def StreamWAL(
        self, request: rpb.WALStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.WALStreamResponse]:
        start = max(request.start_sequence, 1)
        await self._check_stream_room(context)
        await self._check_slot_room(request.node_id, context)
        await self._check_start(start, context, request.node_id)
        await self._check_history(request.history_id, start - 1, context)
        codec = choose_codec(request) if request.frames else Codec.NONE
        session = self.sessions.open(request, context.peer(), codec)
        log.info("replica %s (%s) streaming from %d", session.node_id or "?", session.peer, start)
        try:
            await context.send_initial_metadata(
                (("session-id", session.id), ("history", self.history.to_json()))
            )
            async for response in self._stream(session, start, context):
                yield response
        finally:
            self.sessions.close(session)
            log.info("replica %s (%s) stream ended", session.node_id or "?", session.peer)

    async def _check_stream_room(self, context: grpc.aio.ServicerContext) -> None:
        if self.sessions.streams() >= self.limits.streams_max:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this primary already streams to {self.limits.streams_max} replicas "
                "(max_replicas); try again later or raise the limit",
            )

    async def _check_slot_room(self, node_id: str, context: grpc.aio.ServicerContext) -> None:
        """Slots are bounded like streams: a client inventing node ids must not pile up slots
        that each hold WAL (PostgreSQL's max_replication_slots)."""
        table = self.sessions.keeper.table
        if node_id and table.get(node_id) is None and len(table) >= self.limits.streams_max:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this primary already has {len(table)} replication slots (max_replicas); "
                "drop one with `kevo-repl slots --drop NODE_ID`",
            )

    async def _check_start(
        self, start: int, context: grpc.aio.ServicerContext, node_id: str
    ) -> None:
        durable = self.wal.durable_seq
        if start > durable + 1:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"diverged: asked for sequence {start} but this primary's log ends at "
                f"{durable}: the replica has entries this primary never had",
                trailing_metadata=((REFUSAL_KEY, REFUSED_DIVERGED),),
            )
        oldest = self.wal.first_seq  # next_seq when the log is empty: all before it is gone
        if start < oldest:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"sequence {start} is no longer in this primary's WAL (oldest is {oldest})"
                + self._lost_note(node_id),
                trailing_metadata=((REFUSAL_KEY, REFUSED_COMPACTED),),
            )

    async def _check_history(
        self, history_id: str, held: int, context: grpc.aio.ServicerContext
    ) -> None:
        """A replica that holds `held` under another history has diverged from this log."""
        if not history_id or self.history.contains(history_id, held):
            return
        ours = self.history.id_at(held) or "none"
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"diverged: the replica holds sequence {held} under history {history_id}, but this "
            f"primary's sequence {held} is under history {ours}; the replica must be rebuilt "
            "from a snapshot",
            trailing_metadata=((REFUSAL_KEY, REFUSED_DIVERGED),),
        )

    def _lost_note(self, node_id: str) -> str:
        slot = self.sessions.keeper.table.get(node_id) if node_id else None
        if slot is None or not slot.lost:
            return ""
        keep = self.sessions.keeper.keep_bytes
        return f"; the replica's slot was lost: it held more than slot_keep_bytes ({keep})"

    async def _stream(
        self, session: Session, start: int, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.WALStreamResponse]:
        next_seq = start
        last_sent_at = 0.0
        behind = True  # the last frame stopped at a limit, not at the durable end: more is ready
        while True:
            if session.rewind_to:
                next_seq, session.rewind_to = session.rewind_to, 0
            durable = self.wal.durable_seq
            if next_seq > durable:
                if not await self._wait_for_more(session, next_seq):
                    yield self._heartbeat()
                continue
            if not behind and time.monotonic() - last_sent_at < self.limits.linger_s:
                # Caught up and writes are arriving close together: let them gather into one
                # frame. Never while catching up, where a full frame is ready at once.
                await asyncio.sleep(self.limits.linger_s)
                durable = self.wal.durable_seq
            try:
                responses = await self._next_responses(session, next_seq, durable)
            except SequenceCompactedError as err:
                await context.abort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    str(err),
                    trailing_metadata=((REFUSAL_KEY, REFUSED_COMPACTED),),
                )
            except CorruptionError as err:  # the primary's own WAL is damaged: a person's job
                log.error("cannot stream to %s: %s", session.peer, err)
                await context.abort(grpc.StatusCode.DATA_LOSS, f"the primary's WAL: {err}")
            if not responses:  # durable but not yet readable: cannot happen, but never spin
                await self._wait_for_more(session, durable + 1)
                continue
            for response, last in responses:
                yield response
                session.sent_seq = last
                next_seq = last + 1
            last_sent_at = time.monotonic()
            behind = next_seq <= durable

    async def StreamSnapshot(
        self, request: rpb.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.SnapshotChunk]:
        """A consistent image of the store at S; the WAL from S + 1 is kept for the replica."""
        store = self.store
        if store is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this service has no store")
        assert store is not None
        await self._check_stream_room(context)
        await self._check_slot_room(request.node_id, context)
        boot = self.sessions.open_bootstrap(request, context.peer())
        image: ImageReader | None = None
        try:
            image = await self._begin_snapshot(store, request, boot, context)
            log.info("snapshot at %d for %s (%s)", boot.snapshot_seq, boot.node_id, boot.peer)
            async for chunk in self._snapshot_chunks(image, boot, context):
                yield chunk
            log.info(
                "snapshot at %d sent to %s: %d bytes",
                boot.snapshot_seq,
                boot.peer,
                image.total_bytes,
            )
        finally:
            if image is not None:
                image.abandon()
            self.wal.release(boot.id)
            self.sessions.bootstraps.pop(boot.id, None)

    async def _begin_snapshot(
        self,
        store: Store,
        request: rpb.SnapshotRequest,
        boot: BootstrapSession,
        context: grpc.aio.ServicerContext,
    ) -> ImageReader:
        try:
            export = await asyncio.to_thread(store.begin_export)
        except KevoReplError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot take a snapshot: {err}")
        if request.store_format and request.store_format != export.format:
            export.close()
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this primary's store is {export.format!r}, the replica opens "
                f"{request.store_format!r} images",
            )
        boot.snapshot_seq = export.applied_seq
        boot.size_estimate = export.size_estimate
        boot.store_format = export.format
        self.wal.hold(boot.id, export.applied_seq + 1)  # until the replica's slot takes over
        codec = first_known_codec(request.accepted_codecs) or Codec.NONE
        return ImageReader(export, codec, self.limits.snapshot_zstd_level)

    async def _snapshot_chunks(
        self, image: ImageReader, boot: BootstrapSession, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.SnapshotChunk]:
        index = 0
        delay = failpoints.delay_s("snapshot_chunk_delay")
        # One chunk read and compressed ahead, while gRPC sends the one before.
        ahead = asyncio.ensure_future(asyncio.to_thread(image.next_chunk))
        while True:
            chunk = await ahead
            if not chunk.raw_len:
                break
            ahead = asyncio.ensure_future(asyncio.to_thread(image.next_chunk))
            if delay:
                await asyncio.sleep(delay)
            message = rpb.SnapshotChunk(
                index=index,
                snapshot_sequence=boot.snapshot_seq,
                codec=wire_codec(image.codec),
                raw_length=chunk.raw_len,
                running_crc32=chunk.crc32,
                payload=chunk.payload,
            )
            if index == 0:
                self._describe_snapshot(message, boot)
            yield message
            index += 1
            boot.sent_bytes += chunk.raw_len
            boot.progress.observe(boot.sent_bytes, time.monotonic())
        try:
            await self._end_snapshot(image, boot, context)
        except KevoReplError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"snapshot failed: {err}")
        last = rpb.SnapshotChunk(
            index=index,
            snapshot_sequence=boot.snapshot_seq,
            last=True,
            total_bytes=image.total_bytes,
            image_crc32=image.crc32,
        )
        if index == 0:
            self._describe_snapshot(last, boot)
        yield last

    async def _end_snapshot(
        self, image: ImageReader, boot: BootstrapSession, context: grpc.aio.ServicerContext
    ) -> None:
        await asyncio.to_thread(image.finish)  # raises what the export raised
        # The image may hold entries the WAL has written but not yet made durable: the replica
        # must never be ahead of what survives a crash here.
        await asyncio.to_thread(self.wal.sync)
        if not boot.node_id:
            return
        # From now on its slot keeps the WAL after the snapshot. Slot room is checked again:
        # other snapshots may have created slots since this one began.
        await self._check_slot_room(boot.node_id, context)
        table = self.sessions.keeper.table
        table.connect(boot.node_id, boot.client_address, boot.snapshot_seq + 1, 0, time.time())
        await self.sessions.keeper.maintain()

    def _describe_snapshot(self, message: rpb.SnapshotChunk, boot: BootstrapSession) -> None:
        message.history = self.history.to_json()
        message.store_format = boot.store_format
        message.size_estimate = boot.size_estimate

    async def Promote(
        self, request: rpb.PromoteRequest, context: grpc.aio.ServicerContext
    ) -> rpb.PromoteResponse:
        await refuse(context, not_promotable("primary"))

    async def _wait_for_more(self, session: Session, next_seq: int) -> bool:
        """Wait until the WAL is durable at `next_seq`; False after a quiet heartbeat interval."""
        session.wake.clear()
        if self.wal.durable_seq >= next_seq or session.rewind_to:
            return True
        try:
            await asyncio.wait_for(session.wake.wait(), self.limits.heartbeat_s)
        except TimeoutError:
            return False
        return True

    async def _next_responses(
        self, session: Session, next_seq: int, durable: int
    ) -> list[tuple[rpb.WALStreamResponse, int]]:
        """One frame from `next_seq`: shared with the other streams, else built for this one."""
        if not session.frames:
            return await asyncio.to_thread(self._kevo_read, next_seq, durable)
        built = await self.frame_cache.get(
            (next_seq, session.codec), lambda: self._build_frame(session.codec, next_seq, durable)
        )
        if built is None:  # a build ahead that found the window moved on: read it ourselves
            built = await self._build_frame(session.codec, next_seq, durable)
        if built is None:
            return []
        # Keeping up: from memory, and ending within one frame of the durable end (frames are
        # also built ahead and kept for streams well behind; those are catching up).
        lag = durable - built.frame.last_seq
        session.live = built.live and lag <= self.limits.frame_entries_max
        return [(self._frame_response(built.frame), built.frame.last_seq)]

    def _produce_soon(self) -> None:
        """After each durable advance: frames of the new entries, built once while their bytes
        are in the tail window, for every codec a stream uses. A stream behind then finds its
        frames in the cache instead of reading the segments back and scanning them (about 1 us
        an entry, in Python, on the primary's busiest thread)."""
        if self._producing is None or self._producing.done():
            self._producing = asyncio.ensure_future(self._produce())
            self._producing.add_done_callback(_producer_ended)

    async def _produce(self) -> None:
        if time.monotonic() - self._built_at < self.limits.linger_s:
            await asyncio.sleep(self.limits.linger_s)  # gather, as a caught-up stream does
        self._built_at = time.monotonic()
        durable = self.wal.durable_seq
        for codec in {s.codec for s in self.sessions.all() if s.frames}:
            start = self._built_to.get(codec, durable) + 1
            while start <= durable:
                build = functools.partial(self._build_frame, codec, start, durable, memory=True)
                built = await self.frame_cache.get((start, codec), build)
                if built is None:  # no longer in the window: streams read it from the segments
                    start = durable + 1
                    break
                start = built.frame.last_seq + 1
            self._built_to[codec] = start - 1

    async def _build_frame(
        self, codec: Codec, next_seq: int, durable: int, *, memory: bool = False
    ) -> Built | None:
        """A frame from the tail window if it holds `next_seq`, else (unless `memory`) from the
        segments. It ends before the next frame the cache holds, so its stream goes on with
        the shared ones."""
        limits = self.limits
        shared = self.frame_cache.next_start(next_seq, codec)
        if shared is not None:
            durable = min(durable, shared - 1)
        got = self.wal.tail_take(
            next_seq, durable, limits.frame_bytes_max, limits.frame_entries_max
        )
        if got is None:
            if memory:
                return None
            frame = await asyncio.to_thread(self._read_frame, codec, next_seq, durable)
            return None if frame is None else Built(frame, live=False)
        args = (got.first_seq, got.last_seq, got.raw, codec, limits.zstd_level)
        if len(got.raw) <= INLINE_COMPRESS_BYTES:
            return Built(encode_raw_frame(*args), live=True)
        return Built(await asyncio.to_thread(encode_raw_frame, *args), live=True)

    def _read_frame(self, codec: Codec, next_seq: int, durable: int) -> Frame | None:
        """Up to one frame of units from the segments (worker thread).

        A frame needs only the units' bytes: they are read `light`, without building entries.
        """
        units = self._take(next_seq, durable, light=True)
        if not units:
            return None
        raw = b"".join(u.raw for u in units)
        level = self.limits.zstd_level
        return encode_raw_frame(units[0].first_seq, units[-1].last_seq, raw, codec, level)

    def _kevo_read(self, next_seq: int, durable: int) -> list[tuple[rpb.WALStreamResponse, int]]:
        """Up to a frame's worth of entries from the segments, as Kevo responses (worker)."""
        units = self._take(next_seq, durable, light=False)
        return self._kevo_responses(units, next_seq) if units else []

    def _take(self, next_seq: int, durable: int, *, light: bool) -> list[Unit]:
        units = self.wal.units_from(next_seq, max_seq=durable, raw=True, light=light)
        return take_units(units, self.limits)

    def _frame_response(self, frame: Frame) -> rpb.WALStreamResponse:
        response = self._heartbeat()
        response.frame.CopyFrom(to_message(frame))
        return response

    def _kevo_responses(
        self, units: list[Unit], next_seq: int
    ) -> list[tuple[rpb.WALStreamResponse, int]]:
        entries = [e for u in units for e in u.entries if e.seq >= next_seq]
        out = []
        for i in range(0, len(entries), KEVO_ENTRIES_PER_RESPONSE):
            chunk = entries[i : i + KEVO_ENTRIES_PER_RESPONSE]
            response = rpb.WALStreamResponse(
                entries=[
                    rpb.WALEntry(
                        sequence_number=e.seq, payload=entry_payload(e.seq, e.op, e.key, e.value)
                    )
                    for e in chunk
                ],
                compressed=False,
                codec=rpb.NONE,
            )
            out.append((response, chunk[-1].seq))
        return out

    def _heartbeat(self) -> rpb.WALStreamResponse:
        return rpb.WALStreamResponse(
            primary_durable_sequence=self.wal.durable_seq,
            primary_time_unix_ms=int(time.time() * 1000),
            primary_client_address=self.client_address,
        )

    async def Acknowledge(
        self, request: rpb.Ack, context: grpc.aio.ServicerContext
    ) -> rpb.AckResponse:
        session = self._session_of(context)
        if session is None:
            return rpb.AckResponse(success=False, message="Unknown session")
        applied = request.applied_sequence or request.acknowledged_up_to
        received = request.received_sequence or applied
        if max(received, request.flushed_sequence, applied) > session.sent_seq:
            # Positions past what was sent would move the slot past the WAL's end and release
            # WAL this replica still needs.
            return rpb.AckResponse(
                success=False,
                message=f"acknowledged past sequence {session.sent_seq}, the last one sent",
            )
        session.received_seq = max(session.received_seq, received)
        session.flushed_seq = max(session.flushed_seq, request.flushed_sequence or applied)
        session.applied_seq = max(session.applied_seq, applied)
        session.progress.observe(session.applied_seq, time.monotonic())
        if session.node_id:
            self.sessions.keeper.table.advance(session.node_id, session.flushed_seq, time.time())
        return rpb.AckResponse(success=True)

    async def NegativeAcknowledge(
        self, request: rpb.Nack, context: grpc.aio.ServicerContext
    ) -> rpb.NackResponse:
        session = self._session_of(context)
        if session is None:
            return rpb.NackResponse(success=False, message="Unknown session")
        if (
            request.missing_from_sequence < 1
            or request.missing_from_sequence > session.sent_seq + 1
        ):
            return rpb.NackResponse(
                success=False,
                message=f"cannot resend from {request.missing_from_sequence}: "
                f"sent up to {session.sent_seq}",
            )
        session.rewind_to = request.missing_from_sequence
        session.wake.set()
        return rpb.NackResponse(success=True)

    def _session_of(self, context: grpc.aio.ServicerContext) -> Session | None:
        for key, value in context.invocation_metadata() or ():
            if key == "session-id":
                return self.sessions.get(str(value))
        return None


def _producer_ended(task: asyncio.Future[None]) -> None:
    """Frames built ahead are an optimisation: a failure there (the WAL closing at shutdown, a
    segment error a stream it joined reports itself) costs only the frames not built."""
    if not task.cancelled() and (err := task.exception()) is not None:
        log.debug("building frames ahead stopped: %s", err)


def take_units(units: Iterator[Unit], limits: StreamLimits) -> list[Unit]:
    """Whole units up to the frame limits (the first unit is always taken, however large)."""
    taken: list[Unit] = []
    size = entries = 0
    try:
        for unit in units:
            taken.append(unit)
            size += unit.length
            entries += unit.last_seq - unit.first_seq + 1  # `light` units carry no entries
            if size >= limits.frame_bytes_max or entries >= limits.frame_entries_max:
                break
    finally:
        close = getattr(units, "close", None)
        if close is not None:
            close()  # release the segment file the reader holds
    return taken


class ElsewhereService(rpb_grpc.WALReplicationServiceServicer):
    """On the node's port when replication has a port of its own (`replication_listen`).

    Status, digest and slots are answered here too; a stream or an ack is refused with the
    address to use.
    """

    # Answered here as on the replication port: the calls an operator's tools make.
    DELEGATED = ("GetReplicationStatus", "GetDigest", "ListSlots", "DropSlot", "Promote")

    def __init__(self, inner: rpb_grpc.WALReplicationServiceServicer, address: str) -> None:
        self._message = f"replication is served on {address}, not on this port"
        for name in self.DELEGATED:  # gRPC looks the handlers up on the instance
            setattr(self, name, getattr(inner, name))

    async def StreamWAL(
        self, request: rpb.WALStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.WALStreamResponse]:
        await refuse(context, self._message)
        yield rpb.WALStreamResponse()  # never reached: abort raises

    async def StreamSnapshot(
        self, request: rpb.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.SnapshotChunk]:
        await refuse(context, self._message)
        yield rpb.SnapshotChunk()  # never reached: abort raises

    async def Acknowledge(
        self, request: rpb.Ack, context: grpc.aio.ServicerContext
    ) -> rpb.AckResponse:
        await refuse(context, self._message)

    async def NegativeAcknowledge(
        self, request: rpb.Nack, context: grpc.aio.ServicerContext
    ) -> rpb.NackResponse:
        await refuse(context, self._message)
