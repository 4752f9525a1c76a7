"""Node configuration: the example file, precedence and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from kevo_repl.config import NodeConfig, build, load_toml, parse_address
from kevo_repl.errors import ConfigError
from kevo_repl.wal import SyncMode

EXAMPLE = Path(__file__).resolve().parent.parent / "server" / "node.toml"


def test_example_config_is_valid_and_complete() -> None:
    values = load_toml(str(EXAMPLE))
    config = build(values, str(EXAMPLE))
    assert config.data_dir == "data/node1" and config.wal_sync_mode is SyncMode.IMMEDIATE
    # The example documents every setting there is.
    assert set(values) == set(NodeConfig.__dataclass_fields__)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "data_dir is required"),
        ({"data_dir": "d", "colour": "red"}, "unknown setting 'colour'"),
        ({"data_dir": "d", "sync_mode": "fast"}, "sync_mode must be none, batch or immediate"),
        ({"data_dir": "d", "sync_bytes": "big"}, "sync_bytes must be int, not str"),
        ({"data_dir": "d", "store_sync": 1}, "store_sync must be bool, not int"),
        ({"data_dir": "d", "segment_bytes": 100}, "segment_bytes must be at least 4096"),
        ({"data_dir": "d", "checkpoint_interval_ms": 0}, "checkpoint_interval_ms must be positive"),
        ({"data_dir": "d", "listen": "nohost"}, "expected HOST:PORT"),
        ({"data_dir": "d", "listen": "h:99999"}, "expected HOST:PORT"),
        ({"data_dir": "d", "listen": "h:\u00b2"}, "expected HOST:PORT"),  # "²" is a digit
        ({"data_dir": "d", "sync_interval_ms": 10**13}, "sync_interval_ms must be at most"),
        (
            {"data_dir": "d", "replication_listen": "h:1"},
            "replication_listen is only for role primary or replica",
        ),
        (
            {"data_dir": "d", "role": "primary", "replication_listen": "127.0.0.1:50051"},
            "replication_listen must differ from listen",
        ),
        ({"data_dir": "d", "role": "primary", "replication_listen": "x"}, "expected HOST:PORT"),
        ({"data_dir": "d", "replication_frame_bytes": 10}, "replication_frame_bytes must be in"),
        ({"data_dir": "d", "replication_linger_ms": -1}, "replication_linger_ms must be in"),
        ({"data_dir": "d", "replication_zstd_level": 0}, "replication_zstd_level must be in 1..22"),
        ({"data_dir": "d", "snapshot_zstd_level": -8}, "snapshot_zstd_level must be in -7..22"),
        ({"data_dir": "d", "snapshot_zstd_level": 23}, "snapshot_zstd_level must be in -7..22"),
        ({"data_dir": "d", "replication_codecs": "zstd,lz4"}, "replication_codecs must list"),
        ({"data_dir": "d", "replication_codecs": "zstd,zstd"}, "replication_codecs must list"),
        ({"data_dir": "d", "replication_codecs": " , "}, "replication_codecs must list"),
        ({"data_dir": "d", "on_divergence": "ignore"}, "on_divergence must be rebootstrap or"),
        ({"data_dir": "d", "replication_window_bytes": 0}, "must be positive"),
        ({"data_dir": "d", "max_replicas": 0}, "max_replicas must be positive"),
    ],
)
def test_bad_settings_are_named(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(values, "test")


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_toml(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("data_dir = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(str(bad))


def test_int_accepted_for_float_and_ipv6_address() -> None:
    assert build({"data_dir": "d", "grace_s": 2}, "t").grace_s == 2.0
    assert parse_address("[::1]:50051", "x") == ("::1", 50051)
