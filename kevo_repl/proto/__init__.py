"""Generated protobuf and gRPC modules for the Kevo wire protocols.

``service_pb2*`` (package ``kevo``, KevoService) and ``replication_pb2*`` (package
``kevo.replication``, WALReplicationService) are generated code: do not edit them;
change ``proto/kevo/*.proto`` and regenerate with ``python proto/generate.py``.
Their descriptors live in the private pool ``kevo_repl.proto._pool.POOL``, not in
protobuf's default pool, so they coexist with the python-kevo SDK in one process.
"""
