"""Helpers of the discovery-worker tests: sessions made the way the control service makes them, row reads.

`start_session` commits what StartSession commits (a session in `discovering` with selected
subdirectories) and sends the same notification, so these tests need no control service; every
transition runs the control service's own statement from `imagetraining.transitions`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import text

from imagetraining import transitions
from imagetraining.db.engine import Database
from imagetraining.notifications import notify
from tests.images import Library


async def start_session(
    db: Database,
    root: Path,
    subdirectories: Sequence[Path],
    *,
    config: dict[str, Any] | None = None,
    name: str = "test",
) -> int:
    """A session in `discovering` over the given selected subdirectories: created pending, then
    started with StartSession's own statement (`transitions.START`) and notification."""
    async with db.engine.begin() as conn:
        sid = int(
            (
                await conn.execute(
                    text(
                        """
                        INSERT INTO training_sessions (display_name, root_path, state, config)
                        VALUES (:name, :root, 'pending', CAST(:config AS jsonb))
                        RETURNING id
                        """
                    ),
                    {"name": name, "root": str(root), "config": json.dumps(config or {})},
                )
            ).scalar_one()
        )
        for path in subdirectories:
            await conn.execute(
                text("INSERT INTO session_subdirectories (session_id, path, selected) VALUES (:id, :path, true)"),
                {"id": sid, "path": str(path)},
            )
    if subdirectories:
        assert await transition(db, sid, transitions.START), "StartSession's statement refused a new session"
    return sid


async def transition(db: Database, sid: int, t: transitions.Transition) -> bool:
    """A client transition with the control service's statement; False when the state did not allow it."""
    async with db.engine.begin() as conn:
        row = (await conn.execute(t.statement, t.params(sid))).first()
        if row is not None:
            for statement in t.also:
                await conn.execute(statement, {"id": sid})
        await notify(conn, sid)
    return row is not None


async def pause(db: Database, sid: int) -> bool:
    return await transition(db, sid, transitions.PAUSE)


async def resume(db: Database, sid: int) -> bool:
    return await transition(db, sid, transitions.RESUME)


async def cancel(db: Database, sid: int) -> bool:
    return await transition(db, sid, transitions.CANCEL)


async def restart_all(db: Database, sid: int) -> bool:
    """RestartSession ALL, with the control service's statement."""
    return await transition(db, sid, transitions.RESTART_ALL)


async def restart_failed_only(db: Database, sid: int) -> int:
    """RestartSession FAILED_ONLY as the control service commits it: one transaction; returns failed_images."""
    t = transitions.RESTART_FAILED
    async with db.engine.begin() as conn:
        await conn.execute(t.statement, t.params(sid))
        row = (await conn.execute(transitions.RETRY_FAILED_JOBS, {"id": sid})).mappings().one()
        await notify(conn, sid)
    return int(row["failed_images"])


async def session(db: Database, sid: int) -> dict[str, Any]:
    async with db.engine.connect() as conn:
        row = (await conn.execute(text("SELECT * FROM training_sessions WHERE id = :id"), {"id": sid})).mappings().one()
    return dict(row)


async def state(db: Database, sid: int) -> str:
    return str((await session(db, sid))["state"])


async def jobs(db: Database, sid: int) -> list[dict[str, Any]]:
    async with db.engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    """
                    SELECT j.*, a.path, a.perceptual_hash, a.hash_algorithm, a.width, a.height, a.format,
                           a.hashed_size_bytes, a.hashed_mtime_ns, a.size_bytes, a.mtime_ns
                      FROM training_jobs j JOIN image_assets a ON a.id = j.asset_id
                     WHERE j.session_id = :id ORDER BY j.id
                    """
                ),
                {"id": sid},
            )
        ).mappings()
        return [dict(r) for r in rows]


async def execute(db: Database, sql: str, **params: Any) -> None:
    """A test's own write, committed (setting up a state no statement of the services produces)."""
    async with db.engine.begin() as conn:
        await conn.execute(text(sql), params)


async def scalar(db: Database, sql: str, **params: Any) -> Any:
    async with db.engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar_one()


async def subdirectories(db: Database, sid: int) -> dict[str, dict[str, Any]]:
    async with db.engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT * FROM session_subdirectories WHERE session_id = :id ORDER BY path"), {"id": sid}
            )
        ).mappings()
        return {str(r["path"]): dict(r) for r in rows}


COUNTER_COLUMNS = (
    "directories_scanned",
    "files_seen",
    "images_found",
    "assets_new",
    "assets_changed",
    "assets_unchanged",
    "unreadable_paths",
    "total_images",
    "processed_images",
    "failed_images",
    "skipped_images",
)


def counters(row: dict[str, Any]) -> dict[str, int]:
    return {c: int(row[c]) for c in COUNTER_COLUMNS}


def fast_tmp_parent() -> str | None:
    """A RAM-backed directory for big generated trees (file creation on some CI disks costs ~1 ms)."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


class WorkerProcess:
    """`python -m discovery_worker` as a real subprocess, its log in a file (read with `log()`)."""

    def __init__(self, env: dict[str, str], log_path: Path, *, prefix: Sequence[str] = ()) -> None:
        self.log_path = log_path
        # The child keeps its own copy of the log's descriptor; ours is closed at once, so no test can
        # leak it (a ResourceWarning, an error under filterwarnings = error).
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "discovery_worker"],
                env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def exited(self, timeout: float) -> int:
        async def gone() -> bool:
            return self.proc.poll() is not None

        from tests.conftest import wait_for

        try:
            await wait_for(gone, timeout=timeout, what="the worker process to exit")
        except AssertionError:
            raise AssertionError(f"worker did not exit; log:\n{self.log()[-3000:]}") from None
        return int(self.proc.returncode)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def worker_env(db_url: str, library: Path, **extra: str) -> dict[str, str]:
    from tests.conftest import subprocess_env

    values = {
        "IMAGETRAINING_WORKER_ADDRESS": "127.0.0.1:0",
        "IMAGETRAINING_POLL_SECONDS": "0.2",
        "IMAGETRAINING_HEARTBEAT_SECONDS": "0.3",
        "IMAGETRAINING_LEASE_SECONDS": "1.5",
        "IMAGETRAINING_POOL_SIZE": "1",
        "IMAGETRAINING_BATCH_SIZE": "100",
        "IMAGETRAINING_GRACE_SECONDS": "1",
        "IMAGETRAINING_DATA_DIR": str(library.parent / "data"),
        "HOME": str(library.parent),
    }
    values.update(extra)
    return subprocess_env(db_url, library, **values)


def without_dac_override(db_url: str, scratch: Path) -> tuple[list[str], str]:
    """A command prefix under which a mode-000 directory is really unreadable, and the URL to use under it.

    Root reads any directory (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so as root the worker runs
    under `setpriv` without those two capabilities: the same interpreter and user, with the
    permission checks of an unprivileged deployment. The embedded PostgreSQL's socket lives in a
    directory only its own user may enter; a hard link to the socket in `scratch` keeps it reachable.
    Not root: nothing to do.
    """
    if os.geteuid() != 0:
        return [], db_url
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        import pytest

        pytest.skip("running as root without setpriv: cannot make a directory unreadable to the worker")
    prefix = [
        setpriv,
        "--inh-caps=-dac_override,-dac_read_search",
        "--bounding-set=-dac_override,-dac_read_search",
        "--",
    ]
    parts = urlsplit(db_url)
    query = dict(parse_qsl(parts.query))
    host = query.get("host", "")
    if host.startswith("/"):
        sockets = scratch / "pgsocket"
        sockets.mkdir(mode=0o755)
        for sock in Path(host).glob(".s.PGSQL.*"):
            if not sock.name.endswith(".lock"):
                os.link(sock, sockets / sock.name)
        query["host"] = str(sockets)
        db_url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
    return prefix, db_url


def true_counts(lib: Library, tops: Sequence[Path]) -> dict[str, int]:
    """The counters a completed first run over `tops` must show, counted with os.walk."""
    dirs = files = 0
    for top in tops:
        for _d, _subdirs, names in os.walk(top):
            dirs += 1
            files += len(names)
    images = len(lib.image_files)
    return {
        "directories_scanned": dirs,
        "files_seen": files,
        "images_found": images,
        "assets_new": images,
        "assets_changed": 0,
        "assets_unchanged": 0,
        "unreadable_paths": 0,
        "total_images": images,
        "processed_images": len(lib.good),
        "failed_images": len(lib.failures),
        "skipped_images": len(lib.duplicates),
    }


async def frozen(worker: WorkerProcess) -> bool:
    """Is the worker process stopped (SIGSTOP, e.g. by an IMAGETRAINING_FAULT_POINT `stop` action)?"""
    import psutil

    return bool(psutil.Process(worker.proc.pid).status() == psutil.STATUS_STOPPED)


async def pause_once_training(db: Database, sid: int) -> None:
    """Wait until the session trains its first image, pause it, wait until its worker lets it go."""
    from tests.conftest import wait_for

    async def training() -> bool:
        row = await session(db, sid)
        return row["state"] == "running" and row["processed_images"] >= 1

    await wait_for(training, timeout=30, what="training to start")
    assert await pause(db, sid)

    async def released() -> bool:
        return (await session(db, sid))["owner_id"] is None

    await wait_for(released, timeout=10, what="the worker to let the paused session go")


async def pending_paths(db: Database, sid: int) -> list[Path]:
    return sorted(Path(j["path"]) for j in await jobs(db, sid) if j["state"] == "pending")


def paced_env(db_url: str, library: Path, scratch: Path, **extra: str) -> dict[str, str]:
    """worker_env with the PacedTrainer (5 ms an image) and home and data directories in `scratch`."""
    return worker_env(
        db_url,
        library,
        HOME=str(scratch),
        IMAGETRAINING_DATA_DIR=str(scratch / "data"),
        IMAGETRAINING_TRAINER="tests.trainers:PacedTrainer",
        **extra,
    )
