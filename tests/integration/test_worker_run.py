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
        assert jobs[copy]["skip_reason"] == "exact_duplicate"
        assert jobs[copy]["duplicate_of_asset_id"] == jobs[original]["asset_id"]
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


async def test_thumbnails_are_near_duplicates_and_trained_exact_copies_are_skipped(
    clean_db: Database, worker: WorkerHandle, library: Path
) -> None:
    """#10 item 3: a 12 MP-like original and its 256 px and 640 px copies (found first: "a/" sorts
    before "z/") were skipped as "duplicates" of the thumbnail. Now all three are trained, each
    copy reported as a near duplicate of the first with the distance; only a byte-identical copy is
    skipped, as `exact_duplicate` of the kept file, via ListJobs' paths."""
    from PIL import Image

    from tests.images import photo_image

    original = library / "z" / "original.jpg"
    photo_image(1600, 1200, seed=42).save(_mk(original), "JPEG", quality=92)
    with Image.open(original) as im:
        for size, rel in ((256, "a/thumb256.jpg"), (640, "a/thumb640.jpg")):
            small = im.copy()
            small.thumbnail((size, size))
            small.save(_mk(library / rel), "JPEG", quality=80)
    copy = library / "z" / "zz-copy-of-original.jpg"  # found after the original: the original is kept
    copy.write_bytes(original.read_bytes())
    sid = await ws.start_session(clean_db, library, [library / "a", library / "z"])
    row = await finished(clean_db, sid)
    assert row["state"] == "completed", row["state_reason"]
    assert (row["processed_images"], row["skipped_images"], row["failed_images"]) == (3, 1, 0)
    jobs = {Path(j["path"]).name: j for j in await ws.jobs(clean_db, sid)}
    assert {n: j["state"] for n, j in jobs.items()} == {
        "thumb256.jpg": "completed",
        "thumb640.jpg": "completed",
        "original.jpg": "completed",
        "zz-copy-of-original.jpg": "skipped",
    }
    assert jobs["zz-copy-of-original.jpg"]["skip_reason"] == "exact_duplicate"
    assert jobs["zz-copy-of-original.jpg"]["duplicate_of_asset_id"] == jobs["original.jpg"]["asset_id"]
    # The thumbnails and the original look alike: each later one names an earlier one and the distance.
    first = jobs["thumb256.jpg"]
    assert first["near_duplicate_of_asset_id"] is None
    for name in ("thumb640.jpg", "original.jpg"):
        assert jobs[name]["near_duplicate_of_asset_id"] in (first["asset_id"], jobs["thumb640.jpg"]["asset_id"])
        assert 0 <= jobs[name]["near_duplicate_distance"] <= 4

    # ListJobs says which is which, with paths.
    from control_service.sessions import SessionUseCases

    listed, _token = await SessionUseCases(clean_db, worker.settings).list_jobs(sid, 100, "", None)
    by_name = {Path(j.path).name: j for j in listed}
    assert by_name["zz-copy-of-original.jpg"].skip_reason == "exact_duplicate"
    assert by_name["zz-copy-of-original.jpg"].duplicate_of == str(original)
    assert by_name["original.jpg"].near_duplicate_of.startswith(str(library / "a" / "thumb"))
    assert by_name["thumb256.jpg"].near_duplicate_of == ""


@pytest.mark.parametrize("original_first", [False, True])
async def test_skip_near_duplicates_keeps_the_biggest_whatever_the_order(
    clean_db: Database, worker: WorkerHandle, library: Path, original_first: bool
) -> None:
    """With skip_near_duplicates, the 1600x1200 original is the one trained, whether the walk finds
    it before or after its 256 and 640 px copies; the copies are skipped `near_duplicate` of it."""
    from PIL import Image

    from tests.images import photo_image

    first, last = ("a", "z") if original_first else ("z", "a")
    original = library / first / "original.jpg"
    photo_image(1600, 1200, seed=42).save(_mk(original), "JPEG", quality=92)
    with Image.open(original) as im:
        for size in (256, 640):
            small = im.copy()
            small.thumbnail((size, size))
            small.save(_mk(library / last / f"thumb{size}.jpg"), "JPEG", quality=80)
    # Unrelated images between them: the original is decided in a later chunk than the thumbnails
    # (chunks hold at least 4 images), so a thumbnail already completed gives way in the database.
    for i in range(12):
        write_jpeg(library / "m" / f"other{i:02d}.jpg", 48, 36, seed=500 + i)
    sid = await ws.start_session(
        clean_db, library, [library / "a", library / "m", library / "z"], config={"skip_near_duplicates": True}
    )
    row = await finished(clean_db, sid)
    assert row["state"] == "completed", row["state_reason"]
    jobs = {Path(j["path"]).name: j for j in await ws.jobs(clean_db, sid)}
    summary = {
        n: (j["state"], j["skip_reason"], j["near_duplicate_of_asset_id"], j["asset_id"]) for n, j in jobs.items()
    }
    assert (row["processed_images"], row["skipped_images"], row["failed_images"]) == (13, 2, 0), summary
    assert jobs["original.jpg"]["state"] == "completed"
    for name in ("thumb256.jpg", "thumb640.jpg"):
        assert (jobs[name]["state"], jobs[name]["skip_reason"]) == ("skipped", "near_duplicate")
        assert jobs[name]["near_duplicate_of_asset_id"] == jobs["original.jpg"]["asset_id"]


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


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
    from imagetraining.v1 import resources_pb2 as pb

    write_jpeg(library / "one" / "a.jpg", 32, 24)
    sid = await ws.start_session(clean_db, library, [library / "one"])
    await finished(clean_db, sid)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service="imagetraining.v1.DiscoveryWorkerService"))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        refusals: list[grpc.aio.AioRpcError] = []

        async def refused() -> bool:
            """Finished: once the runner lets the session go (just after it commits the end), the
            caller is told to look the owner up again. Before that, the stream may still end with the
            terminal state and OK: also correct, so try again (the race that made this test flaky)."""
            stream = wgrpc.DiscoveryWorkerServiceStub(channel).StreamSessionEvents(
                wpb.StreamSessionEventsRequest(name=f"sessions/{sid}")
            )
            try:
                events = [r.event async for r in stream]
            except grpc.aio.AioRpcError as err:
                refusals.append(err)
                return True
            assert events and events[-1].state == pb.SESSION_STATE_COMPLETED, events
            return False

        await wait_for(refused, timeout=10, what="the worker to let the finished session go")
        assert refusals[-1].code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "owner" in (refusals[-1].details() or "")
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

        def acknowledge(self, event_sequence: int) -> None:
            pass

        def sequence_seen(self, value: int) -> None:
            pass

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
