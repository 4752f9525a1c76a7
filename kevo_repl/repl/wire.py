"""Conversions between the pure codecs' types (frames, snapshot chunks) and their protobuf
messages, in one place."""

from __future__ import annotations

from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.repl.frames import Codec, Frame
from kevo_repl.repl.snapshot import Chunk


def wire_codec(codec: Codec) -> str:
    """The proto enum value for `codec` (message constructors take enum names)."""
    return codec.name


def to_message(frame: Frame) -> rpb.Frame:
    return rpb.Frame(
        first_sequence=frame.first_seq,
        last_sequence=frame.last_seq,
        codec=wire_codec(frame.codec),
        raw_length=frame.raw_len,
        crc32=frame.crc32,
        payload=frame.payload,
    )


def from_message(message: rpb.Frame) -> Frame:
    """The frame a message carries; an unknown codec is left for `decode_frame` to refuse."""
    codec = Codec(message.codec) if message.codec in {int(c) for c in Codec} else message.codec
    return Frame(
        message.first_sequence,
        message.last_sequence,
        codec,  # type: ignore[arg-type]
        message.raw_length,
        message.crc32,
        message.payload,
    )


def chunk_of(message: rpb.SnapshotChunk) -> Chunk:
    """The fields of a snapshot chunk that `SnapshotReceiver` checks."""
    return Chunk(
        message.index,
        message.snapshot_sequence,
        message.codec,
        message.raw_length,
        message.running_crc32,
        message.payload,
        message.last,
        message.total_bytes,
        message.image_crc32,
    )
