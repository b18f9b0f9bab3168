"""Pause, resume and cancel reach the worker within two seconds in the walk and in the hashing, and stick."""

from __future__ import annotations

import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from discovery_worker import walker
from discovery_worker.worker import WorkerHandle, run_worker
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from tests import worker_support as ws
from tests.conftest import wait_for
from tests.images import write_jpeg

EMPTY_DIRS, EMPTY_PER_DIR = 100, 100  # 10,000 empty .jpg files: discovery never decodes


@pytest.fixture
def library() -> Iterator[Path]:
    """The library root of these tests: in RAM where possible, since they create 10,000 files."""
    with tempfile.TemporaryDirectory(prefix="imagetraining-lib-", dir=ws.fast_tmp_parent()) as tmp:
        yield Path(tmp).resolve()


@pytest.fixture
async def worker(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> AsyncIterator[WorkerHandle]:
    handle = await run_worker(make_settings(library_roots=(library,), pool_size=2, batch_size=100), migrate=False)
    yield handle
    await handle.stop()


@pytest.fixture
async def slow_worker(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> AsyncIterator[WorkerHandle]:
    """A worker whose trainer takes 0.2 s per image: hashing is reliably under way when the test acts."""
    handle = await run_worker(
        make_settings(library_roots=(library,), pool_size=2, trainer="tests.trainers:SlowTrainer"), migrate=False
    )
    yield handle
    await handle.stop()


def empty_tree(root: Path) -> int:
    for d in range(EMPTY_DIRS):
        folder = root / f"d{d:03d}"
        folder.mkdir(parents=True)
        for f in range(EMPTY_PER_DIR):
            (folder / f"f{f:03d}.jpg").touch()
    return EMPTY_DIRS * EMPTY_PER_DIR


async def released_within(db: Database, sid: int, seconds: float) -> dict[str, object]:
    """Wait until the worker handed the session back; fail if it took longer than `seconds`."""
    t0 = time.monotonic()

    async def released() -> dict[str, object] | None:
        row = await ws.session(db, sid)
        return row if row["owner_id"] is None else None

    row: dict[str, object] = await wait_for(released, timeout=seconds, what=f"session {sid} released")
    assert time.monotonic() - t0 < seconds
    return row


async def worker_made_progress(db: Database, library: Path, name: str) -> None:
    """Proof that time passed for the worker: a small session started after the stop completes."""
    write_jpeg(library / name / "one.jpg", 32, 24, seed=hash(name) % 1000)
    sid = await ws.start_session(db, library, [library / name], name=name)

    async def completed() -> bool:
        return await ws.state(db, sid) == "completed"

    await wait_for(completed, timeout=20, what=f"{name} completed")


async def test_pause_and_resume_during_the_walk(clean_db: Database, worker: WorkerHandle, library: Path) -> None:
    total = empty_tree(library / "big")
    sid = await ws.start_session(clean_db, library, [library / "big"])

    async def walking() -> bool:
        row = await ws.session(clean_db, sid)
        return row["state"] == "discovering" and row["images_found"] > 0

    await wait_for(walking, timeout=20, what="the walk to be under way")
    assert await ws.pause(clean_db, sid)
    paused = await released_within(clean_db, sid, 2.0)
    assert paused["state"] == "paused" and not paused["total_final"]
    assert 0 < int(paused["images_found"]) < total  # type: ignore[call-overload]

    await worker_made_progress(clean_db, library, "small1")
    after = await ws.session(clean_db, sid)
    assert after["state"] == "paused" and ws.counters(after) == ws.counters(paused)  # type: ignore[arg-type]

    # Resume: the walk starts over (idempotent) and the counters end exact, nothing counted twice.
    assert await ws.resume(clean_db, sid)

    async def running() -> dict[str, object] | None:
        row = await ws.session(clean_db, sid)
        return row if row["state"] == "running" else None

    row = await wait_for(running, timeout=60, what="discovery to finish")
    assert (row["images_found"], row["assets_new"], row["assets_unchanged"], row["total_images"]) == (
        total,
        total,
        0,
        total,
    )
    assert row["directories_scanned"] == EMPTY_DIRS + 1 and row["files_seen"] == total
    assert await ws.scalar(clean_db, "SELECT count(*) FROM training_jobs WHERE session_id = :id", id=sid) == total

    # Cancel during the training of 10,000 empty files (each fails fast as 'empty').
    async def training() -> bool:
        return int((await ws.session(clean_db, sid))["failed_images"]) > 0

    await wait_for(training, timeout=20, what="training to be under way")
    assert await ws.cancel(clean_db, sid)
    cancelled = await released_within(clean_db, sid, 2.0)
    assert cancelled["state"] == "cancelled"
    assert int(cancelled["failed_images"]) < total  # type: ignore[call-overload]
    await worker_made_progress(clean_db, library, "small2")
    after = await ws.session(clean_db, sid)
    assert after["state"] == "cancelled" and ws.counters(after) == ws.counters(cancelled)  # type: ignore[arg-type]
    jobs_failed = await ws.scalar(
        clean_db, "SELECT count(*) FROM training_jobs WHERE session_id = :id AND state = 'failed'", id=sid
    )
    assert jobs_failed == after["failed_images"]


async def test_cancel_during_the_walk(clean_db: Database, worker: WorkerHandle, library: Path) -> None:
    empty_tree(library / "big")
    sid = await ws.start_session(clean_db, library, [library / "big"])

    async def walking() -> bool:
        row = await ws.session(clean_db, sid)
        return row["state"] == "discovering" and row["images_found"] > 0

    await wait_for(walking, timeout=20, what="the walk to be under way")
    assert await ws.cancel(clean_db, sid)
    cancelled = await released_within(clean_db, sid, 2.0)
    await worker_made_progress(clean_db, library, "small")
    after = await ws.session(clean_db, sid)
    assert after["state"] == "cancelled" and after["state_reason"] == "cancelled by a client"
    assert ws.counters(after) == ws.counters(cancelled)  # type: ignore[arg-type]


async def test_pause_and_resume_during_hashing_then_restart(
    clean_db: Database, slow_worker: WorkerHandle, library: Path
) -> None:
    count = 24
    for i in range(count):
        write_jpeg(library / "photos" / f"p{i // 10}" / f"img{i:04d}.jpg", 160, 120, seed=i)
    sid = await ws.start_session(clean_db, library, [library / "photos"])

    async def hashing() -> bool:
        row = await ws.session(clean_db, sid)
        return row["state"] == "running" and int(row["processed_images"]) > 0

    await wait_for(hashing, timeout=30, what="hashing to be under way")
    assert await ws.pause(clean_db, sid)
    paused = await released_within(clean_db, sid, 2.0)
    assert paused["state"] == "paused" and paused["resume_state"] == "running"
    assert 0 < int(paused["processed_images"]) < count  # type: ignore[call-overload]
    await worker_made_progress(clean_db, library, "small")
    after = await ws.session(clean_db, sid)
    assert after["state"] == "paused" and ws.counters(after) == ws.counters(paused)  # type: ignore[arg-type]

    # Resume continues with the pending jobs: nothing done twice.
    assert await ws.resume(clean_db, sid)

    async def completed() -> dict[str, object] | None:
        row = await ws.session(clean_db, sid)
        return row if row["state"] == "completed" else None

    row = await wait_for(completed, timeout=60, what="completion after resume")
    assert (row["processed_images"], row["failed_images"], row["skipped_images"]) == (count, 0, 0)
    jobs = await ws.jobs(clean_db, sid)
    assert len(jobs) == count and all(j["attempts"] == 1 and j["state"] == "completed" for j in jobs)

    # Restart ALL of the finished session after touching one file: only that one is decoded again.
    changed = library / "photos" / "p0" / "img0000.jpg"
    write_jpeg(changed, 160, 120, seed=9999)
    assert await ws.restart_all(clean_db, sid)
    row = await wait_for(completed, timeout=60, what="completion after restart")
    assert (row["assets_changed"], row["assets_unchanged"], row["assets_new"]) == (1, count - 1, 0)
    assert (row["processed_images"], row["total_images"]) == (count, count)
    attempts = {j["path"]: j["attempts"] for j in await ws.jobs(clean_db, sid)}
    assert attempts.pop(str(changed)) == 2 and set(attempts.values()) == {1}


async def test_cancel_during_hashing(clean_db: Database, slow_worker: WorkerHandle, library: Path) -> None:
    for i in range(100):
        write_jpeg(library / "photos" / f"img{i:04d}.jpg", 160, 120, seed=i)
    sid = await ws.start_session(clean_db, library, [library / "photos"])

    async def hashing() -> bool:
        row = await ws.session(clean_db, sid)
        return row["state"] == "running" and int(row["processed_images"]) > 0

    await wait_for(hashing, timeout=30, what="hashing to be under way")
    assert await ws.cancel(clean_db, sid)
    cancelled = await released_within(clean_db, sid, 2.0)
    await worker_made_progress(clean_db, library, "small")
    after = await ws.session(clean_db, sid)
    assert after["state"] == "cancelled" and ws.counters(after) == ws.counters(cancelled)  # type: ignore[arg-type]
    assert 0 < int(after["processed_images"]) < 100  # type: ignore[call-overload]


async def test_rescan_retrains_a_file_another_session_saw_change(
    clean_db: Database, worker: WorkerHandle, library: Path
) -> None:
    """The asset row is shared: when session A re-records a changed file, B's rescan sees it unchanged
    against the row but with a hash of the old content, and trains it again (and only it)."""
    count = 12
    for i in range(count):
        write_jpeg(library / "shared" / f"img{i:02d}.jpg", 64, 48, seed=500 + i)
    sid = await ws.start_session(clean_db, library, [library / "shared"], name="b")

    async def completed() -> dict[str, object] | None:
        row = await ws.session(clean_db, sid)
        return row if row["state"] == "completed" else None

    await wait_for(completed, timeout=60, what="first run")
    changed = library / "shared" / "img03.jpg"
    write_jpeg(changed, 80, 60, seed=9999)
    st = changed.stat()
    # What session A's discovery writes for the changed file; A has not hashed it yet.
    async with clean_db.engine.begin() as conn:
        await conn.execute(
            text("UPDATE image_assets SET size_bytes = :s, mtime_ns = :m WHERE path = :p"),
            {"s": st.st_size, "m": st.st_mtime_ns, "p": str(changed)},
        )
    assert await ws.restart_all(clean_db, sid)
    row = await wait_for(completed, timeout=60, what="the rescan")
    assert (row["assets_changed"], row["assets_unchanged"], row["assets_new"]) == (0, count, 0)
    assert (row["processed_images"], row["total_images"]) == (count, count)
    attempts = {j["path"]: j["attempts"] for j in await ws.jobs(clean_db, sid)}
    assert attempts.pop(str(changed)) == 2 and set(attempts.values()) == {1}
    hashed = await ws.scalar(
        clean_db,
        "SELECT (hashed_size_bytes, hashed_mtime_ns) = (size_bytes, mtime_ns) FROM image_assets WHERE path = :p",
        p=str(changed),
    )
    assert hashed is True


async def test_worker_plans_every_batch_statement_afresh(worker: WorkerHandle) -> None:
    """The worker's connections never reuse a generic plan made while the tables were small (engine.py)."""
    async with worker.db.engine.connect() as conn:
        assert (await conn.execute(text("SHOW plan_cache_mode"))).scalar_one() == "force_custom_plan"


async def test_rescan_skips_directories_whose_fingerprint_is_unchanged(
    clean_db: Database, worker: WorkerHandle, library: Path
) -> None:
    """A directory found as this session recorded it costs no per-file database work on a rescan.

    Observed through a row only the per-file path looks at: an asset whose hash is marked stale
    without its file changing is retrained only once the directory's fingerprint no longer matches.
    """
    for d in ("a", "b", "c"):
        for i in range(4):
            write_jpeg(library / "fp" / d / f"img{i}.jpg", 40, 30, seed=ord(d) * 10 + i)
    sid = await ws.start_session(clean_db, library, [library / "fp"], name="fp")

    async def completed() -> dict[str, object] | None:
        row = await ws.session(clean_db, sid)
        return row if row["state"] == "completed" else None

    await wait_for(completed, timeout=60, what="first run")
    directories = {str(library / "fp" / d) for d in ("a", "b", "c")}
    stored = await ws.scalar(
        clean_db, "SELECT array_agg(path ORDER BY path) FROM directory_fingerprints WHERE session_id = :id", id=sid
    )
    assert set(stored) == directories
    marked = str(library / "fp" / "a" / "img0.jpg")
    async with clean_db.engine.begin() as conn:
        await conn.execute(text("UPDATE image_assets SET hashed_size_bytes = 1 WHERE path = :p"), {"p": marked})

    assert await ws.restart_all(clean_db, sid)
    row = await wait_for(completed, timeout=60, what="a rescan of unchanged directories")
    assert (row["assets_unchanged"], row["assets_new"], row["assets_changed"]) == (12, 0, 0)
    attempts = {j["path"]: j["attempts"] for j in await ws.jobs(clean_db, sid)}
    assert set(attempts.values()) == {1}  # directory a was skipped: its stale row was not looked at

    async with clean_db.engine.begin() as conn:
        await conn.execute(
            text("UPDATE directory_fingerprints SET digest = 'x' WHERE session_id = :id AND path = :p"),
            {"id": sid, "p": str(library / "fp" / "a")},
        )
    assert await ws.restart_all(clean_db, sid)
    row = await wait_for(completed, timeout=60, what="a rescan of directory a")
    assert (row["assets_unchanged"], row["assets_new"], row["assets_changed"]) == (12, 0, 0)
    attempts = {j["path"]: j["attempts"] for j in await ws.jobs(clean_db, sid)}
    assert attempts.pop(marked) == 2 and set(attempts.values()) == {1}
    digest = await ws.scalar(
        clean_db,
        "SELECT digest FROM directory_fingerprints WHERE session_id = :id AND path = :p",
        id=sid,
        p=str(library / "fp" / "a"),
    )
    assert digest != "x"


async def test_a_directory_too_large_to_hold_is_recorded_without_a_fingerprint(
    clean_db: Database, worker: WorkerHandle, library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_HELD images a directory streams as it comes (bounded memory) and is never skipped."""
    monkeypatch.setattr(walker, "MAX_HELD", 5)
    for i in range(12):
        write_jpeg(library / "big" / f"img{i:02d}.jpg", 24, 16, seed=700 + i)
    write_jpeg(library / "big" / "small" / "one.jpg", 24, 16, seed=799)
    sid = await ws.start_session(clean_db, library, [library / "big"], name="big")

    async def completed() -> dict[str, object] | None:
        row = await ws.session(clean_db, sid)
        return row if row["state"] == "completed" else None

    row = await wait_for(completed, timeout=60, what="first run")
    assert (row["images_found"], row["assets_new"], row["total_images"], row["processed_images"]) == (13, 13, 13, 13)
    stored = await ws.scalar(
        clean_db, "SELECT array_agg(path) FROM directory_fingerprints WHERE session_id = :id", id=sid
    )
    assert stored == [str(library / "big" / "small")]
    assert await ws.restart_all(clean_db, sid)
    row = await wait_for(completed, timeout=60, what="the rescan")
    assert (row["images_found"], row["assets_unchanged"], row["assets_new"], row["total_images"]) == (13, 13, 0, 13)
