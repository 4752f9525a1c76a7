"""The primary's WALReplicationService, in process over real gRPC on 127.0.0.1.

Clients here: our frame protocol, and a Kevo-protocol client written from KEVO_COMPAT.md §2.8
(per-entry payloads, session-id header, inclusive start, consecutive sequence numbers, unary
Ack/Nack, empty heartbeats).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.repl.frames import Codec, Frame, decode_frame
from kevo_repl.repl.primary import ReplicationService, Sessions, StreamLimits
from kevo_repl.repl.wire import from_message, wire_codec
from kevo_repl.wal import WAL, Op, RetentionPolicy, SyncMode, WalOptions
from kevo_repl.wal.codec import decode_entry

LIMITS = StreamLimits(frame_bytes_max=4096, heartbeat_s=0.2)


@asynccontextmanager
async def primary(wal: WAL) -> AsyncIterator[rpb_grpc.WALReplicationServiceStub]:
    async with primary_with(wal, LIMITS) as (stub, _):
        yield stub


@asynccontextmanager
async def primary_with(
    wal: WAL, limits: StreamLimits
) -> AsyncIterator[tuple[rpb_grpc.WALReplicationServiceStub, Sessions]]:
    async with service_with(wal, limits) as (stub, service):
        yield stub, service.sessions


@asynccontextmanager
async def service_with(
    wal: WAL, limits: StreamLimits
) -> AsyncIterator[tuple[rpb_grpc.WALReplicationServiceStub, ReplicationService]]:
    sessions = Sessions(wal)
    sessions.attach(asyncio.get_running_loop())
    server = grpc.aio.server()
    service = ReplicationService(wal, sessions, "127.0.0.1:9", limits)
    rpb_grpc.add_WALReplicationServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rpb_grpc.WALReplicationServiceStub(channel)  # type: ignore[no-untyped-call]
            yield stub, service
    finally:
        await server.stop(None)


def _fill(wal: WAL, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        if i % 10 == 9:
            wal.append_batch([(Op.PUT, b"b%d-%d" % (i, j), b"x" * 30) for j in range(3)])
        else:
            wal.append(Op.PUT, b"k%d" % i, b"v" * (i % 70))


def _run(wal_dir: Path, scenario: Callable[[WAL], Awaitable[None]], window: int = 0) -> None:
    async def main() -> None:
        options = WalOptions(sync_mode=SyncMode.IMMEDIATE, tail_window_bytes=window)
        wal = WAL.open(str(wal_dir), options)
        try:
            await scenario(wal)
        finally:
            wal.close()

    asyncio.run(main())


def _frame(response: rpb.WALStreamResponse) -> Frame:
    return from_message(response.frame)


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.SNAPPY, Codec.NONE])
def test_frames_catch_up_then_live_tail(tmp_path: Path, codec: Codec) -> None:
    async def scenario(wal: WAL) -> None:
        _fill(wal, 200)
        async with primary(wal) as stub:
            request = rpb.WALStreamRequest(
                start_sequence=1, frames=True, accepted_codecs=[wire_codec(codec)], node_id="r1"
            )
            call = stub.StreamWAL(request)
            seen: list[int] = []
            frames = 0
            async for response in call:
                if not response.HasField("frame"):
                    continue  # heartbeat
                assert response.frame.codec == codec
                frames += 1
                units = decode_frame(_frame(response))
                seen += [e.seq for u in units for e in u.entries]
                if seen[-1] == wal.last_seq and wal.last_seq < 400:
                    _fill(wal, 100, start=200)  # the live tail: written after we caught up
                if seen[-1] >= 400 and seen[-1] == wal.last_seq:
                    break
            call.cancel()
            assert seen == list(range(1, wal.last_seq + 1))  # no gap, no duplicate
            assert frames > 2  # 4 KiB frames: the catch-up was cut into several

    _run(tmp_path, scenario)


def test_kevo_protocol_client(tmp_path: Path) -> None:
    async def scenario(wal: WAL) -> None:
        _fill(wal, 150)
        async with primary(wal) as stub:
            request = rpb.WALStreamRequest(start_sequence=5, listener_address="127.0.0.1:7")
            call = stub.StreamWAL(request)
            session_id = dict(await call.initial_metadata())["session-id"]
            assert session_id.startswith("replica-")
            expected = 5
            async for response in call:
                assert not response.compressed and response.codec == rpb.NONE
                assert len(response.entries) <= 100
                for entry in response.entries:
                    assert entry.sequence_number == expected  # strictly consecutive
                    parsed = decode_entry(entry.payload)
                    assert parsed.seq == expected
                    expected += 1
                if expected > wal.last_seq:
                    break
            meta = (("session-id", session_id),)
            beyond = rpb.Ack(acknowledged_up_to=100, flushed_sequence=2**64 - 1)
            refused = await stub.Acknowledge(beyond, metadata=meta)  # past what was sent
            assert not refused.success and "past sequence" in refused.message
            ack = await stub.Acknowledge(rpb.Ack(acknowledged_up_to=100), metadata=meta)
            assert ack.success
            nack = await stub.NegativeAcknowledge(rpb.Nack(missing_from_sequence=90), metadata=meta)
            assert nack.success
            async for response in call:  # the resend starts exactly at 90
                if response.entries:
                    assert response.entries[0].sequence_number == 90
                    break
            call.cancel()
            unknown = await stub.Acknowledge(rpb.Ack(acknowledged_up_to=1))
            assert not unknown.success and unknown.message == "Unknown session"

    _run(tmp_path, scenario)


def test_refusals_and_heartbeats(tmp_path: Path) -> None:
    async def scenario(wal: WAL) -> None:
        _fill(wal, 20)
        async with primary(wal) as stub:
            past = stub.StreamWAL(rpb.WALStreamRequest(start_sequence=500, frames=True))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await past.read()
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "log ends at" in (info.value.details() or "")
            caught_up = stub.StreamWAL(
                rpb.WALStreamRequest(start_sequence=wal.last_seq + 1, frames=True)
            )
            beat = await asyncio.wait_for(caught_up.read(), 5)
            assert isinstance(beat, rpb.WALStreamResponse)
            assert not beat.HasField("frame")
            assert beat.primary_durable_sequence == wal.last_seq
            assert beat.primary_client_address == "127.0.0.1:9"
            caught_up.cancel()

    _run(tmp_path, scenario)


def test_compacted_start_is_out_of_range(tmp_path: Path) -> None:
    async def scenario(wal: WAL) -> None:
        _fill(wal, 20)
        async with primary(wal) as stub:
            ok = stub.StreamWAL(rpb.WALStreamRequest(start_sequence=1, frames=True))
            first = await ok.read()
            assert isinstance(first, rpb.WALStreamResponse) and first.frame.first_sequence == 1
            ok.cancel()

    _run(tmp_path, scenario)
    wal = WAL.open(str(tmp_path), WalOptions(segment_bytes_max=4096))
    _fill(wal, 300, start=20)
    wal.apply_retention(RetentionPolicy(min_seq_keep=200))
    oldest = wal.first_seq
    wal.close()
    assert oldest > 1

    async def compacted(wal: WAL) -> None:
        async with primary(wal) as stub:
            call = stub.StreamWAL(rpb.WALStreamRequest(start_sequence=1, frames=True))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert f"oldest is {oldest}" in (info.value.details() or "")

    _run(tmp_path, compacted)


def test_frame_message_round_trip_and_unknown_codec(tmp_path: Path) -> None:
    from kevo_repl.repl.frames import FrameError, encode_frame
    from kevo_repl.repl.wire import to_message

    with WAL.open(str(tmp_path)) as wal:
        _fill(wal, 12)
        frame = encode_frame(list(wal.units_from(1)), Codec.SNAPPY)
    assert from_message(to_message(frame)) == frame
    message = to_message(frame)
    message.codec = 7  # type: ignore[assignment]  # what a future or broken peer might send
    with pytest.raises(FrameError, match="unknown codec 7"):
        decode_frame(from_message(message))


def test_stream_moves_from_segments_to_the_tail_window_without_gap(tmp_path: Path) -> None:
    """Behind the window: frames from the segments; then from memory, seamlessly."""

    async def scenario(wal: WAL) -> None:
        _fill(wal, 200)  # far more than the 2 KiB window holds
        assert wal.tail_take(1, wal.last_seq, 4096, 100) is None
        async with primary_with(wal, LIMITS) as (stub, sessions):
            call = stub.StreamWAL(rpb.WALStreamRequest(start_sequence=1, frames=True))
            seen: list[int] = []
            caught_up = 0
            sources: dict[bool, list[bool]] = {False: [], True: []}  # by phase: caught up yet?
            async for response in call:
                if not response.HasField("frame"):
                    continue
                seen += [e.seq for u in decode_frame(_frame(response)) for e in u.entries]
                # The flag of this frame, or of the next one if the stream built it already.
                sources[caught_up > 0].append(sessions.all()[0].live)
                if seen[-1] == wal.last_seq and wal.last_seq < 320:
                    caught_up += 1
                    _fill(wal, 30, start=wal.last_seq)  # written while the replica is caught up
                if seen[-1] >= 320 and seen[-1] == wal.last_seq:
                    break
            call.cancel()
        assert seen == list(range(1, wal.last_seq + 1))  # no gap, no duplicate
        assert not sources[False][0]  # behind the window: from the segments
        assert caught_up >= 2 and len(sources[True]) >= caught_up
        assert all(sources[True])  # everything written while caught up: from memory

    _run(tmp_path, scenario, window=8192)


async def _frames_of(
    stub: rpb_grpc.WALReplicationServiceStub, codec: Codec, last: int
) -> list[Frame]:
    request = rpb.WALStreamRequest(
        start_sequence=1, frames=True, accepted_codecs=[wire_codec(codec)]
    )
    call = stub.StreamWAL(request)
    frames: list[Frame] = []
    async for response in call:
        if response.HasField("frame"):
            frames.append(_frame(response))
            if frames[-1].last_seq >= last:
                break
    call.cancel()
    return frames


def test_streams_at_one_position_share_each_frame(tmp_path: Path) -> None:
    """Three replicas catching up together: each frame is built once (per codec) and sent to
    every stream at its position; the streams see the same boundaries and the same bytes."""

    async def scenario(wal: WAL) -> None:
        _fill(wal, 300)
        async with service_with(wal, LIMITS) as (stub, service):
            last = wal.last_seq
            got = await asyncio.gather(
                _frames_of(stub, Codec.ZSTD, last),
                _frames_of(stub, Codec.ZSTD, last),
                _frames_of(stub, Codec.SNAPPY, last),
            )
            cache = service.frame_cache
        zstd_a, zstd_b, snappy = got
        assert len(zstd_a) > 2  # 4 KiB frames: several of them
        assert zstd_a == zstd_b  # the same frames, boundaries and payloads
        assert all(f.codec == Codec.SNAPPY for f in snappy)  # a codec is never shared across
        for frames in got:
            seqs = [e.seq for f in frames for u in decode_frame(f) for e in u.entries]
            assert seqs == list(range(1, last + 1))
        # Built once per codec: of the two zstd streams, one built each frame and the other
        # was sent the same one.
        assert cache.builds == len(zstd_a) + len(snappy)
        assert cache.hits == len(zstd_b)

    _run(tmp_path, scenario)


def test_streams_beyond_the_limit_are_refused(tmp_path: Path) -> None:
    async def scenario(wal: WAL) -> None:
        _fill(wal, 5)
        limits = StreamLimits(heartbeat_s=0.2, streams_max=1)
        async with primary_with(wal, limits) as (stub, _):
            first = stub.StreamWAL(rpb.WALStreamRequest(start_sequence=1, frames=True))
            assert isinstance(await first.read(), rpb.WALStreamResponse)
            second = stub.StreamWAL(rpb.WALStreamRequest(start_sequence=1, frames=True))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await second.read()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_replicas" in (info.value.details() or "")
            first.cancel()

    _run(tmp_path, scenario)


def test_slots_are_bounded_like_streams(tmp_path: Path) -> None:
    async def scenario(wal: WAL) -> None:
        _fill(wal, 5)
        limits = StreamLimits(heartbeat_s=0.2, streams_max=2)
        async with primary_with(wal, limits) as (stub, sessions):
            for node in ("old-1", "old-2"):  # replicas that went away, their slots kept
                sessions.keeper.table.connect(node, "", 1, 1, 0.0)
            new = stub.StreamWAL(rpb.WALStreamRequest(start_sequence=1, frames=True, node_id="n"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await new.read()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 replication slots" in (info.value.details() or "")
            known = stub.StreamWAL(
                rpb.WALStreamRequest(start_sequence=1, frames=True, node_id="old-1")
            )
            assert isinstance(await known.read(), rpb.WALStreamResponse)  # its slot exists
            known.cancel()
            assert len(sessions.keeper.table) == 2

    _run(tmp_path, scenario)


def test_a_damaged_segment_ends_the_stream_with_data_loss(tmp_path: Path) -> None:
    """Corruption in the primary's WAL is DATA_LOSS naming the file, not UNKNOWN."""
    wal = WAL.open(str(tmp_path), WalOptions(segment_bytes_max=4096))
    _fill(wal, 300)
    wal.close()
    second = sorted(p for p in tmp_path.iterdir() if p.name.endswith(".wal"))[1]
    data = bytearray(second.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a damaged record with data after it: corruption
    second.write_bytes(bytes(data))

    async def scenario(wal: WAL) -> None:
        async with primary(wal) as stub:
            call = stub.StreamWAL(rpb.WALStreamRequest(start_sequence=1, frames=True))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.DATA_LOSS
            assert second.name in (info.value.details() or "")

    _run(tmp_path, scenario)


def test_frames_are_built_ahead_of_the_streams_while_the_bytes_are_in_memory(
    tmp_path: Path,
) -> None:
    """Each durable advance builds frames of the new entries from the tail window, for the codec
    a stream uses, so a stream that is behind sends them from the cache instead of reading and
    scanning the segments; its frames then meet the shared boundaries."""

    async def scenario(wal: WAL) -> None:
        sessions = Sessions(wal)
        sessions.attach(asyncio.get_running_loop())
        limits = StreamLimits(frame_bytes_max=4096, linger_s=0.0)
        service = ReplicationService(wal, sessions, "127.0.0.1:9", limits)
        request = rpb.WALStreamRequest(start_sequence=1, frames=True)
        session = sessions.open(request, "peer", Codec.ZSTD)
        _fill(wal, 20)  # before any frame was built ahead: the stream reads these itself
        await asyncio.sleep(0.05)
        first_ahead = wal.last_seq + 1
        for start in range(20, 220, 20):
            _fill(wal, 20, start=start)  # durable at once (sync mode immediate)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        cache = service.frame_cache
        built = cache.builds
        assert built >= 5  # 4 KiB frames of ~220 entries written in ten steps
        assert cache.next_start(first_ahead - 1, Codec.ZSTD) == first_ahead
        # The stream, far behind, catches up: every frame from first_ahead on is a cache hit.
        seen: list[int] = []
        next_seq = 1
        while next_seq <= wal.durable_seq:
            (response, last), *_ = await service._next_responses(session, next_seq, wal.durable_seq)
            frame = _frame(response)
            seen += [e.seq for u in decode_frame(frame) for e in u.entries]
            next_seq = last + 1
        assert seen == list(range(1, wal.last_seq + 1))
        assert cache.builds - built <= 1  # at most its first frame, from the segments
        assert cache.hits >= built - 1

    _run(tmp_path, scenario, window=1 << 20)
