"""A library that goes offline is not a library that was deleted (issue #9, item 5).

A NAS mount that drops, or a library root renamed away, makes every file "vanish" at once. The
worker must tell that from "this one file is gone": pause the session with a reason naming the path,
never cut the total short, never mark jobs vanished in bulk, never complete; and finish exactly,
every image trained, once the library is back and the session is resumed.

Worker processes freeze themselves at a chosen point (IMAGETRAINING_FAULT_POINT with `stop`) so the
library can be taken away at a known moment of the walk or of training, then continue (SIGCONT).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from control_service.server import ControlServer, serve
from discovery_worker.worker import WorkerHandle
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc
from tests import worker_support as ws
from tests.conftest import wait_for
from tests.images import photo_folders, write_jpeg

IMAGES = 4 * 150


@pytest.fixture
async def control(clean_db: Database, make_settings: Callable[..., Settings]) -> AsyncIterator[ControlServer]:
    server = await serve(make_settings(), database=clean_db)
    yield server
    await server.stop()


async def run(command: list[str], *, check: bool = False) -> subprocess.CompletedProcess[bytes]:
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, check=check)


async def settled(db: Database, sid: int, states: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        row = await ws.session(db, sid)
        return row if row["state"] in states else None

    row: dict[str, Any] = await wait_for(reached, timeout=timeout, interval=0.05, what=f"session {sid} in {states}")
    return row


async def assert_no_vanished(db: Database, sid: int) -> None:
    states = {(j["state"], j["error_class"]) for j in await ws.jobs(db, sid)}
    assert ("failed", "vanished") not in states, states
    assert not any(s == "failed" for s, _c in states), states


async def resume_and_finish_exactly(
    db: Database, control: ControlServer, name: str, sid: int, lib_root: Path, folders: list[Path]
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{control.port}") as channel:
        stub = api_grpc.TrainingSessionServiceStub(channel)
        paused = (await stub.GetSession(api.GetSessionRequest(name=name))).session
        assert paused.state == pb.SESSION_STATE_PAUSED
        assert f"library offline: {lib_root}" in paused.state_reason
        resumed = (await stub.ResumeSession(api.ResumeSessionRequest(name=name))).session
        assert resumed.state_reason == ""
    row = await settled(db, sid, ("completed", "failed", "cancelled", "paused"), timeout=90)
    assert row["state"] == "completed", row["state_reason"]
    assert (row["total_images"], row["processed_images"], row["failed_images"], row["skipped_images"]) == (
        IMAGES,
        IMAGES,
        0,
        0,
    )
    assert row["images_found"] == IMAGES and row["directories_scanned"] == len(folders)
    jobs = await ws.jobs(db, sid)
    assert len(jobs) == IMAGES and all(j["state"] == "completed" for j in jobs)


async def start(control: ControlServer, root: Path, folders: list[Path]) -> tuple[str, int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{control.port}") as channel:
        stub = api_grpc.TrainingSessionServiceStub(channel)
        created = await stub.CreateSession(
            api.CreateSessionRequest(root_path=str(root), subdirectories=[str(f) for f in folders])
        )
        await stub.StartSession(api.StartSessionRequest(name=created.session.name))
    return created.session.name, int(created.session.name.split("/")[1])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "shape"),
    [
        # Many small folders: the walk (a few batches ahead of the writes) is still far from the end.
        ("discovery_batch_after_commit:1:stop", (40, 15)),
        ("training_chunk_after_commit:2:stop", (4, 150)),
    ],
)
async def test_library_root_renamed_away_pauses_then_resume_finishes_exactly(
    clean_db: Database,
    db_url: str,
    library: Path,
    tmp_path: Path,
    control: ControlServer,
    worker_processes: list[ws.WorkerProcess],
    point: str,
    shape: tuple[int, int],
) -> None:
    root = library
    folders = photo_folders(root, folders=shape[0], per_folder=shape[1])
    name, sid = await start(control, root, folders)
    worker = ws.WorkerProcess(
        {**ws.paced_env(db_url, root, tmp_path), "IMAGETRAINING_FAULT_POINT": point}, tmp_path / "worker.log"
    )
    worker_processes.append(worker)
    await wait_for(lambda: ws.frozen(worker), timeout=60, what="the worker to freeze")
    before = await ws.session(clean_db, sid)
    away = root.with_name("library.away")
    os.rename(root, away)  # the share drops (or someone renames the library)
    os.kill(worker.proc.pid, signal.SIGCONT)

    row = await settled(clean_db, sid, ("paused", "completed", "failed", "cancelled"))
    assert row["state"] == "paused", (row["state"], row["state_reason"], worker.log()[-2000:])
    assert row["state_reason"].startswith(f"library offline: {root} is missing"), row["state_reason"]
    assert row["resume_state"] == before["state"]
    assert row["owner_id"] is None and row["attempts"] == 0
    # Nothing shrank, nothing vanished, nothing completed.
    if before["state"] == "discovering":
        assert not row["total_final"]
    else:
        assert row["total_final"] and row["total_images"] == IMAGES
    await assert_no_vanished(clean_db, sid)
    assert "library offline" in worker.log()

    os.rename(away, root)  # back
    await resume_and_finish_exactly(clean_db, control, name, sid, root, folders)


@pytest.mark.slow
async def test_an_unmounted_share_under_a_selected_folder_pauses_and_a_remount_finishes(
    clean_db: Database,
    db_url: str,
    library: Path,
    tmp_path: Path,
    control: ControlServer,
    worker_processes: list[ws.WorkerProcess],
) -> None:
    root = library
    top = root / "photos"
    share = top / "nas"
    share.mkdir(parents=True)
    mounted = await run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(share)])
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.decode().strip()}")
    backup = tmp_path / "backup"
    try:
        photo_folders(share, folders=4, per_folder=150)
        shutil.copytree(share, backup)
        name, sid = await start(control, root, [top])
        worker = ws.WorkerProcess(
            {**ws.paced_env(db_url, root, tmp_path), "IMAGETRAINING_FAULT_POINT": "training_chunk_after_commit:2:stop"},
            tmp_path / "worker.log",
        )
        worker_processes.append(worker)
        await wait_for(lambda: ws.frozen(worker), timeout=60, what="the worker to freeze")
        await run(["umount", "-l", str(share)], check=True)  # the share drops (lazily, as a dead NAS does)
        os.kill(worker.proc.pid, signal.SIGCONT)

        row = await settled(clean_db, sid, ("paused", "completed", "failed", "cancelled"))
        assert row["state"] == "paused", (row["state"], row["state_reason"], worker.log()[-2000:])
        assert row["state_reason"].startswith(f"library offline: {share} is not the directory this session walked")
        assert row["total_images"] == IMAGES
        await assert_no_vanished(clean_db, sid)

        await run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(share)], check=True)
        shutil.copytree(backup, share, dirs_exist_ok=True)  # the same files, sizes and mtimes
        async with grpc.aio.insecure_channel(f"127.0.0.1:{control.port}") as channel:
            await api_grpc.TrainingSessionServiceStub(channel).ResumeSession(api.ResumeSessionRequest(name=name))
        row = await settled(clean_db, sid, ("completed", "failed", "cancelled", "paused"), timeout=90)
        assert row["state"] == "completed", row["state_reason"]
        assert (row["processed_images"], row["failed_images"]) == (IMAGES, 0)
    finally:
        await run(["umount", "-l", str(share)])


async def test_a_missing_selected_folder_pauses_at_start_and_one_deleted_file_only_fails_its_job(
    clean_db: Database, slow_worker: WorkerHandle, library: Path
) -> None:
    for i in range(12):
        write_jpeg(library / "album" / f"a{i:02d}.jpg", 32, 24, seed=i)
    # A selected folder that is not there when the run starts: offline, not "no images".
    sid = await ws.start_session(clean_db, library, [library / "album", library / "gone"])
    row = await settled(clean_db, sid, ("paused", "completed", "failed"))
    assert row["state"] == "paused" and row["resume_state"] == "discovering"
    assert row["state_reason"].startswith(f"library offline: {library / 'gone'} is missing")
    assert row["images_found"] == 0 and not row["total_final"]

    # It comes back (empty folder, say): resume walks everything.
    (library / "gone").mkdir()
    assert await ws.resume(clean_db, sid)

    await ws.pause_once_training(clean_db, sid)
    pending = await ws.pending_paths(clean_db, sid)
    pending[-1].unlink()  # one file deleted by its owner while the library is there: that job only
    assert await ws.resume(clean_db, sid)
    row = await settled(clean_db, sid, ("completed", "failed", "paused"))
    assert row["state"] == "completed", row["state_reason"]
    assert (row["total_images"], row["processed_images"], row["failed_images"]) == (12, 11, 1)
    jobs = {Path(j["path"]): j for j in await ws.jobs(clean_db, sid)}
    assert (jobs[pending[-1]]["state"], jobs[pending[-1]]["error_class"]) == ("failed", "vanished")
