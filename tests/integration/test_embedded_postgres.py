"""The embedded PostgreSQL is shared by processes using one data directory, and stops with the last.

`make run` relies on this: the control service and the worker each call `start_embedded` on the
same IMAGETRAINING_DATA_DIR and must land on one server (one database, one work queue), and
Ctrl-C must not leave a postmaster behind. Two real Python processes, a real server.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import PYTHON, ROOT, wait_for

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("IMAGETRAINING_TEST_DATABASE_URL")),
    reason="embedded-server test: runs in the embedded pass only",
)

# Joins the server, answers a query per stdin line, exits (releasing its handle) at EOF.
CHILD = """
import asyncio, json, sys
from pathlib import Path
import asyncpg
from imagetraining.db.engine import start_embedded

uri = start_embedded(Path(sys.argv[1]))

async def query() -> list:
    conn = await asyncpg.connect(uri)
    try:
        row = await conn.fetchrow("SELECT current_setting('data_directory'), pg_backend_pid(), 41 + 1")
        return list(row)
    finally:
        await conn.close()

print(json.dumps({"uri": uri, "row": asyncio.run(query())}), flush=True)
for line in sys.stdin:
    print(json.dumps({"uri": uri, "row": asyncio.run(query())}), flush=True)
"""


class Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, data_dir: Path) -> Child:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            "-c",
            CHILD,
            str(data_dir),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        return cls(proc)

    async def answer(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 120)
        if not line:
            assert self.proc.stderr is not None
            err = await self.proc.stderr.read()
            raise AssertionError(f"child exited: {err.decode(errors='replace')[-2000:]}")
        answer: dict[str, object] = json.loads(line)
        return answer

    async def ask(self) -> dict[str, object]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"query\n")
        await self.proc.stdin.drain()
        return await self.answer()

    async def exit(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return await asyncio.wait_for(self.proc.wait(), 60)


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


@pytest.fixture
def pg_parent() -> Iterator[Path]:
    """A directory outside pytest's tmp_path for the server's data.

    As root, pgserver runs PostgreSQL as an unprivileged user and opens up the path to the data
    directory, but every pytest start resets its own temporary root to mode 0700, which would lock
    a running server out of its data (as conftest's embedded server also avoids).
    """
    with tempfile.TemporaryDirectory(prefix="imagetraining-pg-") as tmp:
        yield Path(tmp)


async def test_two_processes_share_one_server_that_stops_after_both(pg_parent: Path) -> None:
    data_dir = pg_parent / "pgdata"
    first = await Child.start(data_dir)
    a = await first.answer()  # first one in runs initdb and starts the server
    second = await Child.start(data_dir)
    b = await second.answer()
    try:
        assert a["uri"] == b["uri"]
        assert a["row"][0] == b["row"][0] == str(data_dir.resolve())  # type: ignore[index]
        assert a["row"][2] == b["row"][2] == 42  # type: ignore[index]
        pid = postmaster_pid(data_dir)
        assert psutil.pid_exists(pid)

        # The first leaves; the server stays for the second.
        assert await first.exit() == 0
        again = await second.ask()
        assert again["uri"] == b["uri"]
        assert postmaster_pid(data_dir) == pid

        # The last one leaves: the server stops.
        assert await second.exit() == 0

        async def gone() -> bool:
            return not psutil.pid_exists(pid) and not (data_dir / "postmaster.pid").exists()

        await wait_for(gone, timeout=30, what="the embedded server to stop after its last process")
    finally:
        for child in (first, second):
            if child.proc.returncode is None:
                child.proc.kill()
                await child.proc.wait()
