"""Runs a standalone node: store + WAL + gRPC server, until SIGTERM/SIGINT.

Exit codes (the CLI's contract): 0 clean stop, 2 bad flag or config, 3 cannot listen (address in
use), 4 data directory in use by another process, 1 anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kevo_repl import __version__, datadir, failpoints, fsutil
from kevo_repl.config import NodeConfig, replication_codecs
from kevo_repl.datadir import PROMOTED
from kevo_repl.errors import KevoReplError, ListenError
from kevo_repl.node.engine import Engine, WalOpener
from kevo_repl.node.interceptors import BadRequestInterceptor
from kevo_repl.node.promotion import Promotion, ReplicationDispatch
from kevo_repl.node.service import Counters, KevoService, Role
from kevo_repl.node.transactions import TxRegistry
from kevo_repl.proto import replication_pb2_grpc as rpb_grpc
from kevo_repl.proto import service_pb2 as pb
from kevo_repl.proto import service_pb2_grpc
from kevo_repl.proto.services import KEVO_SERVICE, enable_reflection
from kevo_repl.repl.bootstrap import complete_switch, discard_partial
from kevo_repl.repl.frames import Codec
from kevo_repl.repl.history import History
from kevo_repl.repl.primary import (
    ElsewhereService,
    ReplicationService,
    Sessions,
    SlotKeeper,
    StreamLimits,
)
from kevo_repl.repl.replica import ReplicaDriver, ReplicaStatusService
from kevo_repl.repl.state_files import load_or_create_history, load_or_create_node_id
from kevo_repl.repl.status import StandaloneStatusService
from kevo_repl.store import MAX_KEY_BYTES, LmdbStore, Store, StoreError, StoreLockedError
from kevo_repl.wal import WAL, RetentionPolicy, WalOptions

log = logging.getLogger(__name__)

MESSAGE_BYTES_MAX = 64 * 1024 * 1024  # > the SDK's 16 MiB and any batch of 10 MiB values
TX_SWEEP_S = 5.0

# What the python-kevo SDK's channels need (KEVO_COMPAT.md §3.3): idle pings every 30 s must not
# earn a GOAWAY "too_many_pings", and its 16 MiB messages must fit.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
    ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
    ("grpc.so_reuseport", 0),  # a second node on the same port must fail, not share it
]


def effective_role(config: NodeConfig) -> str:
    """The configured role, except that a promoted replica (PROMOTED) serves as a primary."""
    if config.role == "replica" and os.path.exists(datadir.path(config.data_dir, PROMOTED)):
        return "primary"
    return config.role


def open_engine(config: NodeConfig) -> Engine:
    store = LmdbStore.open(
        datadir.path(config.data_dir, datadir.STORE), sync_each_txn=config.store_sync
    )
    primary = effective_role(config) == "primary"
    wal_options = WalOptions(
        sync_mode=config.wal_sync_mode,
        sync_bytes=config.sync_bytes,
        sync_interval_ms=config.sync_interval_ms,
        segment_bytes_max=config.segment_bytes,
        tail_window_bytes=config.replication_window_bytes if primary else 0,
    )
    opener = WalOpener(datadir.path(config.data_dir, datadir.WAL), wal_options)
    retention = RetentionPolicy(max_total_bytes=config.wal_retain_bytes)
    try:
        return Engine.open(opener, store, retention, MAX_KEY_BYTES)
    except BaseException:
        store.close()
        raise


def stream_limits(config: NodeConfig) -> StreamLimits:
    return StreamLimits(
        frame_bytes_max=config.replication_frame_bytes,
        frame_cache_bytes=config.replication_frame_cache_bytes,
        linger_s=config.replication_linger_ms / 1000,
        zstd_level=config.replication_zstd_level,
        snapshot_zstd_level=config.snapshot_zstd_level,
        streams_max=config.max_replicas,
    )


def _add_replication(
    service: rpb_grpc.WALReplicationServiceServicer,
    server: grpc.aio.Server,
    repl_server: grpc.aio.Server,
    repl_address: str,
) -> None:
    """The replication service on its own server, and on the node's a pointer to it."""
    add = rpb_grpc.add_WALReplicationServiceServicer_to_server
    add(service, repl_server)  # type: ignore[no-untyped-call]
    if repl_server is not server:
        add(ElsewhereService(service, repl_address), server)  # type: ignore[no-untyped-call]


def _primary_service(
    config: NodeConfig, engine: Engine, advertise: str, history: History
) -> tuple[ReplicationService, Sessions]:
    keeper = SlotKeeper(
        engine.wal, datadir.path(config.data_dir, datadir.SLOTS), config.slot_keep_bytes
    )
    engine.before_checkpoint.append(keeper.maintain)
    sessions = Sessions(engine.wal, keeper)
    sessions.attach(asyncio.get_running_loop())
    service = ReplicationService(
        engine.wal, sessions, advertise, stream_limits(config), engine.store, history
    )
    return service, sessions


def _act_as_primary(role: Role, sessions: Sessions, engine: Engine) -> None:
    def replicas() -> list[pb.ReplicaInfo]:
        return [
            pb.ReplicaInfo(address=s.client_address, last_sequence=s.applied_seq, available=True)
            for s in sessions.all()
            if s.client_address
        ]

    role.name = "primary"
    role.primary_client_address = ""
    role.replicas = replicas
    role.last_sequence = lambda: engine.wal.durable_seq


def _roles(
    config: NodeConfig,
    engine: Engine,
    servers: tuple[grpc.aio.Server, grpc.aio.Server],
    advertise: str,
) -> tuple[Role, Promotion | None]:
    server, repl_server = servers
    repl_address = config.replication_listen or config.listen
    role = Role(config.role, advertise)
    acting = effective_role(config)
    if acting != config.role:
        log.warning(
            "this replica was promoted (%s): serving as a primary; delete that file and the "
            "data directory to make it a replica again",
            datadir.path(config.data_dir, PROMOTED),
        )
    if acting == "replica":
        return role, _replica(config, engine, role, (server, repl_server, repl_address))
    if acting == "primary":
        history = load_or_create_history(datadir.path(config.data_dir, datadir.HISTORY))
        service, sessions = _primary_service(config, engine, advertise, history)
        _add_replication(service, server, repl_server, repl_address)
        _act_as_primary(role, sessions, engine)
        return role, None
    status = StandaloneStatusService(engine)
    rpb_grpc.add_WALReplicationServiceServicer_to_server(status, server)  # type: ignore[no-untyped-call]
    return role, None


def _replica(
    config: NodeConfig,
    engine: Engine,
    role: Role,
    where: tuple[grpc.aio.Server, grpc.aio.Server, str],
) -> Promotion:
    codecs = [Codec[name.upper()] for name in replication_codecs(config)]
    node = load_or_create_node_id(datadir.path(config.data_dir, datadir.NODE_ID))
    history_path = datadir.path(config.data_dir, datadir.HISTORY)
    driver = ReplicaDriver(
        engine,
        config.primary,
        node,
        role.client_address,
        role,
        codecs=codecs,
        history_path=history_path,
        data_dir=config.data_dir,
        reopen=functools.partial(_switch_to_snapshot, engine, config),
        on_divergence=config.on_divergence,
    )
    status = ReplicaStatusService(driver)
    dispatch = ReplicationDispatch(status)
    _add_replication(dispatch, *where)

    def become_primary(history: History) -> None:
        service, sessions = _primary_service(config, engine, role.client_address, history)
        dispatch.target = service
        _act_as_primary(role, sessions, engine)

    promotion = Promotion(
        engine,
        driver,
        asyncio.Event(),
        asyncio.Event(),
        history_path,
        datadir.path(config.data_dir, PROMOTED),
        become_primary,
    )
    status.promote = promotion.run
    return promotion


async def _switch_to_snapshot(engine: Engine, config: NodeConfig) -> None:
    """Close the store and WAL, install the snapshot a bootstrap made ready, open them again."""

    def reopen() -> tuple[WAL, Store]:
        complete_switch(config.data_dir)
        fresh = open_engine(config)
        return fresh.wal, fresh.store

    started = time.monotonic()
    await engine.replace_parts(reopen)
    log.info("store and WAL reopened on the snapshot in %.2f s", time.monotonic() - started)


async def serve(config: NodeConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set (or SIGTERM/SIGINT arrives)."""
    stop = stop or asyncio.Event()
    failpoints.active()  # a malformed KEVO_REPL_FAILPOINTS fails the start, not a stream
    os.makedirs(config.data_dir, exist_ok=True)
    lock_fd = fsutil.lock_directory(config.data_dir, StoreLockedError, StoreError)
    try:
        await _serve_locked(config, stop)
    finally:
        os.close(lock_fd)


async def _serve_locked(config: NodeConfig, stop: asyncio.Event) -> None:
    # A bootstrap that committed (bootstrap.ready) but did not finish switching is finished
    # now; one that did not commit starts over.
    discard_partial(config.data_dir)
    complete_switch(config.data_dir)
    engine = open_engine(config)
    try:  # whatever fails from here on (a corrupt state file, say), the engine is closed
        await _serve_engine(config, engine, stop)
    finally:
        await engine.close()
        log.info("stopped; WAL flushed and store checkpointed at %d", engine.wal.durable_seq)


def _grpc_server() -> grpc.aio.Server:
    return grpc.aio.server(options=SERVER_OPTIONS, interceptors=[BadRequestInterceptor()])


async def _serve_engine(config: NodeConfig, engine: Engine, stop: asyncio.Event) -> None:
    counters = Counters()
    registry = TxRegistry(time.monotonic)
    server = _grpc_server()
    repl_server = _grpc_server() if config.replication_listen else server
    servers = (server, repl_server)
    role, promotion = _roles(config, engine, servers, config.advertise or config.listen)
    servicer = KevoService(engine, registry, counters, role)
    add_kevo = service_pb2_grpc.add_KevoServiceServicer_to_server
    add_kevo(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    for s in _distinct(servers):
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, s)
        enable_reflection(s)
    try:
        port = _bind(server, config.listen)
        if repl_server is not server:
            _bind(repl_server, config.replication_listen)
            await repl_server.start()
            log.info("replication served on %s", config.replication_listen)
        await server.start()
        for name in ("", KEVO_SERVICE):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        host = config.listen.rpartition(":")[0]
        log.info(
            "kevo-repl %s listening on %s:%d (data %s)", __version__, host, port, config.data_dir
        )
        _install_signals(stop)
        # Everything allocated at start-up lives as long as the node: keep the collector from
        # walking it again and again, and collect the young generation less often (pauses show
        # up directly in replication lag).
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        tasks = [
            _checkpoints(engine, counters, config.checkpoint_interval_ms / 1000, stop),
            _sweeps(registry, stop),
        ]
        if promotion is not None:
            tasks.append(_replicate(promotion, stop))
        background = asyncio.gather(*tasks)
        await stop.wait()
        log.info("stopping: letting in-flight requests finish for up to %.1fs", config.grace_s)
        for name in ("", KEVO_SERVICE):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.gather(*(s.stop(config.grace_s) for s in _distinct(servers)))
        await background
    finally:
        for s in _distinct(servers):
            await s.stop(None)


def _distinct(servers: tuple[grpc.aio.Server, grpc.aio.Server]) -> list[grpc.aio.Server]:
    return [servers[0]] if servers[0] is servers[1] else list(servers)


def _bind(server: grpc.aio.Server, listen: str) -> int:
    try:
        port = int(server.add_insecure_port(listen))
    except RuntimeError as err:
        raise ListenError(f"cannot listen on {listen}: {err}") from None
    if port == 0 and not listen.endswith(":0"):
        raise ListenError(f"cannot listen on {listen}: address in use or not available")
    return port


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def _checkpoints(
    engine: Engine, counters: Counters, every_s: float, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        if stop.is_set():
            return
        try:
            await engine.checkpoint()
            counters.checkpoints += 1
        except KevoReplError:
            log.exception("checkpoint failed; will retry")
        except Exception:
            # Not one of ours (an OSError, a bug): log it and keep retrying. Escaping would end
            # this task silently (its gather is only awaited at shutdown), and with it every
            # later checkpoint and WAL retention: the WAL would grow until the disk fills.
            log.exception("checkpoint failed unexpectedly; will retry")


async def _replicate(promotion: Promotion, stop: asyncio.Event) -> None:
    """Run the replica's driver until the node stops or the replica is promoted."""
    driver_stop = promotion.stop_driver

    async def relay() -> None:
        await stop.wait()
        driver_stop.set()

    relaying = asyncio.create_task(relay())
    try:
        await promotion.driver.run(driver_stop)
    except BaseException:
        log.exception("replication stopped on a fatal error; stopping the node")
        stop.set()
        raise
    finally:
        promotion.driver_done.set()
        relaying.cancel()


async def _sweeps(registry: TxRegistry, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), TX_SWEEP_S)
        for tx_id in registry.sweep():
            log.info("transaction %s expired and was rolled back", tx_id)
