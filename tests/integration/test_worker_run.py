"""The worker in-process against real PostgreSQL and real files: discovery, training, end states."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from discovery_worker.claims import Claim
from discovery_worker.worker import WorkerHandle, run_worker
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from tests import worker_support as ws
from tests.conftest import wait_for
from tests.images import build_library, write_corrupt_jpeg, write_empty, write_jpeg, write_text


@pytest.fixture
async def worker(clean_db: Database, make_settings: Callable[..., Settings]) -> AsyncIterator[WorkerHandle]:
    handle = await run_worker(make_settings(pool_size=2, batch_size=100), migrate=False)
    yield handle
    await handle.stop()


async def finished(db: Database, sid: int, timeout: float = 30.0) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        row = await ws.session(db, sid)
        return row if row["state"] in ("completed", "failed", "cancelled") else None

    row: dict[str, Any] = await wait_for(done, timeout=timeout, what=f"session {sid} to finish")
    return row


async def test_library_completes_with_exact_counts(clean_db: Database, worker: WorkerHandle, library: Path) -> None:
    lib = build_library(library)
    tops = sorted({library / p.relative_to(library).parts[0] for p in [*lib.image_files, *lib.non_images]})
    sid = await ws.start_session(clean_db, library, tops)

    row = await finished(clean_db, sid)
    assert row["state"] == "completed", row["state_reason"]
    assert ws.counters(row) == ws.true_counts(lib, tops)
    assert row["total_final"] and row["owner_id"] is None and row["end_time"] is not None
    jobs = {Path(j["path"]): j for j in await ws.jobs(clean_db, sid)}
    assert set(jobs) == set(lib.image_files)
    for path, expected in lib.failures.items():
        assert (jobs[path]["state"], jobs[path]["error_class"]) == ("failed", expected), jobs[path]["error_message"]
    for copy, original in lib.duplicates.items():
        assert jobs[copy]["state"] == "skipped"
        assert jobs[copy]["skip_reason"] == f"duplicate of asset {jobs[original]['asset_id']}"
    for path in lib.good:
        job = jobs[path]
        assert job["state"] == "completed"
        assert job["hash_algorithm"] == "dhash-64" and len(job["perceptual_hash"]) == 16
        assert job["hashed_size_bytes"] == job["size_bytes"] and job["width"] > 0
    subdirs = await ws.subdirectories(clean_db, sid)
    for top in tops:
        under = [p for p in lib.image_files if top in p.parents]
        done = [p for p in under if jobs[p]["state"] in ("completed", "skipped")]
        assert (subdirs[str(top)]["image_count"], subdirs[str(top)]["trained_count"]) == (len(under), len(done))


async def test_zero_images_fails_with_reason(clean_db: Database, worker: WorkerHandle, library: Path) -> None:
    write_text(library / "docs" / "readme.txt")
    write_jpeg(library / "docs" / "photo.gif.bak")
    sid = await ws.start_session(clean_db, library, [library / "docs"])
    row = await finished(clean_db, sid)
    assert row["state"] == "failed"
    assert row["state_reason"] == (
        "Selected subdirectories contain no image files. Supported formats: .jpg, .jpeg, .png, .webp. "
        f"Searched: {library / 'docs'}"
    )
    assert row["owner_id"] is None and row["total_final"] and row["files_seen"] == 2


async def test_all_failed_fails_with_reason(clean_db: Database, worker: WorkerHandle, library: Path) -> None:
    write_corrupt_jpeg(library / "bad" / "a.jpg")
    write_empty(library / "bad" / "b.png")
    write_corrupt_jpeg(library / "bad" / "c.jpeg", seed=3)
    sid = await ws.start_session(clean_db, library, [library / "bad"])
    row = await finished(clean_db, sid)
    assert (row["state"], row["state_reason"]) == ("failed", "all 3 images failed: see ListJobs")
    assert (row["failed_images"], row["processed_images"], row["total_images"]) == (3, 0, 3)


async def test_failed_only_restart_retrains_only_failed_jobs(
    clean_db: Database, worker: WorkerHandle, library: Path
) -> None:
    write_jpeg(library / "mix" / "a.jpg", 40, 30, seed=1)
    write_jpeg(library / "mix" / "b.jpg", 40, 30, seed=2)
    write_corrupt_jpeg(library / "mix" / "c.jpg")
    sid = await ws.start_session(clean_db, library, [library / "mix"])
    row = await finished(clean_db, sid)
    assert (row["state"], row["processed_images"], row["failed_images"]) == ("completed", 2, 1)
    assert await ws.restart_failed_only(clean_db, sid) == 0
    row = await finished(clean_db, sid)
    assert (row["state"], row["processed_images"], row["failed_images"]) == ("completed", 2, 1)
    attempts = {Path(j["path"]).name: j["attempts"] for j in await ws.jobs(clean_db, sid)}
    assert attempts == {"a.jpg": 1, "b.jpg": 1, "c.jpg": 2}


async def test_a_notification_wakes_an_idle_worker_at_once(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> None:
    handle = await run_worker(make_settings(poll_seconds=60.0, pool_size=1), migrate=False)
    try:
        write_jpeg(library / "one" / "a.jpg", 32, 24)

        async def listening() -> bool:
            return bool(
                await ws.scalar(
                    clean_db,
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %imagetraining_sessions%'",
                )
            )

        await wait_for(listening, timeout=10, what="the worker to LISTEN")
        sid = await ws.start_session(clean_db, library, [library / "one"])
        row = await finished(clean_db, sid, timeout=5.0)  # far less than the 60 s poll
        assert row["state"] == "completed"
    finally:
        await handle.stop()


async def test_nested_selected_subdirectories_get_recursive_counts(
    clean_db: Database, worker: WorkerHandle, library: Path
) -> None:
    lib = build_library(library)
    outer, inner = library / "album0", library / "album0" / "sub1"
    sid = await ws.start_session(clean_db, library, [outer, inner])
    row = await finished(clean_db, sid)
    assert row["state"] == "completed"
    subdirs = await ws.subdirectories(clean_db, sid)
    for top in (outer, inner):
        under = [p for p in lib.image_files if top in p.parents]
        assert under and subdirs[str(top)]["image_count"] == len(under)
        assert subdirs[str(top)]["trained_count"] == len(under)  # all good images, no duplicates here
    assert row["total_images"] == len([p for p in lib.image_files if outer in p.parents])


async def test_server_health_and_stream_of_a_session_not_owned(
    clean_db: Database, worker: WorkerHandle, library: Path
) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from imagetraining.v1 import discovery_worker_service_pb2 as wpb
    from imagetraining.v1 import discovery_worker_service_pb2_grpc as wgrpc

    write_jpeg(library / "one" / "a.jpg", 32, 24)
    sid = await ws.start_session(clean_db, library, [library / "one"])
    await finished(clean_db, sid)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service="imagetraining.v1.DiscoveryWorkerService"))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        stream = wgrpc.DiscoveryWorkerServiceStub(channel).StreamSessionEvents(
            wpb.StreamSessionEventsRequest(name=f"sessions/{sid}")
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _event in stream:
                pass
        # Finished: no longer owned here, so the caller is told to look the owner up again.
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "owner" in (err.value.details() or "")
    # The lease row advertised the real port of a server configured with port 0.
    assert worker.worker.address == f"127.0.0.1:{worker.port}"


async def test_observer_sees_committed_progress_and_states(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> None:
    """The seam for the progress streams: every report is a committed row, counters never go backwards."""
    reports: list[tuple[str, dict[str, Any]]] = []
    closed: list[int] = []

    class Recorder:
        def __init__(self, claim: Claim) -> None:
            self.claim = claim

        def progress(self, row: Mapping[str, Any]) -> None:
            reports.append(("progress", dict(row)))

        def state(self, state: str, reason: str, row: Mapping[str, Any]) -> None:
            reports.append((f"state:{state}", dict(row)))

        async def close(self) -> None:
            closed.append(self.claim.session_id)

    for i in range(150):
        write_jpeg(library / "obs" / f"{i:03d}.jpg", 24, 16, seed=i)
    handle = await run_worker(make_settings(pool_size=1, batch_size=100), migrate=False, observe=Recorder)
    try:
        sid = await ws.start_session(clean_db, library, [library / "obs"])
        await finished(clean_db, sid)

        async def closed_once() -> bool:
            return closed == [sid]

        await wait_for(closed_once, timeout=5, what="the observer to be closed")
    finally:
        await handle.stop()
    states = [kind for kind, _row in reports if kind.startswith("state:")]
    assert states == ["state:running", "state:completed"]
    found = [int(r["images_found"]) for k, r in reports if k == "progress"]
    assert found[0] <= 100 and 150 in found  # batches of at most 100, then the rest
    for column in ("images_found", "assets_new", "processed_images"):
        values = [int(r[column]) for _k, r in reports]
        assert values == sorted(values), column
    assert reports[-1][1]["processed_images"] == 150
