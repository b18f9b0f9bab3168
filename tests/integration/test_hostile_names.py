"""File and directory names that are not valid UTF-8 (issue #9, item 3).

Linux names are bytes; PostgreSQL text and protobuf strings are UTF-8. One such name used to fail a
whole session ("worker crashed 5 times": the database refused the string) and made CreateSession
and ScanDirectory answer INTERNAL. Now such a name costs only its own entry: a discovery issue that
shows it escaped; the RPCs list it apart or leave it out, and never answer INTERNAL.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from control_service.server import ControlServer, serve
from discovery_worker.worker import WorkerHandle, run_worker
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc
from tests import worker_support as ws
from tests.conftest import wait_for
from tests.images import write_jpeg

BAD = b"caf\xe9"  # Latin-1 "café": not valid UTF-8


def bad_path(parent: Path, name: bytes) -> bytes:
    return os.fsencode(str(parent)) + b"/" + name


def hostile_library(root: Path) -> None:
    """album/ with 10 good images and one whose name is not UTF-8; BAD/ (a folder) with 3 images."""
    for i in range(10):
        write_jpeg(root / "album" / f"ok{i}.jpg", 32, 24, seed=i)
    good = (root / "album" / "ok0.jpg").read_bytes()
    write_jpeg(root / "album" / "tmp.jpg", 32, 24, seed=100)
    os.rename(os.fsencode(str(root / "album" / "tmp.jpg")), bad_path(root / "album", BAD + b".jpg"))
    folder = bad_path(root, BAD)
    os.mkdir(folder)
    for i in range(3):
        with open(folder + f"/x{i}.jpg".encode(), "wb") as f:
            f.write(good)
    write_jpeg(root / "plain" / "p.jpg", 32, 24, seed=200)


@pytest.fixture
async def control(clean_db: Database, make_settings: Callable[..., Settings]) -> AsyncIterator[ControlServer]:
    server = await serve(make_settings(), database=clean_db)
    yield server
    await server.stop()


@pytest.fixture
async def worker(clean_db: Database, make_settings: Callable[..., Settings]) -> AsyncIterator[WorkerHandle]:
    handle = await run_worker(make_settings(pool_size=1, batch_size=100), migrate=False)
    yield handle
    await handle.stop()


async def test_a_non_utf8_file_name_costs_its_own_entry_not_the_session(
    clean_db: Database, worker: WorkerHandle, library: Path
) -> None:
    hostile_library(library)
    sid = await ws.start_session(clean_db, library, [library / "album"])

    async def finished() -> dict[str, object] | None:
        row = await ws.session(clean_db, sid)
        return row if row["state"] in ("completed", "failed", "cancelled") else None

    row = await wait_for(finished, timeout=30, what="the session to finish")
    assert row["state"] == "completed", row["state_reason"]
    assert (row["total_images"], row["processed_images"], row["failed_images"]) == (10, 10, 0)
    assert row["attempts"] == 1
    assert row["unreadable_paths"] == 1
    issues = await ws.scalar(
        clean_db,
        "SELECT string_agg(path || ' | ' || reason, E'\\n') FROM discovery_issues WHERE session_id = :id",
        id=sid,
    )
    assert f"{library}/album/caf\\xe9.jpg | name is not valid UTF-8" in issues


async def test_a_non_utf8_directory_is_skipped_by_the_walk_and_listed_apart_by_the_rpcs(
    clean_db: Database, control: ControlServer, worker: WorkerHandle, library: Path
) -> None:
    hostile_library(library)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{control.port}") as channel:
        stub = api_grpc.TrainingSessionServiceStub(channel)
        scan = await stub.ScanDirectory(api.ScanDirectoryRequest(path=str(library)))
        assert [d.path for d in scan.subdirectories] == [str(library / "album"), str(library / "plain")]
        assert list(scan.unusable_subdirectories) == [f"{library}/caf\\xe9"]
        # The album's own bad name is not counted as an image.
        assert [d.image_count for d in scan.subdirectories] == [10, 1]

        created = await stub.CreateSession(api.CreateSessionRequest(root_path=str(library)))
        listed = [s.path for s in created.session.subdirectories]
        assert listed == [str(library / "album"), str(library / "plain")]

        # Selecting the escaped form is a clear INVALID_ARGUMENT (no such directory), never INTERNAL.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.UpdateSubdirectories(
                api.UpdateSubdirectoriesRequest(
                    name=created.session.name,
                    selections=[api.SubdirectorySelection(path="caf\\xe9", selected=True)],
                )
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # The whole root, recursively: the bad folder is one discovery issue, everything else trains.
        sid = await ws.start_session(clean_db, library, [library])

        async def finished() -> dict[str, object] | None:
            row = await ws.session(clean_db, sid)
            return row if row["state"] in ("completed", "failed", "cancelled") else None

        row = await wait_for(finished, timeout=30, what="the session to finish")
        assert row["state"] == "completed", row["state_reason"]
        assert (row["total_images"], row["processed_images"]) == (11, 11)
        assert row["unreadable_paths"] == 2
        paths = await ws.scalar(
            clean_db, "SELECT string_agg(path, ',' ORDER BY path) FROM discovery_issues WHERE session_id = :id", id=sid
        )
        assert paths == f"{library}/album/caf\\xe9.jpg,{library}/caf\\xe9"


async def test_a_root_path_that_resolves_to_a_non_utf8_name_is_refused(control: ControlServer, library: Path) -> None:
    os.mkdir(bad_path(library, BAD))
    os.symlink(bad_path(library, BAD), bad_path(library, b"link"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{control.port}") as channel:
        stub = api_grpc.TrainingSessionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateSession(api.CreateSessionRequest(root_path=str(library / "link")))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not valid UTF-8" in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ScanDirectory(api.ScanDirectoryRequest(path=str(library / "link")))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
