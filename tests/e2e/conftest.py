"""Fixtures of the end-to-end tests (real processes)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """IMAGETRAINING_DATA_DIR outside pytest's tmp_path.

    As root, pgserver runs PostgreSQL as an unprivileged user and opens up the path to its data,
    but every pytest start resets pytest's temporary root to mode 0700, which would lock a running
    server out of its data directory (conftest's embedded server avoids tmp_path for this too).
    """
    with tempfile.TemporaryDirectory(prefix="imagetraining-devrun-") as tmp:
        yield Path(tmp) / "data"
