"""`kevo-repl put|get|delete|scan --addr HOST:PORT`: quick use of a node from a shell."""

from __future__ import annotations

import argparse
import sys

import grpc

from kevo_repl.proto import service_pb2 as pb
from kevo_repl.proto import service_pb2_grpc as pb_grpc

TIMEOUT_S = 10.0


def run_client(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.addr) as channel:
        stub = pb_grpc.KevoServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            return _call(stub, args)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1


def _call(stub: pb_grpc.KevoServiceStub, args: argparse.Namespace) -> int:
    if args.command == "put":
        stub.Put(
            pb.PutRequest(key=args.key.encode(), value=args.value.encode(), sync=args.sync),
            timeout=TIMEOUT_S,
        )
        return 0
    if args.command == "get":
        reply = stub.Get(pb.GetRequest(key=args.key.encode()), timeout=TIMEOUT_S)
        if not reply.found:
            print(f"not found: {args.key}", file=sys.stderr)
            return 1
        print(reply.value.decode("utf-8", "backslashreplace"))
        return 0
    if args.command == "delete":
        stub.Delete(pb.DeleteRequest(key=args.key.encode()), timeout=TIMEOUT_S)
        return 0
    request = pb.ScanRequest(
        prefix=args.prefix.encode(),
        start_key=args.start.encode(),
        end_key=args.end.encode(),
        limit=args.limit,
    )
    for row in stub.Scan(request, timeout=TIMEOUT_S * 6):
        key = row.key.decode("utf-8", "backslashreplace")
        print(f"{key}\t{row.value.decode('utf-8', 'backslashreplace')}")
    return 0
