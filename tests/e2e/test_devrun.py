"""`make run` (python -m imagetraining.devrun): the README's first command, as a user runs it.

Real processes: the supervisor starts the real control service and worker, which must report
SERVING over gRPC; Ctrl-C must stop everything cleanly (the embedded PostgreSQL included); a
child that dies must take the supervisor down with its last lines; a bad setting is one line.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import signal
import socket
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from imagetraining.devrun.demo import demo_image_count, ensure_demo_library
from imagetraining.formats import DEFAULT_EXTENSIONS
from imagetraining.walk import FoundFile, Walk
from tests.conftest import PYTHON, ROOT, wait_for
from tests.ports import free_port


def _has_main(package: str) -> bool:
    return importlib.util.find_spec(package) is not None and (ROOT / package / "__main__.py").exists()


needs_services = pytest.mark.skipif(
    not (_has_main("control_service") and _has_main("discovery_worker")),
    reason="needs control_service/__main__.py and discovery_worker/__main__.py",
)


def devrun_env(data_dir: Path, control: int, worker: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGETRAINING_") and k != "DATABASE_URL"}
    env.update(
        IMAGETRAINING_DATA_DIR=str(data_dir),
        IMAGETRAINING_CONTROL_ADDRESS=f"127.0.0.1:{control}",
        IMAGETRAINING_WORKER_ADDRESS=f"127.0.0.1:{worker}",
        IMAGETRAINING_GRACE_SECONDS="1",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


async def health(address: str, service: str = "") -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.aio.AioRpcError as err:
            return str(err.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class Devrun:
    """`python -m imagetraining.devrun` with its output in files (never a full pipe)."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.out = tmp_path / "devrun.out"
        self.err = tmp_path / "devrun.err"
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> asyncio.subprocess.Process:
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                PYTHON, "-m", "imagetraining.devrun", env=self.env, cwd=ROOT, stdout=out, stderr=err
            )
        return self.proc

    def output(self) -> tuple[str, str]:
        return self.out.read_text(errors="replace"), self.err.read_text(errors="replace")

    async def stop(self) -> None:
        """After a failure: the graceful way first, so that the supervisor stops its children."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()  # the children get SIGTERM from the kernel (parent-death signal)
                await self.proc.wait()


def test_demo_library(tmp_path: Path) -> None:
    root = ensure_demo_library(tmp_path)
    found = [i for i in Walk([str(root)], DEFAULT_EXTENSIONS, [root]) if isinstance(i, FoundFile)]
    assert len(found) == demo_image_count() == 30
    assert len({os.path.dirname(f.path) for f in found}) >= 6  # nested folders
    assert any(f.path.endswith(".JPG") for f in found)
    digests: dict[str, list[str]] = {}
    for f in found:
        with Image.open(f.path) as image:
            image.verify()
        digests.setdefault(hashlib.sha256(Path(f.path).read_bytes()).hexdigest(), []).append(f.path)
    assert sorted(len(paths) for paths in digests.values())[-1] == 2, "exactly one exact duplicate"
    assert len(digests) == 29
    assert (root / "notes.txt").is_file()
    # Generated once: a second call keeps the files.
    before = {f.path: os.stat(f.path).st_mtime_ns for f in found}
    assert ensure_demo_library(tmp_path) == root
    assert {p: os.stat(p).st_mtime_ns for p in before} == before


def test_bad_setting_is_one_line(tmp_path: Path) -> None:
    env = devrun_env(tmp_path / "data", free_port(), free_port(), IMAGETRAINING_WORKER_ADDRESS="no-port")
    out = subprocess.run(
        [PYTHON, "-m", "imagetraining.devrun"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: IMAGETRAINING_WORKER_ADDRESS: 'no-port' is not HOST:PORT"]
    assert not (tmp_path / "data" / "pgdata").exists(), "nothing is started before the settings are valid"


@needs_services
async def test_serves_until_sigint(tmp_path: Path, data_dir: Path, db_url: str) -> None:
    control, worker = free_port(), free_port()
    extra: dict[str, str] = {}
    if os.environ.get("IMAGETRAINING_TEST_DATABASE_URL"):
        # The external-PostgreSQL pass runs devrun with DATABASE_URL set; the embedded pass, as
        # `make run` does, with its own embedded server in the data directory.
        extra["DATABASE_URL"] = db_url
    env = devrun_env(data_dir, control, worker, **extra)
    env.pop("XDG_RUNTIME_DIR", None)  # as in containers and CI: pgserver's platformdirs would warn
    run = Devrun(tmp_path, env)
    proc = await run.start()
    try:

        async def banner() -> bool:
            out, err = run.output()
            if proc.returncode is not None:
                raise AssertionError(f"devrun exited with {proc.returncode}:\n{out}\n{err[:3000]}\n...\n{err[-3000:]}")
            return f"grpcurl -plaintext 127.0.0.1:{control} list" in out

        await wait_for(banner, timeout=180, interval=0.1, what="the grpcurl lines")
        out, _ = run.output()
        assert f"127.0.0.1:{worker}" in out
        assert str(data_dir / "demo-library") in out, "the demo library is used and named"
        for method in ("CreateSession", "UpdateSubdirectories", "StartSession", "GetSession", "WatchSession"):
            assert f"imagetraining.v1.TrainingSessionService/{method}" in out
        assert await health(f"127.0.0.1:{control}") == "SERVING"
        assert await health(f"127.0.0.1:{control}", "imagetraining.v1.TrainingSessionService") == "SERVING"
        assert await health(f"127.0.0.1:{worker}") == "SERVING"

        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 60)
        out, err = run.output()
        assert code == 0, err[-3000:]
        assert out.rstrip().endswith("stopped")
        assert "XDG_RUNTIME_DIR" not in out + err  # #10 item 11: printed three times before
        assert await health(f"127.0.0.1:{control}") == "UNAVAILABLE"
        assert await health(f"127.0.0.1:{worker}") == "UNAVAILABLE"
        if not extra:

            async def server_gone() -> bool:
                return not (data_dir / "pgdata" / "postmaster.pid").exists()

            await wait_for(server_gone, timeout=30, what="the embedded PostgreSQL to stop")
    finally:
        await run.stop()


@needs_services
async def test_a_child_that_dies_stops_the_other(tmp_path: Path, db_url: str, library: Path) -> None:
    control, worker = free_port(), free_port()
    with socket.socket() as taken:  # the control port is in use: the control service cannot start
        taken.bind(("127.0.0.1", control))
        taken.listen()
        env = devrun_env(tmp_path / "data", control, worker, DATABASE_URL=db_url)
        env["IMAGETRAINING_LIBRARY_ROOTS"] = str(library)
        run = Devrun(tmp_path, env)
        proc = await run.start()
        try:
            code = await asyncio.wait_for(proc.wait(), 120)
        finally:
            await run.stop()
    out, err = run.output()
    assert code != 0
    assert "error: control_service exited with code" in err
    assert "its last output:" in err
    assert "grpcurl" not in out
    assert await health(f"127.0.0.1:{worker}") == "UNAVAILABLE"


@needs_services
async def test_children_stop_when_the_supervisor_is_killed(tmp_path: Path, db_url: str, library: Path) -> None:
    control, worker = free_port(), free_port()
    env = devrun_env(tmp_path / "data", control, worker, DATABASE_URL=db_url)
    env["IMAGETRAINING_LIBRARY_ROOTS"] = str(library)
    run = Devrun(tmp_path, env)
    proc = await run.start()
    try:

        async def serving() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"devrun exited with {proc.returncode}: {run.output()[1][-3000:]}")
            return (
                await health(f"127.0.0.1:{control}") == "SERVING" and await health(f"127.0.0.1:{worker}") == "SERVING"
            )

        await wait_for(serving, timeout=120, interval=0.1, what="both services SERVING")
        proc.kill()  # no chance to forward anything: the kernel's parent-death signal must do it
        await proc.wait()

        async def both_gone() -> bool:
            return await health(f"127.0.0.1:{control}") == "UNAVAILABLE" == await health(f"127.0.0.1:{worker}")

        await wait_for(both_gone, timeout=30, what="the orphaned services to stop")
    finally:
        await run.stop()
