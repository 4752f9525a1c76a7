"""Proto definitions, generated modules and the private descriptor pool.

* the committed ``kevo_repl/proto/*_pb2*`` files are what ``proto/generate.py`` produces;
* our KevoService messages are wire-identical to the python-kevo SDK's, except for the
  fields upstream HEAD added (``GetNodeInfoResponse.version = 6``);
* the replication messages match KEVO_COMPAT.md section 2.2 field by field;
* our descriptors live in a private pool, so the SDK (or anything else defining
  ``kevo.*`` in protobuf's default pool) can share a process with us;
* server reflection works over that private pool.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import kevo.proto.kevo.service_pb2 as sdk_pb2
import pytest
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from nodeproc import node_env

from kevo_repl.proto import replication_pb2, service_pb2
from kevo_repl.proto._pool import POOL
from kevo_repl.proto.services import (
    HEALTH_SERVICE,
    KEVO_SERVICE,
    REFLECTION_SERVICE,
    REPLICATION_SERVICE,
    enable_reflection,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATED_DIR = REPO_ROOT / "kevo_repl" / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
EXPECTED_GENERATED = {
    f"{stem}{suffix}" for stem in ("service", "replication") for suffix in GENERATED_SUFFIXES
}
# Field numbers from here up are ours; 1..15 belong to upstream Kevo.
FIRST_EXTENSION_NUMBER = 16

FDP = descriptor_pb2.FieldDescriptorProto


# --------------------------------------------------------------------------- staleness


def test_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "proto" / "generate.py"), "--out", str(tmp_path)],
        cwd=tmp_path,  # the script must not depend on the caller's directory
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"proto/generate.py failed:\n{result.stderr}"

    fresh = {p.name for p in tmp_path.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
    committed = {p.name for p in GENERATED_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
    assert fresh == EXPECTED_GENERATED, f"generate.py produced {sorted(fresh)}"
    assert committed == fresh, (
        f"kevo_repl/proto has {sorted(committed)}, generator makes {sorted(fresh)}: "
        "run `python proto/generate.py`"
    )
    tools = importlib.metadata.version("grpcio-tools")
    for name in sorted(fresh):
        assert (GENERATED_DIR / name).read_bytes() == (tmp_path / name).read_bytes(), (
            f"kevo_repl/proto/{name} is stale: run `python proto/generate.py` "
            f"(this environment has grpcio-tools {tools}; pyproject.toml pins the version "
            "the committed files were made with)"
        )


# --------------------------------------------------------------------- wire contract

Signature = dict[str, dict[str, object]]


def _signature(file: descriptor.FileDescriptor) -> Signature:
    """Everything about a .proto file that matters on the wire or to reflection.

    Keys are ``"message <full name>"``, ``"enum <full name>"`` and
    ``"service <full name>"``; the file name and file options (go_package) are ignored.
    """
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    sig: Signature = {}

    def add_enum(scope: str, enum: descriptor_pb2.EnumDescriptorProto) -> None:
        sig[f"enum {scope}.{enum.name}"] = {v.name: v.number for v in enum.value}

    def add_message(scope: str, msg: descriptor_pb2.DescriptorProto) -> None:
        name = f"{scope}.{msg.name}"
        fields: dict[str, object] = {
            f.name: (
                f.number,
                FDP.Type.Name(f.type),
                FDP.Label.Name(f.label),
                f.type_name,
                f.oneof_index if f.HasField("oneof_index") else None,
                f.proto3_optional,
            )
            for f in msg.field
        }
        fields["<map_entry>"] = msg.options.map_entry
        sig[f"message {name}"] = fields
        for nested in msg.nested_type:
            add_message(name, nested)
        for enum in msg.enum_type:
            add_enum(name, enum)

    for msg in proto.message_type:
        add_message(proto.package, msg)
    for enum in proto.enum_type:
        add_enum(proto.package, enum)
    for service in proto.service:
        sig[f"service {proto.package}.{service.name}"] = {
            m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            for m in service.method
        }
    sig["<file>"] = {"package": proto.package, "syntax": proto.syntax}
    return sig


def test_service_proto_matches_sdk_wire_contract() -> None:
    ours = _signature(service_pb2.DESCRIPTOR)
    sdk = _signature(sdk_pb2.DESCRIPTOR)
    assert sdk["<file>"] == {"package": "kevo", "syntax": "proto3"}

    # Our only additions: fields upstream HEAD has and the SDK's copy lacks.
    allowed_additions = {
        ("message kevo.GetNodeInfoResponse", "version"): (
            6,
            "TYPE_STRING",
            "LABEL_OPTIONAL",
            "",
            None,
            False,
        ),
    }
    for (key, field), expected in allowed_additions.items():
        assert ours[key].pop(field) == expected, f"{key}.{field}"

    assert ours.keys() == sdk.keys(), "message/enum/service names differ from the SDK"
    for key in sorted(sdk):
        assert ours[key] == sdk[key], f"{key} differs from the SDK"


def test_roundtrip_with_sdk_in_same_process() -> None:
    # Both definitions are live in this process: ours in POOL, the SDK's in the default pool.
    assert service_pb2.GetRequest is not sdk_pb2.GetRequest
    assert service_pb2.DESCRIPTOR.pool is POOL
    assert sdk_pb2.DESCRIPTOR.pool is descriptor_pool.Default()

    stats = service_pb2.GetStatsResponse(
        key_count=3,
        storage_size=-1,
        memtable_count=2,
        write_amplification=1.5,
        operation_counts={"put_ops": 7},
        latency_stats={"get_latency": service_pb2.LatencyStats(count=1, max_ns=2**63)},
        error_counts={"io": 1},
        recovery_stats=service_pb2.RecoveryStats(wal_files_recovered=4),
    )
    sdk_stats = sdk_pb2.GetStatsResponse.FromString(stats.SerializeToString())
    assert sdk_stats.latency_stats["get_latency"].max_ns == 2**63
    assert sdk_stats.operation_counts["put_ops"] == 7
    assert sdk_stats.recovery_stats.wal_files_recovered == 4
    assert sdk_stats.SerializeToString(deterministic=True) == stats.SerializeToString(
        deterministic=True
    )

    batch = sdk_pb2.BatchWriteRequest(
        operations=[
            sdk_pb2.Operation(type=sdk_pb2.Operation.PUT, key=b"k", value=b"v"),
            sdk_pb2.Operation(type=sdk_pb2.Operation.DELETE, key=b"gone"),
        ],
        sync=True,
    )
    our_batch = service_pb2.BatchWriteRequest.FromString(batch.SerializeToString())
    assert [op.type for op in our_batch.operations] == [
        service_pb2.Operation.PUT,
        service_pb2.Operation.DELETE,
    ]
    assert our_batch.operations[1].key == b"gone"
    assert our_batch.sync is True

    scan = sdk_pb2.TxScanRequest(transaction_id="tx-1", prefix=b"p", suffix=b"s", limit=-3)
    our_scan = service_pb2.TxScanRequest.FromString(scan.SerializeToString())
    assert (our_scan.transaction_id, our_scan.suffix, our_scan.limit) == ("tx-1", b"s", -3)

    # version=6 is unknown to the SDK: it survives an SDK parse/serialize round trip.
    info = service_pb2.GetNodeInfoResponse(
        node_role=service_pb2.GetNodeInfoResponse.REPLICA,
        primary_address="localhost:50052",
        replicas=[service_pb2.ReplicaInfo(address="r1:1", available=True, meta={"a": "b"})],
        last_sequence=42,
        read_only=True,
        version="1.4.2",
    )
    sdk_info = sdk_pb2.GetNodeInfoResponse.FromString(info.SerializeToString())
    assert sdk_info.node_role == sdk_pb2.GetNodeInfoResponse.REPLICA
    assert sdk_info.replicas[0].meta["a"] == "b"
    assert sdk_info.last_sequence == 42
    back = service_pb2.GetNodeInfoResponse.FromString(sdk_info.SerializeToString())
    assert back == info


def test_our_messages_are_not_in_the_default_pool() -> None:
    default = descriptor_pool.Default()
    for name in ("kevo.replication.WALEntry", "kevo.replication.WALStreamRequest"):
        with pytest.raises(KeyError):
            default.FindMessageTypeByName(name)
        assert POOL.FindMessageTypeByName(name).full_name == name
    for file_name in ("kevo/service.proto", "kevo/replication.proto"):
        with pytest.raises(KeyError):
            default.FindFileByName(file_name)
        assert POOL.FindFileByName(file_name).name == file_name
    # The default pool's kevo.GetRequest (if any) is the SDK's, not ours.
    assert default.FindMessageTypeByName("kevo.GetRequest").file.name == "proto/kevo/service.proto"
    assert service_pb2.GetRequest.DESCRIPTOR is POOL.FindMessageTypeByName("kevo.GetRequest")


_CONFLICT_CHILD = textwrap.dedent(
    """
    import sys
    from google.protobuf import descriptor_pb2, descriptor_pool
    from google.protobuf.internal import api_implementation

    assert api_implementation.Type() == sys.argv[1], api_implementation.Type()
    FDP = descriptor_pb2.FieldDescriptorProto
    other = descriptor_pb2.FileDescriptorProto(
        name="other/kevo.proto", package="kevo", syntax="proto3"
    )
    msg = other.message_type.add(name="GetRequest")
    msg.field.add(name="different", number=7, type=FDP.TYPE_STRING, label=FDP.LABEL_OPTIONAL)
    other_repl = descriptor_pb2.FileDescriptorProto(
        name="other/replication.proto", package="kevo.replication", syntax="proto3"
    )
    other_repl.message_type.add(name="WALEntry").field.add(
        name="x", number=1, type=FDP.TYPE_BOOL, label=FDP.LABEL_OPTIONAL
    )
    default = descriptor_pool.Default()
    default.Add(other)
    default.Add(other_repl)

    from kevo_repl.proto import replication_pb2, replication_pb2_grpc, service_pb2
    from kevo_repl.proto import service_pb2_grpc

    assert [f.name for f in service_pb2.GetRequest.DESCRIPTOR.fields] == ["key"]
    assert service_pb2.GetRequest(key=b"k").SerializeToString() == b"\\n\\x01k"
    assert replication_pb2.WALEntry.DESCRIPTOR.fields_by_name["payload"].number == 2
    assert service_pb2_grpc.KevoServiceStub and replication_pb2_grpc.WALReplicationServiceStub
    # The conflicting definitions are still the ones in the default pool ...
    assert [f.name for f in default.FindMessageTypeByName("kevo.GetRequest").fields] == [
        "different"
    ]
    # ... and registering our file there instead really would have collided.
    try:
        default.AddSerializedFile(service_pb2.DESCRIPTOR.serialized_pb)
    except TypeError as exc:
        assert "kevo.GetRequest" in str(exc), exc
    else:
        raise AssertionError("default pool accepted a duplicate kevo.GetRequest")
    print("child ok")
    """
)


@pytest.mark.parametrize("implementation", ["upb", "python"])
def test_import_succeeds_despite_conflicting_default_pool(implementation: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _CONFLICT_CHILD, implementation],
        cwd=REPO_ROOT,
        env={**node_env(), "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": implementation},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "child ok"


# ------------------------------------------------------------------- field numbers

# KEVO_COMPAT.md section 2.2: message -> field -> (number, type, repeated).
REPLICATION_FIELDS: dict[str, dict[str, tuple[int, str, bool]]] = {
    "WALStreamRequest": {
        "start_sequence": (1, "uint64", False),
        "protocol_version": (2, "uint32", False),
        "compression_supported": (3, "bool", False),
        "preferred_codec": (4, "kevo.replication.CompressionCodec", False),
        "listener_address": (5, "string", False),
    },
    "WALStreamResponse": {
        "entries": (1, "kevo.replication.WALEntry", True),
        "compressed": (2, "bool", False),
        "codec": (3, "kevo.replication.CompressionCodec", False),
    },
    "WALEntry": {
        "sequence_number": (1, "uint64", False),
        "payload": (2, "bytes", False),
        "fragment_type": (3, "kevo.replication.FragmentType", False),
        "checksum": (4, "uint32", False),
    },
    "Ack": {"acknowledged_up_to": (1, "uint64", False)},
    "AckResponse": {"success": (1, "bool", False), "message": (2, "string", False)},
    "Nack": {"missing_from_sequence": (1, "uint64", False)},
    "NackResponse": {"success": (1, "bool", False), "message": (2, "string", False)},
}
REPLICATION_ENUMS = {
    "FragmentType": {"FULL": 0, "FIRST": 1, "MIDDLE": 2, "LAST": 3},
    "CompressionCodec": {"NONE": 0, "ZSTD": 1, "SNAPPY": 2},
}
REPLICATION_METHODS = {
    "StreamWAL": ("WALStreamRequest", "WALStreamResponse", True),
    "Acknowledge": ("Ack", "AckResponse", False),
    "NegativeAcknowledge": ("Nack", "NackResponse", False),
}
# Our additions to the service: new RPCs only, never changes to Kevo's.
OUR_REPLICATION_METHODS = {
    "GetReplicationStatus",
    "GetDigest",
    "ListSlots",
    "DropSlot",
    "StreamSnapshot",
    "Promote",
}


def _field_shape(field: descriptor.FieldDescriptor) -> tuple[int, str, bool]:
    if field.message_type is not None:
        type_name = field.message_type.full_name
    elif field.enum_type is not None:
        type_name = field.enum_type.full_name
    else:
        type_name = FDP.Type.Name(field.type).removeprefix("TYPE_").lower()  # type: ignore[arg-type]
    return field.number, type_name, field.is_repeated


def _fields_of(message: descriptor.Descriptor) -> dict[str, tuple[int, str, bool]]:
    return {f.name: _field_shape(f) for f in message.fields}


def test_replication_field_numbers_match_spec() -> None:
    file = replication_pb2.DESCRIPTOR
    assert file.package == "kevo.replication"
    assert set(file.message_types_by_name) >= set(REPLICATION_FIELDS)
    for name, expected in REPLICATION_FIELDS.items():
        actual = _fields_of(file.message_types_by_name[name])
        for field, shape in expected.items():
            assert actual.get(field) == shape, f"{name}.{field}"
        for field, (number, _, _) in actual.items():
            if field not in expected:
                assert number >= FIRST_EXTENSION_NUMBER, (
                    f"{name}.{field} = {number}: our additions must use numbers >= "
                    f"{FIRST_EXTENSION_NUMBER}"
                )
    for enum_name, values in REPLICATION_ENUMS.items():
        enum = file.enum_types_by_name[enum_name]
        assert {v.name: v.number for v in enum.values} == values, enum_name

    service = file.services_by_name["WALReplicationService"]
    assert service.full_name == REPLICATION_SERVICE
    for method_name, (request, response, server_streaming) in REPLICATION_METHODS.items():
        method = service.methods_by_name[method_name]
        assert method.input_type.full_name == f"kevo.replication.{request}", method_name
        assert method.output_type.full_name == f"kevo.replication.{response}", method_name
        assert method.server_streaming is server_streaming, method_name
        assert method.client_streaming is False, method_name
    assert set(service.methods_by_name) - set(REPLICATION_METHODS) == OUR_REPLICATION_METHODS


def test_key_kevo_service_field_numbers() -> None:
    messages = service_pb2.DESCRIPTOR.message_types_by_name
    assert _fields_of(messages["GetNodeInfoResponse"]) == {
        "node_role": (1, "kevo.GetNodeInfoResponse.NodeRole", False),
        "primary_address": (2, "string", False),
        "replicas": (3, "kevo.ReplicaInfo", True),
        "last_sequence": (4, "uint64", False),
        "read_only": (5, "bool", False),
        "version": (6, "string", False),
    }
    node_role = messages["GetNodeInfoResponse"].enum_types_by_name["NodeRole"]
    assert {v.name: v.number for v in node_role.values} == {
        "STANDALONE": 0,
        "PRIMARY": 1,
        "REPLICA": 2,
    }
    assert _fields_of(messages["ScanRequest"])["suffix"] == (5, "bytes", False)
    assert _fields_of(messages["TxScanRequest"])["suffix"] == (6, "bytes", False)
    assert _fields_of(messages["GetStatsResponse"])["recovery_stats"] == (
        14,
        "kevo.RecoveryStats",
        False,
    )
    service = service_pb2.DESCRIPTOR.services_by_name["KevoService"]
    assert service.full_name == KEVO_SERVICE
    streaming = {m.name for m in service.methods if m.server_streaming}
    assert streaming == {"Scan", "TxScan"}


# ---------------------------------------------------------------------- reflection


def _query_reflection(target: str) -> tuple[list[str], dict[str, int], list[str], list[str]]:
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=5)
        database = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        kevo = pool.FindServiceByName(KEVO_SERVICE)
        node_info = kevo.methods_by_name["GetNodeInfo"].output_type
        replication = pool.FindServiceByName(REPLICATION_SERVICE)
        health = pool.FindServiceByName(HEALTH_SERVICE)
        return (
            services,
            {f.name: f.number for f in node_info.fields},
            [m.name for m in replication.methods],
            [m.name for m in health.methods],
        )


def test_server_reflection_uses_private_pool() -> None:
    async def scenario() -> tuple[list[str], dict[str, int], list[str], list[str]]:
        server = grpc.aio.server()
        enable_reflection(server)
        port = server.add_insecure_port("127.0.0.1:0")
        assert port > 0
        await server.start()
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(_query_reflection, f"127.0.0.1:{port}"), timeout=20
            )
        finally:
            await server.stop(None)

    services, node_info_fields, replication_methods, health_methods = asyncio.run(scenario())
    assert services == sorted(
        [KEVO_SERVICE, REPLICATION_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE]
    )
    assert node_info_fields["version"] == 6
    assert node_info_fields["read_only"] == 5
    assert replication_methods[:3] == ["StreamWAL", "Acknowledge", "NegativeAcknowledge"]
    assert set(replication_methods[3:]) == OUR_REPLICATION_METHODS
    assert "Check" in health_methods
