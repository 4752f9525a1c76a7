"""Node configuration: defaults, then a TOML file, then command-line flags, each validated.

Every key of the TOML file has a flag of the same name with dashes (`sync_mode` / `--sync-mode`).
Unknown keys, wrong types and impossible values are `ConfigError`s naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from typing import Any

from kevo_repl.errors import ConfigError
from kevo_repl.wal import SyncMode
from kevo_repl.wal.log import SYNC_INTERVAL_MS_MAX


@dataclass(frozen=True, slots=True)
class NodeConfig:
    data_dir: str = ""
    listen: str = "127.0.0.1:50051"
    sync_mode: str = "immediate"  # none | batch | immediate
    sync_bytes: int = 1024 * 1024
    sync_interval_ms: int = 100
    segment_bytes: int = 64 * 1024 * 1024
    wal_retain_bytes: int = 1024 * 1024 * 1024  # applied WAL kept beyond the store's checkpoint
    checkpoint_interval_ms: int = 5000
    store_sync: bool = False  # fsync the store on every transaction instead of at checkpoints
    grace_s: float = 5.0  # how long in-flight RPCs may finish at shutdown
    role: str = "standalone"  # standalone | primary | replica
    primary: str = ""  # replica: the primary's replication HOST:PORT (its node port by default)
    advertise: str = ""  # the KevoService address clients should use (default: listen)
    replication_listen: str = ""  # serve replication on this HOST:PORT instead of `listen`
    replication_window_bytes: int = 16 * 1024 * 1024  # primary: newest WAL kept in memory
    replication_frame_bytes: int = 256 * 1024  # primary: raw bytes per frame, at most
    replication_frame_cache_bytes: int = 32 * 1024 * 1024  # primary: compressed frames shared
    replication_linger_ms: float = 2.0  # primary: gather closely following writes for this long
    replication_zstd_level: int = 1  # primary: 1 (fast) .. 22 (small)
    snapshot_zstd_level: int = -2  # primary: snapshot chunks; -7 (fastest) .. 22 (small)
    replication_codecs: str = "zstd,snappy,none"  # replica: accepted, most preferred first
    max_replicas: int = 16  # primary: concurrent replication streams, and slots
    slot_keep_bytes: int = 4 * 1024**3  # primary: WAL one replica's slot may hold back
    on_divergence: str = "rebootstrap"  # replica: rebootstrap | refuse, when histories differ
    log_level: str = "info"

    @property
    def wal_sync_mode(self) -> SyncMode:
        return SyncMode(self.sync_mode)


_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_POSITIVE = {
    "sync_bytes",
    "sync_interval_ms",
    "segment_bytes",
    "checkpoint_interval_ms",
    "replication_window_bytes",
    "replication_frame_cache_bytes",
    "max_replicas",
    "slot_keep_bytes",
}
CODECS = ("zstd", "snappy", "none")
DIVERGENCE_POLICIES = ("rebootstrap", "refuse")
FRAME_BYTES_MIN = 4096
FRAME_BYTES_MAX = 64 * 1024 * 1024


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    return {k.replace("-", "_"): v for k, v in raw.items()}


def build(values: dict[str, Any], source: str) -> NodeConfig:
    """A validated NodeConfig from defaults overlaid with `values` (from `source`)."""
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in _FIELDS:
            raise ConfigError(f"{source}: unknown setting {key!r}")
        kwargs[key] = _coerce(key, value, source)
    config = NodeConfig(**kwargs)
    _validate(config, source)
    return config


def _coerce(key: str, value: Any, source: str) -> Any:
    expected = type(getattr(NodeConfig(), key))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(
            f"{source}: {key} must be {expected.__name__}, not {type(value).__name__} ({value!r})"
        )
    return value


def _validate(config: NodeConfig, source: str) -> None:
    if not config.data_dir:
        raise ConfigError(f"{source}: data_dir is required (--data-dir DIR)")
    if config.sync_mode not in {m.value for m in SyncMode}:
        raise ConfigError(f"{source}: sync_mode must be none, batch or immediate")
    for key in _POSITIVE:
        if getattr(config, key) <= 0:
            raise ConfigError(f"{source}: {key} must be positive")
    if config.sync_interval_ms > SYNC_INTERVAL_MS_MAX:
        raise ConfigError(f"{source}: sync_interval_ms must be at most {SYNC_INTERVAL_MS_MAX}")
    if config.segment_bytes < 4096:
        raise ConfigError(f"{source}: segment_bytes must be at least 4096")
    if config.wal_retain_bytes < 0 or config.grace_s < 0:
        raise ConfigError(f"{source}: wal_retain_bytes and grace_s must not be negative")
    if config.log_level.lower() not in _LOG_LEVELS:
        raise ConfigError(f"{source}: log_level must be one of {', '.join(_LOG_LEVELS)}")
    parse_address(config.listen, f"{source}: listen")
    if config.role not in ("standalone", "primary", "replica"):
        raise ConfigError(f"{source}: role must be standalone, primary or replica")
    if config.role == "replica":
        if not config.primary:
            raise ConfigError(f"{source}: a replica needs primary = HOST:PORT (--primary)")
        parse_address(config.primary, f"{source}: primary")
    elif config.primary:
        raise ConfigError(f"{source}: primary is only for role replica")
    if config.advertise:
        parse_address(config.advertise, f"{source}: advertise")
    _validate_replication(config, source)


def _validate_replication(config: NodeConfig, source: str) -> None:
    if config.replication_listen:
        if config.role == "standalone":
            raise ConfigError(f"{source}: replication_listen is only for role primary or replica")
        parse_address(config.replication_listen, f"{source}: replication_listen")
        if config.replication_listen == config.listen:
            raise ConfigError(f"{source}: replication_listen must differ from listen")
    if not FRAME_BYTES_MIN <= config.replication_frame_bytes <= FRAME_BYTES_MAX:
        raise ConfigError(
            f"{source}: replication_frame_bytes must be in {FRAME_BYTES_MIN}..{FRAME_BYTES_MAX}"
        )
    if not 0 <= config.replication_linger_ms <= 1000:
        raise ConfigError(f"{source}: replication_linger_ms must be in 0..1000")
    if not 1 <= config.replication_zstd_level <= 22:
        raise ConfigError(f"{source}: replication_zstd_level must be in 1..22")
    if not -7 <= config.snapshot_zstd_level <= 22:
        raise ConfigError(f"{source}: snapshot_zstd_level must be in -7..22")
    if config.on_divergence not in DIVERGENCE_POLICIES:
        raise ConfigError(
            f"{source}: on_divergence must be {' or '.join(DIVERGENCE_POLICIES)}, "
            f"got {config.on_divergence!r}"
        )
    codecs = replication_codecs(config)
    if not codecs or any(c not in CODECS for c in codecs) or len(set(codecs)) != len(codecs):
        raise ConfigError(
            f"{source}: replication_codecs must list some of {', '.join(CODECS)} once each, "
            f"got {config.replication_codecs!r}"
        )


def replication_codecs(config: NodeConfig) -> list[str]:
    return [c.strip().lower() for c in config.replication_codecs.split(",") if c.strip()]


def parse_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    # isascii: str.isdigit() accepts digits such as "²" that int() refuses.
    digits = port_text.isascii() and port_text.isdigit()
    if not sep or not host or not digits or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port_text)
