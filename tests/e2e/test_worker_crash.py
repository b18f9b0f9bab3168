"""Crash safety: kill -9 the worker at seven points across discovery and training, restart it, exact results.

Each run: a worker process with IMAGETRAINING_FAULT_POINT=<point>:<n> SIGKILLs itself at the n-th
pass through that point (discovery_worker.faultpoints.fault_point); a second worker without the fault
takes the session over once the dead one's lease expires. Afterwards: asset rows = image files,
exactly one job per (session, asset), every counter equal to the true count.
"""

from __future__ import annotations

import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagetraining.db.engine import Database
from tests import worker_support as ws
from tests.conftest import wait_for
from tests.images import Library, build_library, write_jpeg

EXTRA_IMAGES = 230  # with batch size 100: three discovery batches of the extra folder alone

FAULTS = [
    "after_claim:1",
    "discovery_batch_before_commit:2",
    "discovery_batch_after_commit:2",
    "before_running_transition:1",
    "training_chunk_before_commit:2",
    "training_chunk_after_commit:2",
    "before_completed_transition:1",
]


@pytest.fixture(scope="module")
def crash_library() -> Iterator[tuple[Path, Library, list[Path]]]:
    """One library for the whole matrix (generated once): build_library plus a folder of small photos."""
    with tempfile.TemporaryDirectory(prefix="imagetraining-crash-", dir=ws.fast_tmp_parent()) as tmp:
        root = Path(tmp).resolve() / "library"
        lib = build_library(root)
        for i in range(EXTRA_IMAGES):
            lib.good.append(write_jpeg(root / "many" / f"m{i // 80}" / f"{i:03d}.jpg", 24, 16, seed=5000 + i))
        tops = sorted({root / p.relative_to(root).parts[0] for p in [*lib.image_files, *lib.non_images]})
        yield root, lib, tops


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
async def test_kill_9_then_restart_completes_exactly(
    clean_db: Database, db_url: str, crash_library: tuple[Path, Library, list[Path]], fault: str, tmp_path: Path
) -> None:
    root, lib, tops = crash_library
    sid = await ws.start_session(clean_db, root, tops)
    env = ws.worker_env(db_url, root, HOME=str(tmp_path), IMAGETRAINING_DATA_DIR=str(tmp_path / "data"))

    doomed = ws.WorkerProcess({**env, "IMAGETRAINING_FAULT_POINT": fault}, tmp_path / "doomed.log")
    try:
        assert await doomed.exited(60) == -signal.SIGKILL, doomed.log()[-3000:]
    finally:
        doomed.kill()
    crashed = await ws.session(clean_db, sid)
    assert crashed["owner_id"] is not None  # died holding the lease: nobody released it
    assert crashed["state"] in ("discovering", "running")

    survivor = ws.WorkerProcess(env, tmp_path / "survivor.log")
    try:

        async def finished() -> dict[str, object] | None:
            row = await ws.session(clean_db, sid)
            return row if row["state"] in ("completed", "failed", "cancelled") else None

        row = await wait_for(finished, timeout=60, what="the session to finish after the crash")
    finally:
        survivor.terminate()
        await survivor.exited(15)
    assert row["state"] == "completed", (row["state_reason"], survivor.log()[-3000:])
    assert ws.counters(row) == ws.true_counts(lib, tops)
    assert row["epoch"] == 2  # the dead worker's claim, then the survivor's
    images = len(lib.image_files)
    assert await ws.scalar(clean_db, "SELECT count(*) FROM image_assets") == images
    assert (
        await ws.scalar(clean_db, "SELECT count(DISTINCT asset_id) FROM training_jobs WHERE session_id = :id", id=sid)
        == images
    )
    jobs = await ws.jobs(clean_db, sid)
    assert len(jobs) == images and {Path(j["path"]) for j in jobs} == set(lib.image_files)
    by_state = {s: sum(1 for j in jobs if j["state"] == s) for s in ("completed", "failed", "skipped", "pending")}
    assert by_state == {
        "completed": row["processed_images"],
        "failed": row["failed_images"],
        "skipped": row["skipped_images"],
        "pending": 0,
    }
    subdirs = await ws.subdirectories(clean_db, sid)
    for top in tops:
        under = [j for j in jobs if top in Path(j["path"]).parents]
        trained = sum(1 for j in under if j["state"] in ("completed", "skipped"))
        assert (subdirs[str(top)]["image_count"], subdirs[str(top)]["trained_count"]) == (len(under), trained)
