"""Start-up failures of both services as real processes: one line naming the variable, exit status 2 (issue #9, B).

Before: the control service with PostgreSQL down printed a 125-line traceback, a port in use gave
tracebacks in both services, a garbage TLS certificate said "Failed to bind to address" without
naming a variable, a token with a newline was accepted and then failed every client, `/` was
accepted as a library root. Now each is one line on stderr, "imagetraining: VARIABLE: problem",
with exit status 2; and a database that is slower to start than the service is waited for.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import PYTHON, ROOT, subprocess_env, wait_for
from tests.pg_instance import PgInstance
from tests.ports import free_port

SERVICES = ("control_service", "discovery_worker")
ADDRESS_VARIABLE = {
    "control_service": "IMAGETRAINING_CONTROL_ADDRESS",
    "discovery_worker": "IMAGETRAINING_WORKER_ADDRESS",
}


def service_env(db_url: str, library: Path, **extra: str) -> dict[str, str]:
    """Both services on port 0, a one-process pool, the data directory next to the library."""
    values = {
        "IMAGETRAINING_CONTROL_ADDRESS": "127.0.0.1:0",
        "IMAGETRAINING_WORKER_ADDRESS": "127.0.0.1:0",
        "IMAGETRAINING_POOL_SIZE": "1",
        "IMAGETRAINING_GRACE_SECONDS": "1",
        "IMAGETRAINING_DATA_DIR": str(library.parent / "data"),
    }
    values.update(extra)
    return subprocess_env(db_url, library, **values)


def run(module: str, env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    done = subprocess.run(
        [PYTHON, "-m", module], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    return done.returncode, done.stderr


def spawn(module: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """The service as a background process, its stderr in `log_path`."""
    with open(log_path, "wb") as log_file:
        return subprocess.Popen([PYTHON, "-m", module], env=env, cwd=ROOT, stderr=log_file)


def one_line_naming(err: str, variable: str) -> str:
    """The failure is exactly one line, "imagetraining: VARIABLE: ...", and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("imagetraining: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"imagetraining: {variable}: "), err
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process (this test) listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


# --- the database ------------------------------------------------------------------------------


@pytest.mark.parametrize("module", SERVICES)
def test_database_unreachable_waits_then_stops_with_one_line_naming_database_url(
    module: str, db_url: str, library: Path
) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://imagetraining:Pa55word-never-printed@127.0.0.1:{port}/imagetraining"
    env = service_env(url, library, IMAGETRAINING_DATABASE_WAIT_SECONDS="1")
    code, err = run(module, env)
    assert code == 2, err
    line = one_line_naming(err, "DATABASE_URL")
    assert f"127.0.0.1:{port}" in line and "connection refused" in line
    assert f"waiting up to 1 s for PostgreSQL at 127.0.0.1:{port} (connection refused)" in err, err
    assert "Pa55word" not in err
    assert len(err.splitlines()) <= 3, err  # the waiting line, the failure line (and nothing like a traceback)


@pytest.mark.parametrize("module", SERVICES)
def test_embedded_database_that_cannot_start_names_the_data_dir(module: str, library: Path, tmp_path: Path) -> None:
    """With DATABASE_URL unset the embedded server lives in IMAGETRAINING_DATA_DIR: that is the variable named."""
    not_a_dir = tmp_path / "data-is-a-file"
    not_a_dir.write_text("x")
    env = service_env("", library, IMAGETRAINING_DATA_DIR=str(not_a_dir), IMAGETRAINING_DATABASE_WAIT_SECONDS="1")
    env.pop("DATABASE_URL")
    code, err = run(module, env)
    assert code == 2, err
    one_line_naming(err, "IMAGETRAINING_DATA_DIR")


async def test_a_database_that_comes_up_during_the_wait_is_used(
    pg_instance: PgInstance, library: Path, tmp_path: Path
) -> None:
    """Started while PostgreSQL refuses connections (57P03, as while it recovers), the service waits, then serves."""
    await asyncio.to_thread(pg_instance.make_standby_unavailable)
    port = free_port()
    env = service_env(
        pg_instance.url,
        library,
        IMAGETRAINING_CONTROL_ADDRESS=f"127.0.0.1:{port}",
        IMAGETRAINING_DATABASE_WAIT_SECONDS="120",
    )
    log_path = tmp_path / "control.log"
    proc = spawn("control_service", env, log_path)
    try:

        async def says_it_waits() -> bool:
            assert proc.poll() is None, log_path.read_text()
            return "not accepting connections" in log_path.read_text()

        await wait_for(says_it_waits, timeout=60, what="the log line about waiting for PostgreSQL")
        assert re.search(
            rf"waiting up to 120 s for PostgreSQL at 127\.0\.0\.1:{pg_instance.port} \(", log_path.read_text()
        )
        await asyncio.to_thread(pg_instance.stop)
        await asyncio.to_thread(pg_instance.start)

        async def serving() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                return False
            return bool(check.status == health_pb2.HealthCheckResponse.SERVING)

        await wait_for(serving, timeout=60, interval=0.1, what="the control service to serve")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# --- ports, TLS, token, roots, trainer ---------------------------------------------------------


@pytest.mark.parametrize("module", SERVICES)
def test_port_in_use_is_one_line_naming_the_address_variable(
    module: str, db_url: str, library: Path, taken_port: int
) -> None:
    variable = ADDRESS_VARIABLE[module]
    code, err = run(module, service_env(db_url, library, **{variable: f"127.0.0.1:{taken_port}"}))
    assert code == 2, err
    line = one_line_naming(err, variable)
    assert f"127.0.0.1:{taken_port}" in line and "in use" in line
    assert len(err.splitlines()) == 1, err  # not even gRPC's own log line


@pytest.mark.parametrize("module", SERVICES)
def test_garbage_tls_certificate_is_named(module: str, db_url: str, library: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "cert.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    env = service_env(
        db_url, library, IMAGETRAINING_TLS_CERT_FILE=str(garbage), IMAGETRAINING_TLS_KEY_FILE=str(garbage)
    )
    code, err = run(module, env)
    assert code == 2, err
    assert str(garbage) in one_line_naming(err, "IMAGETRAINING_TLS_CERT_FILE")
    assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize("module", SERVICES)
@pytest.mark.parametrize("token", ["Zq9-secret\n", "Zq9-\nsecret", "Zq9-sécret"])
def test_auth_token_that_cannot_be_metadata_is_refused(module: str, token: str, db_url: str, library: Path) -> None:
    code, err = run(module, service_env(db_url, library, IMAGETRAINING_AUTH_TOKEN=token))
    assert code == 2, err
    assert "visible ASCII" in one_line_naming(err, "IMAGETRAINING_AUTH_TOKEN")
    assert "Zq9" not in err
    assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize("module", SERVICES)
def test_the_root_directory_is_not_a_library(module: str, db_url: str, library: Path) -> None:
    code, err = run(module, service_env(db_url, library, IMAGETRAINING_LIBRARY_ROOTS="/"))
    assert code == 2, err
    assert "whole file system" in one_line_naming(err, "IMAGETRAINING_LIBRARY_ROOTS")
    assert len(err.splitlines()) == 1, err


def test_a_root_that_holds_the_embedded_database_is_refused(library: Path) -> None:
    env = service_env("", library, IMAGETRAINING_DATA_DIR=str(library / "data"))
    env.pop("DATABASE_URL")
    code, err = run("control_service", env)
    assert code == 2, err
    assert "IMAGETRAINING_DATA_DIR" in one_line_naming(err, "IMAGETRAINING_LIBRARY_ROOTS")
    assert not (library / "data").exists(), "refused before anything was created"


def test_worker_with_a_trainer_that_cannot_be_loaded_names_it(db_url: str, library: Path) -> None:
    env = service_env(db_url, library, IMAGETRAINING_TRAINER="no_such_module.anywhere:Trainer")
    code, err = run("discovery_worker", env)
    assert code == 2, err
    assert "no_such_module" in one_line_naming(err, "IMAGETRAINING_TRAINER")


@pytest.mark.parametrize("module", SERVICES)
@pytest.mark.parametrize("value", ["taken", "nine-four-six-four", "127.0.0.1:99999"])
def test_a_metrics_address_that_cannot_serve_is_one_line_naming_it(
    module: str, value: str, db_url: str, library: Path, taken_port: int
) -> None:
    address = f"127.0.0.1:{taken_port}" if value == "taken" else value
    code, err = run(module, service_env(db_url, library, IMAGETRAINING_METRICS_ADDRESS=address))
    assert code == 2, err
    line = one_line_naming(err, "IMAGETRAINING_METRICS_ADDRESS")
    assert address in line


@pytest.mark.parametrize("module", SERVICES)
def test_an_unknown_trace_exporter_is_one_line_naming_it(module: str, db_url: str, library: Path) -> None:
    code, err = run(module, service_env(db_url, library, OTEL_TRACES_EXPORTER="zipkin"))
    assert code == 2, err
    assert "'zipkin'" in one_line_naming(err, "OTEL_TRACES_EXPORTER")
