"""`kevo-repl put|get|delete|scan|status|digest|slots --addr HOST:PORT`: a node from a shell."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from kevo_repl.proto import replication_pb2 as rpb
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.proto import service_pb2 as pb
from kevo_repl.proto import service_pb2_grpc as pb_grpc

TIMEOUT_S = 10.0


def run_client(args: argparse.Namespace) -> int:
    """One channel and one error path for every command: a failed call prints its status code
    and message and exits 1."""
    command = _COMMANDS.get(args.command, _kevo_call)
    with grpc.insecure_channel(args.addr) as channel:
        try:
            return command(channel, args)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1


def _kevo_call(channel: grpc.Channel, args: argparse.Namespace) -> int:
    # os.fsencode: arguments are bytes the shell passed (undecodable ones arrive as surrogate
    # escapes); .encode() would raise on them.
    stub = pb_grpc.KevoServiceStub(channel)  # type: ignore[no-untyped-call]
    if args.command == "put":
        stub.Put(
            pb.PutRequest(key=os.fsencode(args.key), value=os.fsencode(args.value), sync=args.sync),
            timeout=TIMEOUT_S,
        )
        return 0
    if args.command == "get":
        reply = stub.Get(pb.GetRequest(key=os.fsencode(args.key)), timeout=TIMEOUT_S)
        if not reply.found:
            print(f"not found: {args.key}", file=sys.stderr)
            return 1
        print(reply.value.decode("utf-8", "backslashreplace"))
        return 0
    if args.command == "delete":
        stub.Delete(pb.DeleteRequest(key=os.fsencode(args.key)), timeout=TIMEOUT_S)
        return 0
    request = pb.ScanRequest(
        prefix=os.fsencode(args.prefix),
        start_key=os.fsencode(args.start),
        end_key=os.fsencode(args.end),
        limit=args.limit,
    )
    for row in stub.Scan(request, timeout=TIMEOUT_S * 6):
        key = row.key.decode("utf-8", "backslashreplace")
        print(f"{key}\t{row.value.decode('utf-8', 'backslashreplace')}")
    return 0


def _status(channel: grpc.Channel, args: argparse.Namespace) -> int:
    stub = rpb_grpc.WALReplicationServiceStub(channel)  # type: ignore[no-untyped-call]
    while True:
        try:
            status = stub.GetReplicationStatus(rpb.ReplicationStatusRequest(), timeout=TIMEOUT_S)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            status = rpb.ReplicationStatus(role="standalone")  # a node without the extension
        print(format_status(status, args.json), flush=True)
        if not args.watch:
            return 0
        time.sleep(1.0)


def _digest(channel: grpc.Channel, args: argparse.Namespace) -> int:
    stub = rpb_grpc.WALReplicationServiceStub(channel)  # type: ignore[no-untyped-call]
    # Hashing a large store takes a while: a generous deadline.
    digest = stub.GetDigest(rpb.DigestRequest(), timeout=TIMEOUT_S * 30)
    return _show(
        digest,
        args.json,
        f"{args.addr} ({digest.role}): applied {digest.applied_sequence} sha256 {digest.sha256}",
    )


def _show(reply: Message, as_json: bool, text: str) -> int:
    print(_json(reply) if as_json else text)
    return 0


def _slots(channel: grpc.Channel, args: argparse.Namespace) -> int:
    stub = rpb_grpc.WALReplicationServiceStub(channel)  # type: ignore[no-untyped-call]
    if args.drop:
        stub.DropSlot(rpb.DropSlotRequest(node_id=args.drop), timeout=TIMEOUT_S)
        print(f"dropped the replication slot of {args.drop}")
        return 0
    slots = stub.ListSlots(rpb.ListSlotsRequest(), timeout=TIMEOUT_S)
    if args.json:
        print(_json(slots))
        return 0
    print(f"{len(slots.slots)} replication slot(s); each may hold {slots.keep_bytes} bytes of WAL")
    for s in slots.slots:
        state = "lost" if s.lost else ("streaming" if s.active else "disconnected")
        print(
            f"  {s.node_id} ({s.client_address or '?'}): {state}, needs sequence "
            f"{s.restart_sequence} onwards, holds {s.held_bytes} bytes"
        )
    return 0


def _promote(channel: grpc.Channel, args: argparse.Namespace) -> int:
    stub = rpb_grpc.WALReplicationServiceStub(channel)  # type: ignore[no-untyped-call]
    # Waits for the replica to stop following and apply what its WAL holds.
    reply = stub.Promote(rpb.PromoteRequest(), timeout=TIMEOUT_S * 12)
    return _show(
        reply,
        args.json,
        f"{args.addr} is a primary now: history {reply.history_id} starts at sequence "
        f"{reply.sequence + 1}; point the other replicas at it",
    )


_COMMANDS: dict[str, Callable[[grpc.Channel, argparse.Namespace], int]] = {
    "status": _status,
    "digest": _digest,
    "slots": _slots,
    "promote": _promote,
}


def _json(message: Message) -> str:
    """Every field, zero values included, with the .proto's field names: stable for scripts."""
    obj = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return json.dumps(obj, sort_keys=True)


def _progress(rate: float, eta_s: float) -> str:
    if rate <= 0:
        return ""
    left = "" if eta_s <= 0 else f", caught up in about {eta_s:.0f} s"
    return f"; applying {rate:,.0f} entries/s{left}"


def _bootstrap(done: int, total: int, rate: float, eta_s: float) -> str:
    """Snapshot progress: while bootstrapping, `rate` counts bytes, not entries."""
    left = "" if eta_s <= 0 else f", done in about {eta_s:.0f} s"
    speed = f", {rate / 1e6:.1f} MB/s" if rate > 0 else ""
    return f"snapshot {done / 1e6:.1f} of about {total / 1e6:.1f} MB{speed}{left}"


def format_status(status: rpb.ReplicationStatus, as_json: bool) -> str:
    if as_json:
        return _json(status)
    history = f", history {status.history_id[:12]}" if status.history_id else ""
    lines = [
        f"role {status.role}: last {status.last_sequence}, durable {status.durable_sequence}, "
        f"applied {status.applied_sequence}{history}"
    ]
    if status.role == "replica":
        if status.state == "BOOTSTRAPPING":
            progress = _bootstrap(
                status.bootstrap_bytes,
                status.bootstrap_total_bytes,
                status.apply_rate,
                status.eta_seconds,
            )
            lines.append(f"following {status.primary_address}: state BOOTSTRAPPING, {progress}")
        else:
            lines.append(
                f"following {status.primary_address}: state {status.state}, primary at "
                f"{status.primary_durable_sequence}, lag {status.lag_entries} entries "
                f"({status.lag_seconds:.3f} s){_progress(status.apply_rate, status.eta_seconds)}"
            )
        if status.last_error:
            lines.append(f"last error: {status.last_error}")
    for r in status.replicas:
        if r.state == "bootstrapping":
            progress = _bootstrap(
                r.bootstrap_bytes, r.bootstrap_total_bytes, r.apply_rate, r.eta_seconds
            )
            lines.append(f"  replica {r.client_address or r.node_id}: bootstrapping; {progress}")
            continue
        lines.append(
            f"  replica {r.client_address or r.node_id}: {r.state}; sent {r.sent_sequence}, "
            f"received {r.received_sequence}, flushed {r.flushed_sequence}, applied "
            f"{r.applied_sequence}; lag {r.lag_entries} entries ({r.lag_seconds:.3f} s, "
            f"{r.lag_bytes} bytes){_progress(r.apply_rate, r.eta_seconds)}"
        )
    if status.role == "primary" and not status.replicas:
        lines.append("  no replicas connected")
    return "\n".join(lines)
