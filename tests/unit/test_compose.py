"""compose.yaml is valid and wires what the README promises, checked without a container engine.

`docker-compose config` (Debian's docker-compose package; `make test` installs it when it can)
parses, interpolates and validates the file against the compose schema and prints the result,
so we assert on what compose itself understood, not on our own reading of the YAML.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
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


def _compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (as root, `make tools` installs Debian's package)")
    return exe


def _render(*extra_files: Path, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """compose.yaml (and any override files after it) as `docker-compose config` understands it."""
    exe = _compose()
    env = {k: v for k, v in os.environ.items() if k not in ("LIBRARY_DIR", "IMAGETRAINING_AUTH_TOKEN")}
    env.update(env_extra or {})
    files = [arg for f in (ROOT / "compose.yaml", *extra_files) for arg in ("-f", str(f))]
    out = subprocess.run(
        [exe, *files, "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"docker-compose config rejected compose.yaml:\n{out.stderr}"
    return _to_json(exe, out.stdout, env, files)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return _render()


def _to_json(exe: str, yaml_text: str, env: dict[str, str], files: list[str]) -> dict[str, Any]:
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
        [exe, *files, "config", "--format", "json"],
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
    assert pg["image"] == "pgvector/pgvector:pg15"  # PostgreSQL 15 with pgvector (FindSimilarImages)
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    sources = [v.get("source") if isinstance(v, dict) else str(v).split(":", 1)[0] for v in pg["volumes"]]
    assert "pgdata" in sources
    assert "pgdata" in config["volumes"]


@pytest.mark.parametrize("name", ["control_service", "discovery_worker"])
def test_services_wait_for_a_healthy_postgres(config: dict[str, Any], name: str) -> None:
    service = _services(config)[name]
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "imagetraining.healthcheck" in service["healthcheck"]["test"]


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


# What an operator adds to turn TLS on without editing compose.yaml: the certificate files mounted
# and the TLS settings in both services' environment (`docker compose -f compose.yaml -f tls.yaml`).
TLS_OVERRIDE = """
services:
  control_service:
    environment: &tls
      IMAGETRAINING_TLS_CERT_FILE: ${IMAGETRAINING_TLS_CERT_FILE}
      IMAGETRAINING_TLS_KEY_FILE: ${IMAGETRAINING_TLS_KEY_FILE}
      IMAGETRAINING_TLS_CA_FILE: ${IMAGETRAINING_TLS_CA_FILE}
    volumes: &certs
      - ${TLS_DIR}:/tls:ro
  discovery_worker:
    environment: *tls
    volumes: *certs
"""
TLS_ENV = {
    "IMAGETRAINING_TLS_CERT_FILE": "/tls/server.pem",
    "IMAGETRAINING_TLS_KEY_FILE": "/tls/server.key",
    "IMAGETRAINING_TLS_CA_FILE": "/tls/ca.pem",
    "IMAGETRAINING_AUTH_TOKEN": "s3cret-token",
}
HEALTHCHECKS = {
    "control_service": ("IMAGETRAINING_CONTROL_ADDRESS", "imagetraining.v1.TrainingSessionService"),
    "discovery_worker": ("IMAGETRAINING_WORKER_ADDRESS", "imagetraining.v1.DiscoveryWorkerService"),
}


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    """A service's healthcheck command (exec form: the container's environment, no shell)."""
    test = [str(part) for part in service["healthcheck"]["test"]]
    assert test[0] == "CMD", f"the healthcheck runs without a shell, in the service's environment: {test}"
    return test[1:]


@pytest.mark.parametrize("name", sorted(HEALTHCHECKS))
def test_healthchecks_use_the_module_on_the_service_port(config: dict[str, Any], name: str) -> None:
    service = _services(config)[name]
    argv = healthcheck_argv(service)
    assert argv[:3] == ["python", "-m", "imagetraining.healthcheck"], argv
    variable, grpc_service = HEALTHCHECKS[name]
    listen_port = service["environment"][variable].rpartition(":")[2]
    assert argv[3] == f"127.0.0.1:{listen_port}", argv
    assert argv[argv.index("--service") + 1] == grpc_service


@pytest.mark.parametrize("name", sorted(HEALTHCHECKS))
def test_healthchecks_still_use_the_module_with_tls_on(tmp_path: Path, name: str) -> None:
    override = tmp_path / "tls.yaml"
    override.write_text(TLS_OVERRIDE)
    tls = _render(override, env_extra={**TLS_ENV, "TLS_DIR": str(tmp_path)})
    plain = _render()
    service = _services(tls)[name]
    environment = service["environment"]
    # The healthcheck runs in the service's environment: it sees the TLS files and the token.
    for variable, value in TLS_ENV.items():
        assert environment[variable] == value, variable
    assert any(":/tls" in str(v) or "'/tls'" in str(v) for v in service["volumes"]), service["volumes"]
    argv = healthcheck_argv(service)
    assert argv == healthcheck_argv(_services(plain)[name])
    assert argv[:3] == ["python", "-m", "imagetraining.healthcheck"], argv
    joined = " ".join(argv)
    assert "insecure_channel" not in joined and "-plaintext" not in joined, argv
