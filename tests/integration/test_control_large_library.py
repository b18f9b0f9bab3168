"""StartSession over a 100,000-file library touches no file (proved by taking the files away, not by timing)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from tests.integration.test_control_helpers import running_control

FILES = 100_000
PER_DIRECTORY = 1000


def _populate(big: Path) -> None:
    """100,000 empty .jpg files in 100 directories (fast: no writes, no Python file objects)."""
    for d in range(FILES // PER_DIRECTORY):
        directory = big / f"d{d:03d}"
        directory.mkdir(parents=True)
        for i in range(PER_DIRECTORY):
            os.close(os.open(directory / f"{i}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))


@pytest.fixture
def big_library(tmp_path: Path) -> Iterator[Path]:
    """A library root on tmpfs when there is one (creating 100k files on disk is several times slower)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else str(tmp_path)
    root = Path(tempfile.mkdtemp(prefix="imagetraining-big-", dir=base)).resolve()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_start_session_over_100k_files_touches_no_file(
    clean_db: Database, make_settings: Callable[..., Settings], big_library: Path
) -> None:
    big = big_library / "big"
    await asyncio.to_thread(_populate, big)
    async with running_control(make_settings(library_roots=(big_library,))) as control:
        session = await control.create(big_library, "big")
        # The files are there and a call that does read the disk sees all of them.
        check = await control.stub.ValidateSession(api.ValidateSessionRequest(name=session.name))
        assert check.valid and check.image_count == FILES and not check.truncated

        # Take the whole selection away: a StartSession that walked, listed or even stat-ed the
        # selected directory now meets nothing, yet it must answer DISCOVERING from the database.
        away = big_library / "moved-away"
        big.rename(away)
        try:
            started = (await control.stub.StartSession(api.StartSessionRequest(name=session.name))).session
            assert started.state == pb.SESSION_STATE_DISCOVERING
            assert [(s.path, s.selected) for s in started.subdirectories] == [(str(big), True)]
            # The same moment, a file-reading call does notice: the check above is sensitive.
            after = await control.stub.ValidateSession(api.ValidateSessionRequest(name=session.name))
            assert [p.type for p in after.problems] == ["STATE", "UNREADABLE"]
        finally:
            away.rename(big)
