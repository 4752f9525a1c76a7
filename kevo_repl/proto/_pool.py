"""Private descriptor pool for kevo_repl's generated protobuf modules.

The python-kevo SDK registers its own ``kevo/service.proto`` (package ``kevo``) in
protobuf's default pool; a second definition of any ``kevo.*`` symbol there fails at
import with "duplicate symbol". ``proto/generate.py`` therefore rewrites our generated
``*_pb2.py`` modules to add their descriptors to :data:`POOL` instead. Look types up
here (``POOL.FindMessageTypeByName("kevo.GetRequest")``), never in
``descriptor_pool.Default()``, and pass ``pool=POOL`` to anything that resolves names
(server reflection, ``json_format`` with ``Any``, ...).
"""

from __future__ import annotations

import threading
from typing import Any

from google.protobuf import descriptor, descriptor_pool, symbol_database
from google.protobuf.internal import api_implementation, builder

POOL: descriptor_pool.DescriptorPool = descriptor_pool.DescriptorPool()

# protobuf's builder registers every generated class in the *default* symbol database.
# With the upb and C++ backends that only fills a class cache, but the pure-Python backend
# (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python, PyPy) also adds the descriptor to the
# default pool, which collides with the SDK's kevo.* messages. There the generated modules
# build their classes against a symbol database over POOL instead.
_SYM_DB = symbol_database.SymbolDatabase(pool=POOL)
_SWAP_LOCK = threading.Lock()


def build_top_descriptors_and_messages(
    file_des: descriptor.FileDescriptor, module_name: str, module: dict[str, Any]
) -> None:
    """``builder.BuildTopDescriptorsAndMessages`` that never touches the default pool.

    Called by the generated ``*_pb2.py`` modules; not meant for other uses.
    """
    if api_implementation.Type() != "python" or not hasattr(builder, "_sym_db"):
        builder.BuildTopDescriptorsAndMessages(file_des, module_name, module)
        return
    with _SWAP_LOCK:
        saved = getattr(builder, "_sym_db")  # noqa: B009 - private, untyped attribute
        setattr(builder, "_sym_db", _SYM_DB)  # noqa: B010
        try:
            builder.BuildTopDescriptorsAndMessages(file_des, module_name, module)
        finally:
            setattr(builder, "_sym_db", saved)  # noqa: B010


__all__ = ["POOL", "build_top_descriptors_and_messages"]
