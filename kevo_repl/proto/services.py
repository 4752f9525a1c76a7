"""Full gRPC service names and server reflection over the private descriptor pool."""

from __future__ import annotations

from typing import Final

import grpc
from google.protobuf import descriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from kevo_repl.proto import replication_pb2, service_pb2
from kevo_repl.proto._pool import POOL

KEVO_SERVICE: Final = "kevo.KevoService"
REPLICATION_SERVICE: Final = "kevo.replication.WALReplicationService"
HEALTH_SERVICE: Final = "grpc.health.v1.Health"
REFLECTION_SERVICE: Final[str] = reflection.SERVICE_NAME

#: Every service name ``enable_reflection`` advertises.
REFLECTED_SERVICES: Final = (KEVO_SERVICE, REPLICATION_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE)

# The generated modules above registered these files in POOL on import.
_OWN_FILES: Final = (service_pb2.DESCRIPTOR, replication_pb2.DESCRIPTOR)


def _ensure_in_pool(file: descriptor.FileDescriptor) -> None:
    """Copy ``file`` (and its imports) into POOL unless POOL already has it."""
    try:
        POOL.FindFileByName(file.name)
    except KeyError:
        for dependency in file.dependencies:
            _ensure_in_pool(dependency)
        POOL.AddSerializedFile(file.serialized_pb)


def enable_reflection(server: grpc.aio.Server) -> None:
    """Serve gRPC reflection for KevoService, WALReplicationService, health and itself.

    Reflection resolves names in the private pool :data:`kevo_repl.proto._pool.POOL`
    (our ``kevo.*`` types are not in protobuf's default pool), so the health and
    reflection protos are copied into it too. This only registers the reflection
    servicer; the caller adds the health servicer and the services themselves.
    Call it before ``server.start()``.
    """
    for file in _OWN_FILES:
        _ensure_in_pool(file)
    _ensure_in_pool(health_pb2.DESCRIPTOR)
    _ensure_in_pool(reflection_pb2.DESCRIPTOR)
    reflection.enable_server_reflection(REFLECTED_SERVICES, server, pool=POOL)


__all__ = [
    "HEALTH_SERVICE",
    "KEVO_SERVICE",
    "REFLECTED_SERVICES",
    "REFLECTION_SERVICE",
    "REPLICATION_SERVICE",
    "enable_reflection",
]
