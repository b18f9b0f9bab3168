"""`python -m discovery_worker` as a real process over a real library: end to end, SIGTERM, bad settings."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagetraining.db.engine import Database
from tests import worker_support as ws
from tests.conftest import subprocess_env, wait_for
from tests.images import Library, build_library, write_jpeg


@pytest.fixture
def open_library() -> Iterator[Path]:
    """A library root in a directory of its own (scratch files, socket links and logs live beside it)."""
    with tempfile.TemporaryDirectory(prefix="imagetraining-e2e-") as tmp:
        os.chmod(tmp, 0o755)
        root = Path(tmp) / "library"
        root.mkdir(mode=0o755)
        yield root.resolve()


def hostile_library(root: Path) -> tuple[Library, list[Path], dict[str, int]]:
    """build_library plus an unreadable folder, two kinds of symlink loop and a link out of the root.

    Returns the library, the top folders to select, and the true walk counts.
    """
    lib = build_library(root)
    # Inside a selected folder: one unreadable directory of the library (a selected folder that is
    # unreadable is the library being offline: tests/e2e/test_library_offline.py).
    locked = root / "album0" / "locked"
    write_jpeg(locked / "hidden.jpg", 32, 24, seed=7)
    os.chmod(locked, 0o000)
    # A loop back to an ancestor (walked once, silently) and a link to itself (ELOOP: recorded).
    (root / "album0" / "sub1").mkdir(parents=True, exist_ok=True)
    (root / "album0" / "sub1" / "up").symlink_to(root / "album0", target_is_directory=True)
    (root / "album1" / "self").symlink_to(root / "album1" / "self")
    outside = root.parent / "outside"
    write_jpeg(outside / "secret.jpg", 32, 24, seed=8)
    (root / "album2" / "escape").symlink_to(outside, target_is_directory=True)
    tops = sorted({root / p.relative_to(root).parts[0] for p in [*lib.image_files, *lib.non_images]})
    dirs = files = 0
    for top in tops:
        for _d, subdirs, names in os.walk(top):  # os.walk does not follow symlinks: the true tree
            if Path(_d) == locked.parent:
                subdirs.remove(locked.name)  # the worker cannot list it
            dirs += 1
            files += sum(1 for n in names if not os.path.islink(os.path.join(_d, n)))
    return lib, tops, {"directories_scanned": dirs, "files_seen": files, "unreadable_paths": 3}


async def finished(db: Database, sid: int, timeout: float) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        row = await ws.session(db, sid)
        return row if row["state"] in ("completed", "failed", "cancelled") else None

    row: dict[str, Any] = await wait_for(done, timeout=timeout, what=f"session {sid} to finish")
    return row


async def test_worker_process_trains_a_hostile_library(clean_db: Database, db_url: str, open_library: Path) -> None:
    lib, tops, walk_counts = hostile_library(open_library)
    sid = await ws.start_session(clean_db, open_library, tops)
    prefix, url = ws.without_dac_override(db_url, open_library.parent)
    worker = ws.WorkerProcess(ws.worker_env(url, open_library), open_library.parent / "worker.log", prefix=prefix)
    try:
        # The phases in order: discovering (as started) -> running -> completed.
        seen: list[str] = []

        async def completed() -> dict[str, Any] | None:
            row = await ws.session(clean_db, sid)
            if not seen or seen[-1] != row["state"]:
                seen.append(row["state"])
            return row if row["state"] in ("completed", "failed") else None

        row = await wait_for(completed, timeout=60, interval=0.005, what="completion")
        assert row["state"] == "completed", (row["state_reason"], worker.log()[-2000:])
        assert seen[0] == "discovering" and seen[-1] == "completed"
        assert set(seen) <= {"discovering", "running", "completed"}
        images = len(lib.image_files)
        assert ws.counters(row) == {
            **walk_counts,
            "images_found": images,
            "assets_new": images,
            "assets_changed": 0,
            "assets_unchanged": 0,
            "total_images": images,
            "processed_images": len(lib.good),
            "failed_images": len(lib.failures),
            "skipped_images": len(lib.duplicates),
        }
        issues = await ws.scalar(
            clean_db,
            "SELECT string_agg(path || ': ' || reason, E'\\n' ORDER BY path)"
            " FROM discovery_issues WHERE session_id = :id",
            id=sid,
        )
        assert f"{open_library / 'album0' / 'locked'}: Permission denied" in issues
        assert f"{open_library / 'album1' / 'self'}: broken symlink or symlink loop" in issues
        assert f"{open_library / 'album2' / 'escape'}: symlink points outside the library roots" in issues
        paths = {Path(j["path"]) for j in await ws.jobs(clean_db, sid)}
        assert paths == set(lib.image_files)
        log = worker.log()
        assert f"session {sid}: claimed" in log and f"session {sid}: completed" in log
        assert "-> running" in log
    finally:
        worker.terminate()
        assert await worker.exited(15) == 0
        os.chmod(open_library / "album0" / "locked", 0o755)


async def test_sigterm_hands_the_session_back(clean_db: Database, db_url: str, open_library: Path) -> None:
    count = 20
    for i in range(count):
        write_jpeg(open_library / "photos" / f"{i:03d}.jpg", 96, 64, seed=i)
    sid = await ws.start_session(clean_db, open_library, [open_library / "photos"])
    env = ws.worker_env(
        db_url,
        open_library,
        IMAGETRAINING_LEASE_SECONDS="30",
        IMAGETRAINING_HEARTBEAT_SECONDS="1",
        IMAGETRAINING_POOL_SIZE="2",
        IMAGETRAINING_TRAINER="tests.trainers:SlowTrainer",  # 0.2 s per image: SIGTERM lands mid-training
    )
    first = ws.WorkerProcess(env, open_library.parent / "first.log")
    try:

        async def training() -> bool:
            row = await ws.session(clean_db, sid)
            return row["state"] == "running" and int(row["processed_images"]) > 0

        await wait_for(training, timeout=30, what="training to be under way")
        first.terminate()
        assert await first.exited(10) == 0
    finally:
        first.kill()
    row = await ws.session(clean_db, sid)
    # Handed back: no 30 s wait for the lease; the state was not touched.
    assert (row["state"], row["owner_id"], row["lease_expires_at"]) == ("running", None, None)
    assert row["attempts"] == 0  # a graceful hand-back is not a crash
    assert row["processed_images"] < count
    second = ws.WorkerProcess(env, open_library.parent / "second.log")
    try:
        row = await finished(clean_db, sid, 60)
    finally:
        second.terminate()
        await second.exited(10)
    assert (row["state"], row["processed_images"], row["total_images"]) == ("completed", count, count)
    jobs = await ws.jobs(clean_db, sid)
    assert {j["attempts"] for j in jobs} == {1}


def test_a_bad_setting_is_one_line_and_exit_2(db_url: str, library: Path) -> None:
    env = subprocess_env(db_url, library, IMAGETRAINING_LEASE_SECONDS="2", IMAGETRAINING_HEARTBEAT_SECONDS="5")
    done = subprocess.run(
        [sys.executable, "-m", "discovery_worker"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "imagetraining: IMAGETRAINING_HEARTBEAT_SECONDS: must be shorter than IMAGETRAINING_LEASE_SECONDS (2.0)"
    ]
