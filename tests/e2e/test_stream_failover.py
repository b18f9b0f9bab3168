"""Progress streams across process failures: a worker killed mid-stream, a control service killed
mid-stream, and the control process's memory with 200 subscribers.

Services run as real processes (`python -m discovery_worker`, `python -m control_service`) so that
SIGKILL means what it means in production: no cleanup, no goodbye on the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from control_service.server import serve
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc
from tests import worker_support as ws
from tests.conftest import PYTHON, ROOT, subprocess_env, wait_for
from tests.images import write_jpeg
from tests.ports import free_port

# Stated bound for the control process with 200 idle subscribers on one session (see README).
CONTROL_RSS_LIMIT_MB = 250
PER_SUBSCRIBER_LIMIT_KB = 200


def photos(root: Path, folders: int, per_folder: int) -> list[str]:
    for f in range(folders):
        for i in range(per_folder):
            write_jpeg(root / f"album{f:02d}" / f"img{i:04d}.jpg", 24, 24, seed=f * 10_000 + i, quality=70)
    return [str(root / f"album{f:02d}") for f in range(folders)]


def assert_consistent(events: list[pb.SessionEvent]) -> None:
    sequences = [e.sequence for e in events]
    assert all(a < b for a, b in itertools.pairwise(sequences)), sequences
    for field in ("processed_images", "failed_images", "skipped_images"):
        values = [getattr(e.training, field) for e in events]
        assert values == sorted(values), (field, values)


class ControlProcess:
    """`python -m control_service` on a fixed port (so a restart is reachable at the same address)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "control_service"],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    async def serving(self, address: str) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(self.log_path.read_text()[-3000:])
            try:
                async with grpc.aio.insecure_channel(address) as channel:
                    check = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=1
                    )
                    return bool(check.status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.aio.AioRpcError:
                return False

        await wait_for(up, timeout=60, interval=0.1, what="the control service to serve")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def processes() -> Iterator[list[ws.WorkerProcess | ControlProcess]]:
    started: list[ws.WorkerProcess | ControlProcess] = []
    yield started
    for p in started:
        p.kill()


async def owner_pid(db: Database, sid: int) -> int | None:
    owner = (await ws.session(db, sid))["owner_id"]
    return int(owner.split(":")[1]) if owner else None


@pytest.mark.slow
async def test_worker_killed_mid_stream_subscribers_go_on_without_gap_or_repeat(
    clean_db: Database,
    db_url: str,
    library: Path,
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    processes: list[ws.WorkerProcess | ControlProcess],
) -> None:
    subdirs = photos(library, folders=6, per_folder=100)
    env = ws.worker_env(
        db_url,
        library,
        HOME=str(tmp_path),
        IMAGETRAINING_TRAINER="tests.trainers:PacedTrainer",
        IMAGETRAINING_DATA_DIR=str(tmp_path / "data"),
    )
    workers = [ws.WorkerProcess(env, tmp_path / f"worker{i}.log") for i in range(2)]
    processes.extend(workers)
    control = await serve(make_settings(), database=clean_db)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{control.port}") as channel:
            stub = api_grpc.TrainingSessionServiceStub(channel)
            name = (
                await stub.CreateSession(api.CreateSessionRequest(root_path=str(library), subdirectories=subdirs))
            ).session.name
            sid = int(name.split("/")[1])
            await stub.StartSession(api.StartSessionRequest(name=name))
            subscribers = [stub.WatchSession(api.WatchSessionRequest(name=name)) for _ in range(3)]
            seen: list[list[pb.SessionEvent]] = [[] for _ in subscribers]

            async def read(i: int, until: Callable[[pb.SessionEvent], bool]) -> None:
                while (response := await subscribers[i].read()) is not grpc.aio.EOF:
                    seen[i].append(response.event)
                    if until(response.event):
                        return

            def training_under_way(e: pb.SessionEvent) -> bool:
                return e.state == pb.SESSION_STATE_RUNNING and e.training.processed_images >= 50

            await asyncio.wait_for(asyncio.gather(*(read(i, training_under_way) for i in range(3))), 90)
            victim = await owner_pid(clean_db, sid)
            assert victim in {w.proc.pid for w in workers}
            os.kill(victim, signal.SIGKILL)
            processed_at_kill = seen[0][-1].training.processed_images

            def terminal(e: pb.SessionEvent) -> bool:
                return e.state == pb.SESSION_STATE_COMPLETED

            await asyncio.wait_for(asyncio.gather(*(read(i, terminal) for i in range(3))), 120)
            for i in range(3):
                assert await subscribers[i].read() is grpc.aio.EOF  # the stream ends after the terminal message
            survivor = await ws.session(clean_db, sid)
            for events in seen:
                assert_consistent(events)
                assert events[-1].state == pb.SESSION_STATE_COMPLETED
                assert events[-1].training.processed_images == survivor["processed_images"]
                # Messages kept coming after the kill (the new owner's), above the old owner's sequences.
                after_kill = [e for e in events if e.training.processed_images > processed_at_kill]
                assert after_kill
            assert survivor["state"] == "completed" and survivor["total_images"] == 600
            assert survivor["epoch"] >= 2  # claimed again by the other worker
    finally:
        await control.stop()


@pytest.mark.slow
async def test_control_killed_mid_stream_client_resumes_with_after_sequence(
    clean_db: Database,
    db_url: str,
    library: Path,
    tmp_path: Path,
    processes: list[ws.WorkerProcess | ControlProcess],
) -> None:
    subdirs = photos(library, folders=6, per_folder=100)
    worker = ws.WorkerProcess(
        ws.worker_env(
            db_url,
            library,
            HOME=str(tmp_path),
            IMAGETRAINING_TRAINER="tests.trainers:PacedTrainer",
            IMAGETRAINING_DATA_DIR=str(tmp_path / "data"),
        ),
        tmp_path / "worker.log",
    )
    processes.append(worker)
    address = f"127.0.0.1:{free_port()}"
    env = subprocess_env(db_url, library, IMAGETRAINING_CONTROL_ADDRESS=address, IMAGETRAINING_GRACE_SECONDS="1")
    first = ControlProcess(env, tmp_path / "control1.log")
    processes.append(first)
    await first.serving(address)

    events: list[pb.SessionEvent] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = api_grpc.TrainingSessionServiceStub(channel)
        name = (
            await stub.CreateSession(api.CreateSessionRequest(root_path=str(library), subdirectories=subdirs))
        ).session.name
        await stub.StartSession(api.StartSessionRequest(name=name))
        call = stub.WatchSession(api.WatchSessionRequest(name=name))
        while (response := await call.read()) is not grpc.aio.EOF:
            events.append(response.event)
            if response.event.state == pb.SESSION_STATE_RUNNING and response.event.training.processed_images >= 50:
                break
        first.kill()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    second = ControlProcess(env, tmp_path / "control2.log")
    processes.append(second)
    await second.serving(address)
    last = events[-1].sequence
    async with grpc.aio.insecure_channel(address) as channel:
        stub = api_grpc.TrainingSessionServiceStub(channel)
        resumed = [r.event async for r in stub.WatchSession(api.WatchSessionRequest(name=name, after_sequence=last))]
        final = (await stub.GetSession(api.GetSessionRequest(name=name))).session
    assert resumed and resumed[0].sequence > last
    assert_consistent(events + resumed)
    # No gap in state: what the client knew, then running on, then completed.
    assert resumed[0].state in (pb.SESSION_STATE_RUNNING, pb.SESSION_STATE_COMPLETED)
    assert resumed[-1].state == pb.SESSION_STATE_COMPLETED
    assert resumed[-1].training.processed_images == final.progress.processed_images
    assert resumed[-1].training.total_images == final.progress.total_images == 600


@pytest.mark.slow
async def test_control_memory_with_200_subscribers_stays_bounded(
    clean_db: Database,
    db_url: str,
    library: Path,
    tmp_path: Path,
    processes: list[ws.WorkerProcess | ControlProcess],
) -> None:
    (library / "a").mkdir()
    address = f"127.0.0.1:{free_port()}"
    env = subprocess_env(db_url, library, IMAGETRAINING_CONTROL_ADDRESS=address, IMAGETRAINING_GRACE_SECONDS="1")
    control = ControlProcess(env, tmp_path / "control.log")
    processes.append(control)
    await control.serving(address)
    rss = psutil.Process(control.proc.pid)
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    try:
        stubs = [api_grpc.TrainingSessionServiceStub(c) for c in channels]
        name = (await stubs[0].CreateSession(api.CreateSessionRequest(root_path=str(library)))).session.name
        # Warm up: one subscriber, so the relay's code paths and buffers exist before the baseline.
        warm = stubs[0].WatchSession(api.WatchSessionRequest(name=name))
        assert (await warm.read()).event.kind == pb.EVENT_KIND_SNAPSHOT
        before = rss.memory_info().rss
        calls = [stubs[i % 4].WatchSession(api.WatchSessionRequest(name=name)) for i in range(200)]
        for call in calls:
            assert (await call.read()).event.kind == pb.EVENT_KIND_SNAPSHOT
        during = rss.memory_info().rss
        await stubs[0].CancelSession(api.CancelSessionRequest(name=name))
        for call in [warm, *calls]:
            response = await call.read()
            assert response.event.state == pb.SESSION_STATE_CANCELLED
            assert await call.read() is grpc.aio.EOF
        per_subscriber_kb = (during - before) / 200 / 1024
        print(f"control RSS {during / 2**20:.1f} MiB with 201 subscribers; {per_subscriber_kb:.1f} KiB each")
        assert during < CONTROL_RSS_LIMIT_MB * 2**20
        assert per_subscriber_kb < PER_SUBSCRIBER_LIMIT_KB
    finally:
        for c in channels:
            await c.close()
        with contextlib.suppress(ProcessLookupError):
            control.kill()
    assert re.search(r"listening on", control.log_path.read_text())


@pytest.mark.slow
async def test_two_control_services_a_subscriber_moves_from_one_to_the_other(
    clean_db: Database,
    db_url: str,
    library: Path,
    tmp_path: Path,
    processes: list[ws.WorkerProcess | ControlProcess],
) -> None:
    """Two control processes on one database, three workers on one session: a subscriber reads from
    the first control service, then resumes on the second with after_sequence: nothing missed or
    repeated, and the end carries the true counters."""
    subdirs = photos(library, folders=6, per_folder=100)
    for i in range(3):
        env = ws.worker_env(
            db_url,
            library,
            HOME=str(tmp_path / f"w{i}"),
            IMAGETRAINING_TRAINER="tests.trainers:PacedTrainer",
            IMAGETRAINING_DATA_DIR=str(tmp_path / f"w{i}" / "data"),
            IMAGETRAINING_WORKER_ID=f"worker-{i}",
        )
        processes.append(ws.WorkerProcess(env, tmp_path / f"worker{i}.log"))
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    for i, address in enumerate(addresses):
        env = subprocess_env(db_url, library, IMAGETRAINING_CONTROL_ADDRESS=address, IMAGETRAINING_GRACE_SECONDS="1")
        control = ControlProcess(env, tmp_path / f"control{i}.log")
        processes.append(control)
        await control.serving(address)

    events: list[pb.SessionEvent] = []
    async with grpc.aio.insecure_channel(addresses[0]) as channel:
        stub = api_grpc.TrainingSessionServiceStub(channel)
        name = (
            await stub.CreateSession(api.CreateSessionRequest(root_path=str(library), subdirectories=subdirs))
        ).session.name
        await stub.StartSession(api.StartSessionRequest(name=name))
        call = stub.WatchSession(api.WatchSessionRequest(name=name))
        while (response := await call.read()) is not grpc.aio.EOF:
            events.append(response.event)
            if response.event.state == pb.SESSION_STATE_RUNNING and response.event.training.processed_images >= 50:
                break
        call.cancel()
    last = events[-1].sequence
    async with grpc.aio.insecure_channel(addresses[1]) as channel:
        stub = api_grpc.TrainingSessionServiceStub(channel)
        resumed = [r.event async for r in stub.WatchSession(api.WatchSessionRequest(name=name, after_sequence=last))]
        final = (await stub.GetSession(api.GetSessionRequest(name=name))).session
    assert resumed and resumed[0].sequence > last
    assert_consistent(events + resumed)
    assert resumed[-1].state == pb.SESSION_STATE_COMPLETED
    assert resumed[-1].training.processed_images == final.progress.processed_images == 600
    assert resumed[-1].training.total_images == 600
    sid = int(name.split("/")[1])
    async with clean_db.engine.connect() as conn:
        from sqlalchemy import text

        trainers = (
            await conn.execute(
                text("SELECT count(DISTINCT trained_by) FROM training_jobs WHERE session_id = :id"), {"id": sid}
            )
        ).scalar_one()
    assert trainers >= 2  # helpers trained chunks too
