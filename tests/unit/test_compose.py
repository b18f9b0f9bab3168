"""compose.yaml is valid and wires what the README promises, checked without a container engine.

`docker-compose config` (Debian's docker-compose package; `make test` installs it when it can)
parses, interpolates and validates the file against the compose schema and prints the result,
so we assert on what compose itself understood, not on our own reading of the YAML.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import Any

import pytest

from tests.conftest import ROOT

SERVICES = ("postgres", "control_service", "discovery_worker")
SHARED_ENV = (
    "DATABASE_URL",
    "IMAGETRAINING_LIBRARY_ROOTS",
    "IMAGETRAINING_CONTROL_ADDRESS",
    "IMAGETRAINING_WORKER_ADDRESS",
    "IMAGETRAINING_AUTH_TOKEN",
)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (as root, `make tools` installs Debian's package)")
    env = {k: v for k, v in os.environ.items() if k not in ("LIBRARY_DIR", "IMAGETRAINING_AUTH_TOKEN")}
    out = subprocess.run(
        [exe, "-f", str(ROOT / "compose.yaml"), "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"docker-compose config rejected compose.yaml:\n{out.stderr}"
    return _to_json(exe, out.stdout, env)


def _to_json(exe: str, yaml_text: str, env: dict[str, str]) -> dict[str, Any]:
    """Turn `config`'s YAML into a dict with compose's own YAML library.

    PyYAML is not a dependency of this project, but Debian's docker-compose is a Python program
    that has it: its interpreter converts. A Go-based docker-compose (v2) prints JSON itself.
    """
    with open(exe, "rb") as f:
        first = f.readline()
    if first.startswith(b"#!") and b"python" in first:
        interpreter = first[2:].decode().split()
        conv = subprocess.run(
            [*interpreter, "-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"],
            input=yaml_text,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        parsed: dict[str, Any] = json.loads(conv.stdout)
        return parsed
    conv = subprocess.run(
        [exe, "-f", str(ROOT / "compose.yaml"), "config", "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if conv.returncode != 0:
        pytest.skip(f"cannot read docker-compose's output as JSON: {conv.stderr.strip()}")
    parsed = json.loads(conv.stdout)
    return parsed


def _services(config: dict[str, Any]) -> dict[str, Any]:
    services: dict[str, Any] = config["services"]
    return services


def test_three_services(config: dict[str, Any]) -> None:
    assert set(SERVICES) <= set(_services(config))


def test_postgres_has_a_pg_isready_healthcheck_and_a_volume(config: dict[str, Any]) -> None:
    pg = _services(config)["postgres"]
    assert re.match(r"postgres:15", pg["image"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    sources = [v.get("source") if isinstance(v, dict) else str(v).split(":", 1)[0] for v in pg["volumes"]]
    assert "pgdata" in sources
    assert "pgdata" in config["volumes"]


@pytest.mark.parametrize("name", ["control_service", "discovery_worker"])
def test_services_wait_for_a_healthy_postgres(config: dict[str, Any], name: str) -> None:
    service = _services(config)[name]
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "grpc_health" in " ".join(service["healthcheck"]["test"])


def test_services_share_the_same_settings(config: dict[str, Any]) -> None:
    control = _services(config)["control_service"]["environment"]
    worker = _services(config)["discovery_worker"]["environment"]
    assert set(control) == set(worker)
    for name in SHARED_ENV:
        assert name in control, name
        assert control[name] == worker[name], name
    assert control["DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in control["DATABASE_URL"]
    assert control["IMAGETRAINING_LIBRARY_ROOTS"] == "/library"
    assert control["IMAGETRAINING_CONTROL_ADDRESS"] == "0.0.0.0:50051"
    assert control["IMAGETRAINING_WORKER_ADDRESS"] == "0.0.0.0:50052"
    assert control["IMAGETRAINING_AUTH_TOKEN"], "a placeholder token is set by default"


def test_library_is_mounted_read_only(config: dict[str, Any]) -> None:
    for name in ("control_service", "discovery_worker"):
        volumes = [str(v) for v in _services(config)[name]["volumes"]]
        assert any(v.endswith(":/library:ro") or "'read_only': True" in v for v in volumes), volumes


def test_workers_scale_and_advertise_their_own_address(config: dict[str, Any]) -> None:
    worker = _services(config)["discovery_worker"]
    # Published ports would collide between replicas of `--scale discovery_worker=N`.
    assert not worker.get("ports")
    assert "container_name" not in worker
    command = " ".join(worker["command"])
    assert "IMAGETRAINING_WORKER_ADVERTISE_ADDRESS" in command
    assert "HOSTNAME:50052" in command
    assert "discovery_worker" in command
    control = _services(config)["control_service"]
    assert any("50051" in str(p) for p in control["ports"])
