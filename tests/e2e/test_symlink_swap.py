"""Files swapped for symlinks after discovery are never read outside the library roots (issue #9, item 4).

The session is paused after discovery; pending images are replaced by symlinks to files outside every
root (an image and a text file, as /etc/passwd was in the report), and a folder on their way by a
symlink to an outside folder of images with the same names; then the session resumes. The kernel
(inotify) is the witness that nothing outside was opened; the jobs fail as `unreadable`, and no
outside file's size or hash is stored.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from discovery_worker.worker import WorkerHandle
from imagetraining.db.engine import Database
from tests import worker_support as ws
from tests.conftest import wait_for
from tests.images import write_jpeg
from tests.inotify import IN_ACCESS, IN_OPEN, Watch


async def test_swapped_files_and_folders_fail_as_unreadable_and_nothing_outside_is_opened(
    clean_db: Database, slow_worker: WorkerHandle, library: Path, tmp_path: Path
) -> None:
    for i in range(30):
        write_jpeg(library / "album" / f"a{i:02d}.jpg", 32, 24, seed=i)
    for i in range(5):
        write_jpeg(library / "album" / "deep" / f"d{i}.jpg", 32, 24, seed=100 + i)
    write_jpeg(library / "elsewhere" / "x.jpg", 32, 24, seed=300)
    (library / "album" / "zlink.jpg").symlink_to(library / "elsewhere" / "x.jpg")
    outside = tmp_path / "outside"
    secret_image = write_jpeg(outside / "secret.jpg", 64, 48, seed=999)
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    for i in range(5):
        write_jpeg(outside / "deep" / f"d{i}.jpg", 80, 60, seed=500 + i)
    sid = await ws.start_session(clean_db, library, [library / "album"])

    await ws.pause_once_training(clean_db, sid)
    pending = await ws.pending_paths(clean_db, sid)
    flat = [p for p in pending if p.parent == library / "album"]
    assert len(flat) >= 10 and all(Path(p).name.startswith("d") for p in pending if p not in flat)
    flat = [p for p in flat if p.name != "zlink.jpg"]
    to_image, to_text = flat[-2], flat[-1]
    for victim, target in ((to_image, secret_image), (to_text, outside / "passwd")):
        victim.unlink()
        victim.symlink_to(target)
    shutil.rmtree(library / "album" / "deep")
    (library / "album" / "deep").symlink_to(outside / "deep", target_is_directory=True)

    watch = Watch([outside, outside / "deep", secret_image, outside / "passwd"], IN_OPEN | IN_ACCESS)
    try:
        assert await ws.resume(clean_db, sid)

        async def finished() -> dict[str, Any] | None:
            row = await ws.session(clean_db, sid)
            return row if row["state"] in ("completed", "failed", "cancelled") else None

        row = await wait_for(finished, timeout=60, what="the session to finish")
        # The kernel queues an event during the open call itself, before the worker could record anything.
        opened = watch.events()
    finally:
        watch.close()
    assert opened == [], f"files outside the roots were opened: {opened}"
    assert row["state"] == "completed", row["state_reason"]
    jobs = {Path(j["path"]): j for j in await ws.jobs(clean_db, sid)}
    swapped = [to_image, to_text, *(library / "album" / "deep" / f"d{i}.jpg" for i in range(5))]
    for path in swapped:
        job = jobs[path]
        assert (job["state"], job["error_class"]) == ("failed", "unreadable"), (path, job["error_message"])
        assert "outside the library roots" in job["error_message"], job["error_message"]
        assert job["perceptual_hash"] is None and job["width"] is None, path
    assert row["failed_images"] == len(swapped)
    assert row["processed_images"] == 36 - len(swapped)
    # A symlink that stays inside the roots is opened (through its resolved path) and trained.
    assert jobs[library / "album" / "zlink.jpg"]["state"] == "completed"
