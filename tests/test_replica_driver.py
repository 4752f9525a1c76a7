"""The replica driver against a scripted fake primary that sends corrupt frames.

Each bad frame (bad checksum, bad compressed data, a sequence gap) must end in a clear error and a
re-request from the right sequence, and never in a wrong store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from kevo_repl.node.engine import Engine, WalOpener
from kevo_repl.node.service import Role
from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.repl.frames import Codec, Frame, encode_frame
from kevo_repl.repl.replica import ReplicaDriver
from kevo_repl.repl.replica_state import Action, ReplicaCore, SendAck
from kevo_repl.repl.wire import to_message
from kevo_repl.store import MAX_KEY_BYTES, MemoryStore
from kevo_repl.wal import WAL, Op, RetentionPolicy, Unit, WalOptions


def _units(path: Path, n: int) -> list[Unit]:
    with WAL.open(str(path)) as wal:
        for i in range(n):
            wal.append(Op.PUT, b"k%03d" % i, b"v%d" % i)
        return list(wal.units_from(1))


def _response(frame: Frame) -> rpb.WALStreamResponse:
    return rpb.WALStreamResponse(
        frame=to_message(frame),
        primary_durable_sequence=30,
        primary_client_address="127.0.0.1:1",
    )


class ScriptedPrimary(rpb_grpc.WALReplicationServiceServicer):
    """Connection k gets script[k] (then waits); records every request's start sequence."""

    def __init__(self, script: list[list[rpb.WALStreamResponse]]) -> None:
        self.script = script
        self.starts: list[int] = []
        self.acks: list[int] = []

    async def StreamWAL(
        self, request: rpb.WALStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.WALStreamResponse]:
        self.starts.append(request.start_sequence)
        await context.send_initial_metadata((("session-id", f"s{len(self.starts)}"),))
        responses = (
            self.script[len(self.starts) - 1] if len(self.starts) <= len(self.script) else []
        )
        for response in responses:
            yield response
        await asyncio.sleep(30)  # then stay open and quiet

    async def Acknowledge(
        self, request: rpb.Ack, context: grpc.aio.ServicerContext
    ) -> rpb.AckResponse:
        self.acks.append(request.applied_sequence)
        return rpb.AckResponse(success=True)


def test_corrupt_frames_are_rerequested_never_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    units = _units(tmp_path / "source", 30)
    good_1_10 = encode_frame(units[0:10], Codec.ZSTD)
    bad_crc = dataclasses.replace(encode_frame(units[0:10], Codec.SNAPPY), crc32=12345)
    gap = encode_frame(units[14:20], Codec.ZSTD)  # 15..20 while 11 is next
    good_11_20 = encode_frame(units[10:20], Codec.NONE)
    garbage = dataclasses.replace(
        encode_frame(units[20:30], Codec.ZSTD), payload=b"\x28\xb5\x2f\xfdjunk"
    )
    good_21_30 = encode_frame(units[20:30], Codec.ZSTD)
    primary = ScriptedPrimary(
        [
            [_response(bad_crc)],
            [_response(good_1_10), _response(gap)],
            [_response(good_11_20), _response(garbage)],
            [_response(good_21_30)],
        ]
    )

    async def scenario() -> tuple[int, list[bytes | None], ReplicaDriver]:
        server = grpc.aio.server()
        rpb_grpc.add_WALReplicationServiceServicer_to_server(primary, server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        store = MemoryStore()
        opener = WalOpener(str(tmp_path / "replica-wal"), WalOptions())
        engine = Engine.open(opener, store, RetentionPolicy(), MAX_KEY_BYTES)
        role = Role("replica", "127.0.0.1:2")
        driver = ReplicaDriver(engine, f"127.0.0.1:{port}", "node-a", "127.0.0.1:2", role)
        stop = asyncio.Event()
        task = asyncio.create_task(driver.run(stop))
        for _ in range(400):  # up to ~20 s, backoff included
            await asyncio.sleep(0.05)
            if store.applied_seq() == 30:
                break
        stop.set()
        await task
        applied, values = store.applied_seq(), [store.get(b"k%03d" % i) for i in range(30)]
        await server.stop(None)
        await engine.close()
        return applied, values, driver

    with caplog.at_level(logging.WARNING, logger="kevo_repl.repl.replica"):
        applied, values, driver = asyncio.run(scenario())
    errors = [r.getMessage() for r in caplog.records if r.name == "kevo_repl.repl.replica"]
    assert applied == 30
    assert values == [b"v%d" % i for i in range(30)]
    assert primary.starts == [1, 1, 11, 21]  # each failure re-requests the next needed sequence
    assert any("CRC" in e for e in errors), errors
    assert any("gap: expected sequence 11" in e for e in errors), errors
    assert any("zstd" in e.lower() for e in errors), errors
    assert driver.role.primary_client_address == "127.0.0.1:1"
    with WAL.open(str(tmp_path / "replica-wal")) as wal:  # its own WAL: 1..30 once, in order
        assert [e.seq for e in wal.entries_from(1)] == list(range(1, 31))


class SlowAckPrimary(ScriptedPrimary):
    """Answers each ack after 0.3 s and records how many were in flight at once."""

    def __init__(self, script: list[list[rpb.WALStreamResponse]]) -> None:
        super().__init__(script)
        self.in_flight = 0
        self.most_in_flight = 0

    async def Acknowledge(
        self, request: rpb.Ack, context: grpc.aio.ServicerContext
    ) -> rpb.AckResponse:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.3)
        self.in_flight -= 1
        self.acks.append(request.applied_sequence)
        return rpb.AckResponse(success=True)


def test_a_slow_primary_never_has_more_than_one_ack_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten frames, each applied and acknowledged on its own, against 0.3 s acks: one ack is in
    flight at a time and the newest waiting one replaces any older one, which is never sent."""
    from kevo_repl.repl import replica

    # No merging of queued frames and no ack coalescing in the core: an ack is due per frame.
    monkeypatch.setattr(replica, "MERGE_ENTRIES_MAX", 1)
    monkeypatch.setattr(replica, "ReplicaCore", functools.partial(ReplicaCore, ack_interval_s=0))
    due: list[int] = []  # the applied position of every ack the core asked for
    send_ack = ReplicaDriver._ack

    async def recording_ack(self: ReplicaDriver, action: SendAck) -> list[Action]:
        due.append(action.applied)
        return await send_ack(self, action)

    monkeypatch.setattr(ReplicaDriver, "_ack", recording_ack)
    units = _units(tmp_path / "source", 30)
    frames = [_response(encode_frame(units[i : i + 3], Codec.ZSTD)) for i in range(0, 30, 3)]
    primary = SlowAckPrimary([frames])

    async def scenario() -> None:
        server = grpc.aio.server()
        rpb_grpc.add_WALReplicationServiceServicer_to_server(primary, server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        store = MemoryStore()
        engine = Engine.open(
            WalOpener(str(tmp_path / "wal"), WalOptions()), store, RetentionPolicy(), MAX_KEY_BYTES
        )
        role = Role("replica", "127.0.0.1:2")
        driver = ReplicaDriver(engine, f"127.0.0.1:{port}", "node-b", "127.0.0.1:2", role)
        stop = asyncio.Event()
        task = asyncio.create_task(driver.run(stop))
        for _ in range(200):  # up to ~10 s
            await asyncio.sleep(0.05)
            if primary.acks and primary.acks[-1] == 30:
                break
        stop.set()
        await task
        await server.stop(None)
        await engine.close()

    asyncio.run(scenario())
    assert due == list(range(3, 31, 3))  # one ack due per frame: nothing merged them
    assert primary.acks and primary.acks[-1] == 30  # the newest positions always get through
    assert primary.most_in_flight == 1
    # Sent in order, each at most once; the older acks that waited were replaced, never sent.
    assert primary.acks == sorted(set(primary.acks)) and set(primary.acks) < set(due), primary.acks


def test_waiting_frames_merge_until_anything_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames already queued are applied as one; a heartbeat or a gap is held, in order."""
    from kevo_repl.repl import replica
    from kevo_repl.wal.codec import decode_unit

    units = _units(tmp_path / "source", 30)
    got = [replica._decode(_response(encode_frame(units[i : i + 5], Codec.ZSTD))) for i in (0, 5)]
    got += [replica._decode(_response(encode_frame(units[i : i + 5], Codec.NONE))) for i in (10,)]
    frames = [f for f in got if isinstance(f, replica._Received)]
    later = [
        replica._decode(_response(encode_frame(units[i : i + 5], Codec.ZSTD))) for i in (15, 25)
    ]
    heartbeat = rpb.WALStreamResponse(primary_durable_sequence=30)

    async def scenario() -> None:
        queue: asyncio.Queue[replica._Item] = asyncio.Queue()
        stream = replica._Stream(call=None, reader=None, queue=queue)  # type: ignore[arg-type]
        for item in (frames[1], frames[2], heartbeat, *later):
            queue.put_nowait(item)
        merged = replica._merge_waiting(frames[0], stream)
        assert [u.first_seq for u in merged.units] == list(range(1, 16))
        assert [e.seq for e in merged.entries] == list(range(1, 16))
        assert merged.response is frames[2].response  # the newest frame's positions
        for raw, part in merged.parts:  # each part's offsets index into its own payload
            assert [decode_unit(raw, u.offset) for u in part] == [u._replace(raw=b"") for u in part]
        assert stream.held is heartbeat and queue.qsize() == 2
        stream.held = None
        first = queue.get_nowait()
        assert isinstance(first, replica._Received)
        alone = replica._merge_waiting(first, stream)  # 16..20, then 26..30 does not continue
        assert alone is first and stream.held is later[1]
        monkeypatch.setattr(replica, "MERGE_ENTRIES_MAX", 10)
        stream.held = None
        for item in frames[1:]:
            queue.put_nowait(item)
        capped = replica._merge_waiting(frames[0], stream)
        assert len(capped.parts) == 2 and queue.qsize() == 1  # 10 entries reached: stop

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_silent_primary_is_given_up_on_logged_and_shown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A primary that sends a frame and then nothing (no heartbeat) past dead_after_s: the
    replica says so in its log and its last error (status), and connects again."""
    units = _units(tmp_path / "source", 5)
    primary = ScriptedPrimary([[_response(encode_frame(units, Codec.ZSTD))]])

    async def scenario() -> ReplicaDriver:
        async with _following(primary, tmp_path) as driver:
            for _ in range(300):  # up to ~15 s
                await asyncio.sleep(0.05)
                if len(primary.starts) >= 2:
                    break
        return driver

    with caplog.at_level(logging.WARNING, logger="kevo_repl.repl.replica"):
        driver = asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.name == "kevo_repl.repl.replica"]
    assert primary.starts[:2] == [1, 6]  # gave up, then asked again from where it was
    assert any("dead_after_s" in w for w in warnings), warnings
    assert "dead_after_s" in driver.last_error


@contextlib.asynccontextmanager
async def _following(primary: ScriptedPrimary, tmp_path: Path) -> AsyncIterator[ReplicaDriver]:
    """A replica driver running against `primary` (served on 127.0.0.1) until the block ends."""
    server = grpc.aio.server()
    rpb_grpc.add_WALReplicationServiceServicer_to_server(primary, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    opener = WalOpener(str(tmp_path / "replica-wal"), WalOptions())
    engine = Engine.open(opener, MemoryStore(), RetentionPolicy(), MAX_KEY_BYTES)
    role = Role("replica", "127.0.0.1:2")
    driver = ReplicaDriver(engine, f"127.0.0.1:{port}", "node-a", "127.0.0.1:2", role)
    stop = asyncio.Event()
    task = asyncio.create_task(driver.run(stop))
    try:
        yield driver
    finally:
        stop.set()
        await task
        await server.stop(None)
        await engine.close()
