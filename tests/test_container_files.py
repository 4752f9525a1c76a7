"""docker-compose.yml and server/Dockerfile, checked structurally (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from kevo_repl.cli import build_parser

REPO = Path(__file__).resolve().parent.parent


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_runs_a_primary_and_two_replicas() -> None:
    services = _compose()["services"]
    assert set(services) == {"primary", "replica1", "replica2"}
    roles = {name: s["command"][s["command"].index("--role") + 1] for name, s in services.items()}
    assert roles == {"primary": "primary", "replica1": "replica", "replica2": "replica"}
    for name in ("replica1", "replica2"):
        command = services[name]["command"]
        assert command[command.index("--primary") + 1] == "primary:50051"
        assert services[name]["depends_on"]["primary"]["condition"] == "service_healthy"


def test_every_service_builds_has_a_health_check_and_a_named_volume() -> None:
    compose = _compose()
    named = set(compose["volumes"])
    host_ports = []
    for name, service in compose["services"].items():
        assert service["build"]["dockerfile"] == "server/Dockerfile"
        assert (REPO / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "kevo-repl", "status"], name
        (volume,) = service["volumes"]
        source, target = volume.split(":")
        assert source in named and target == "/data", name
        host_ports += [p.split(":")[0] for p in service["ports"]]
        advertise = service["command"][service["command"].index("--advertise") + 1]
        assert advertise == f"localhost:{service['ports'][0].split(':')[0]}", name
    assert len(host_ports) == len(set(host_ports)) == 3


def test_commands_are_valid_serve_flags() -> None:
    """Every compose command, after the image's entrypoint, parses as `kevo-repl serve`."""
    dockerfile = (REPO / "server" / "Dockerfile").read_text()
    match = re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.MULTILINE)
    assert match is not None
    entrypoint = yaml.safe_load(match.group(1))
    assert entrypoint[:2] == ["kevo-repl", "serve"]
    for service in _compose()["services"].values():
        args = build_parser().parse_args(entrypoint[1:] + service["command"])
        assert args.command == "serve" and args.data_dir == "/data"
    assert "COPY kevo_repl ./kevo_repl" in dockerfile and "HEALTHCHECK" in dockerfile
