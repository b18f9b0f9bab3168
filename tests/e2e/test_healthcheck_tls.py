"""Health that works with TLS and auth on (issue #14): compose's healthcheck command and `make run`'s readiness.

Real processes: `python -m control_service` and `python -m discovery_worker` with TLS (a throw-away
CA and a certificate issued for `localhost` only, as the servers are dialed on 127.0.0.1) and a
bearer token, then the healthcheck command exactly as compose.yaml writes it (read from the file,
the address substituted), in the environment the service runs in, as Docker runs it in the
container. It must exit 0 while the server serves, and 1 with one line on stderr once it is gone.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagetraining.healthcheck import certificate_names, server_name_for
from imagetraining.settings import Settings
from tests.certs import Certs, make_certs
from tests.conftest import PYTHON, ROOT, subprocess_env, wait_for
from tests.ports import free_port

TOKEN = "healthcheck-test-token"
SERVICES = {
    "control_service": ("control_service", "IMAGETRAINING_CONTROL_ADDRESS", "imagetraining.v1.TrainingSessionService"),
    "discovery_worker": ("discovery_worker", "IMAGETRAINING_WORKER_ADDRESS", "imagetraining.v1.DiscoveryWorkerService"),
}
COMPOSE_ADDRESS = re.compile(r"^127\.0\.0\.1:\d+$")


def compose_healthcheck(service: str) -> list[str]:
    """The `healthcheck.test` of `service` in compose.yaml, read from the file as written.

    A small reader (PyYAML is not a dependency): the service's block, then its first `test:` key,
    in flow form (`test: ["CMD", ...]`, JSON-compatible) or block form (`- item` lines).
    """
    lines = (ROOT / "compose.yaml").read_text().splitlines()
    start = lines.index(f"  {service}:")
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"^  \S", lines[i])), len(lines))
    for i in range(start + 1, end):
        key, _, value = lines[i].strip().partition(":")
        if key != "test":
            continue
        value = value.strip()
        if value:
            parsed = json.loads(value)
            assert isinstance(parsed, list), f"compose.yaml: {service}'s healthcheck test is not a list"
            return [str(part) for part in parsed]
        items: list[str] = []
        for line in lines[i + 1 : end]:
            item = line.strip()
            if not item.startswith("- "):
                break
            scalar = item[2:].strip()
            items.append(json.loads(scalar) if scalar.startswith('"') else scalar.strip("'"))
        return items
    raise AssertionError(f"compose.yaml: no healthcheck test for {service}")


def healthcheck_argv(service: str, address: str) -> list[str]:
    """compose.yaml's command for `service`, run here: this interpreter for `python`, `address` for its address."""
    test = compose_healthcheck(service)
    assert test[0] == "CMD", f"exec form expected (the container's environment, no shell): {test}"
    argv = test[1:]
    assert argv[0] == "python", argv
    addresses = [i for i, arg in enumerate(argv) if COMPOSE_ADDRESS.match(arg)]
    assert len(addresses) == 1, f"one 127.0.0.1:PORT argument expected in {argv}"
    argv[addresses[0]] = address
    return [PYTHON, *argv[1:]]


@dataclass
class Checked:
    code: int
    err: str


async def run_healthcheck(argv: list[str], env: dict[str, str]) -> Checked:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Checked(proc.returncode, err.decode(errors="replace"))


def tls_env(db_url: str, library: Path, certs: Certs, data_dir: Path, **extra: str) -> dict[str, str]:
    """One environment for both services (as compose's x-service-env), with TLS and the token on."""
    return subprocess_env(
        db_url,
        library,
        IMAGETRAINING_TLS_CERT_FILE=str(certs.cert),
        IMAGETRAINING_TLS_KEY_FILE=str(certs.key),
        IMAGETRAINING_TLS_CA_FILE=str(certs.ca),
        IMAGETRAINING_AUTH_TOKEN=TOKEN,
        IMAGETRAINING_DATA_DIR=str(data_dir),
        IMAGETRAINING_POOL_SIZE="1",
        IMAGETRAINING_GRACE_SECONDS="1",
        **extra,
    )


async def tls_health(address: str, certs: Certs, service: str = "") -> str:
    """An independent check (grpc directly, `localhost` as the certificate's name): the status, or the code."""
    creds = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    async with grpc.aio.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        try:
            reply = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.aio.AioRpcError as err:
            return str(err.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@dataclass
class Server:
    name: str
    address: str
    env: dict[str, str]
    proc: asyncio.subprocess.Process
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def start_server(service: str, env: dict[str, str], certs: Certs, log: Path) -> Server:
    module, variable, _grpc_service = SERVICES[service]
    address = f"127.0.0.1:{free_port()}"
    env = {**env, variable: address}
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", module, env=env, cwd=ROOT, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    server = Server(service, address, env, proc, log)

    async def up() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"{module} exited with {proc.returncode}:\n{server.tail()}")
        return await tls_health(address, certs) == "SERVING"

    try:
        await wait_for(up, timeout=60, interval=0.1, what=f"{module} to report SERVING over TLS")
    except BaseException:
        await server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"), ["localhost"])


@pytest.fixture(scope="module")
def tls_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("healthcheck-library").resolve()


@pytest.fixture(scope="module")
async def servers(
    module_db_url: str, tls_library: Path, certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Server]]:
    logs = tmp_path_factory.mktemp("healthcheck-logs")
    env = tls_env(module_db_url, tls_library, certs, logs / "data")
    started: dict[str, Server] = {}
    try:
        for service in SERVICES:
            started[service] = await start_server(service, env, certs, logs / f"{service}.log")
        yield started
    finally:
        for server in reversed(started.values()):
            await server.stop()


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_compose_healthcheck_passes_with_tls_and_auth(servers: dict[str, Server], service: str) -> None:
    server = servers[service]
    argv = healthcheck_argv(service, server.address)
    assert argv[1:3] == ["-m", "imagetraining.healthcheck"], argv
    assert argv[argv.index("--service") + 1] == SERVICES[service][2], argv
    result = await run_healthcheck(argv, server.env)
    assert result.code == 0, f"{argv} exited {result.code}: {result.err}\n{server.tail()}"
    assert result.err == ""


async def test_the_check_really_speaks_tls(servers: dict[str, Server]) -> None:
    """Without the TLS settings the same command fails against the TLS server: TLS was in use."""
    server = servers["control_service"]
    plain = {k: v for k, v in server.env.items() if not k.startswith("IMAGETRAINING_TLS_")}
    result = await run_healthcheck(healthcheck_argv("control_service", server.address), plain)
    assert result.code == 1, result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert "UNAVAILABLE" in result.err


async def test_a_stopped_server_fails_the_check(db_url: str, library: Path, certs: Certs, tmp_path: Path) -> None:
    env = tls_env(db_url, library, certs, tmp_path / "data")
    for service in SERVICES:
        server = await start_server(service, env, certs, tmp_path / f"{service}.log")
        argv = healthcheck_argv(service, server.address)
        try:
            serving = await run_healthcheck(argv, server.env)
            assert serving.code == 0, f"{serving.err}\n{server.tail()}"
        finally:
            await server.stop()
        assert server.proc.returncode is not None
        stopped = await run_healthcheck(argv, server.env)
        assert stopped.code == 1, stopped.err
        lines = stopped.err.strip().splitlines()
        assert len(lines) == 1, stopped.err
        assert lines[0].startswith(f"{server.address} service "), lines
        assert "UNAVAILABLE" in lines[0]


async def test_make_run_is_ready_with_tls_and_auth(db_url: str, library: Path, certs: Certs, tmp_path: Path) -> None:
    """`make run`'s supervisor waits for SERVING with the same check: with a `localhost` certificate
    and the servers on 127.0.0.1 it reports ready (it waited forever for a name the certificate lacks)."""
    control, worker = free_port(), free_port()
    env = tls_env(
        db_url,
        library,
        certs,
        tmp_path / "data",
        IMAGETRAINING_CONTROL_ADDRESS=f"127.0.0.1:{control}",
        IMAGETRAINING_WORKER_ADDRESS=f"127.0.0.1:{worker}",
    )
    out_file, err_file = tmp_path / "devrun.out", tmp_path / "devrun.err"
    with out_file.open("wb") as out, err_file.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "imagetraining.devrun", "--ready-timeout", "90", env=env, cwd=ROOT, stdout=out, stderr=err
        )
    try:

        async def ready() -> bool:
            text = out_file.read_text(errors="replace")
            if proc.returncode is not None:
                raise AssertionError(
                    f"devrun exited with {proc.returncode}:\n{text}\n{err_file.read_text(errors='replace')[-3000:]}"
                )
            return "imagetraining is serving" in text

        await wait_for(ready, timeout=120, interval=0.1, what="make run to report the services ready")
        assert await tls_health(f"127.0.0.1:{control}", certs) == "SERVING"
        assert await tls_health(f"127.0.0.1:{worker}", certs) == "SERVING"
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 60) == 0, err_file.read_text(errors="replace")[-3000:]
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.mark.parametrize(
    ("names", "address", "expected"),
    [
        (["localhost"], "127.0.0.1:50051", "localhost"),
        (["control.example", "localhost"], "127.0.0.1:50051", "localhost"),
        (["control.example"], "127.0.0.1:50051", "control.example"),
        (["localhost", "127.0.0.1"], "127.0.0.1:50051", None),
        (["control.example"], "control.example:50051", None),
    ],
)
def test_the_name_the_certificate_is_verified_against(
    tmp_path: Path, names: list[str], address: str, expected: str | None
) -> None:
    made = make_certs(tmp_path, names)
    assert certificate_names(made.cert) == names
    settings = Settings(library_roots=(), tls_cert_file=made.cert, tls_key_file=made.key, tls_ca_file=made.ca)
    assert server_name_for(address, settings) == expected
    assert server_name_for(address, Settings(library_roots=())) is None, "no TLS: no name"


def test_a_usage_error_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """Docker reserves exit status 2: a broken healthcheck command is "unhealthy" (1), with one line."""
    env = subprocess_env("postgresql://unused@127.0.0.1:1/unused", tmp_path)
    out = subprocess.run(
        [PYTHON, "-m", "imagetraining.healthcheck"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    bad = subprocess.run(
        [PYTHON, "-m", "imagetraining.healthcheck", "127.0.0.1:1"],
        env={**env, "IMAGETRAINING_TLS_CERT_FILE": str(tmp_path / "missing.pem")},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"127.0.0.1:1: cannot check: IMAGETRAINING_TLS_CERT_FILE: '{tmp_path / 'missing.pem'}' is not a readable file"
    ]
