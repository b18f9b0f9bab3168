"""`python -m control_service` as a real process: bad settings, start, SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import PYTHON, ROOT, subprocess_env


async def _run(env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "control_service",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("IMAGETRAINING_SCAN_MAX_FILES", "lots", "'lots' is not an integer"),
        ("IMAGETRAINING_LIBRARY_ROOTS", "", "required"),
        ("IMAGETRAINING_CONTROL_ADDRESS", "nowhere", "is not HOST:PORT"),
        ("DATABASE_URL", "mysql://x", "must be a postgresql:// URL"),
    ],
)
async def test_a_bad_setting_stops_with_one_line_naming_it(
    db_url: str, library: Path, variable: str, value: str, problem: str
) -> None:
    env = subprocess_env(db_url, library, **{variable: value})
    code, err = await _run(env)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"imagetraining: {variable}: ") and problem in lines[0]


async def test_sigterm_reports_not_serving_then_stops_gracefully(db_url: str, library: Path) -> None:
    env = subprocess_env(db_url, library, IMAGETRAINING_CONTROL_ADDRESS="127.0.0.1:0", IMAGETRAINING_GRACE_SECONDS="1")
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "control_service", env=env, cwd=ROOT, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    try:

        async def listening_port() -> int:
            assert proc.stderr is not None
            while line := (await proc.stderr.readline()).decode():
                if match := re.search(r"control service listening on 127\.0\.0\.1:(\d+)", line):
                    return int(match.group(1))
            raise AssertionError("the process ended before listening")

        port = await asyncio.wait_for(listening_port(), 60)
        drain = asyncio.create_task(proc.stderr.read())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service="imagetraining.v1.TrainingSessionService"))
            first = await asyncio.wait_for(watch.read(), 10)
            assert first.status == health_pb2.HealthCheckResponse.SERVING

            proc.send_signal(signal.SIGTERM)
            second = await asyncio.wait_for(watch.read(), 10)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
        code = await asyncio.wait_for(proc.wait(), 10)
        assert code == 0, await drain
        assert "control service stopped" in (await drain).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
