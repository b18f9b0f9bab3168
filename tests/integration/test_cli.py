"""The `imagetraining` CLI against the real control service (in-process, real gRPC, real PostgreSQL).

The server runs on the test's event loop; the CLI is synchronous, so each `main(argv)` runs in a
worker thread (`asyncio.to_thread`) and the loop keeps serving it. Mostly no discovery worker runs here:
sessions move through the client-driven states (start, pause, resume, cancel, restart, delete),
except in the `train` test, which runs a real worker in-process to take a folder to the end.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from control_service.server import serve
from discovery_worker.worker import run_worker
from imagetraining.cli import main
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from tests import images


@pytest.fixture
async def control(clean_db: Database, make_settings: Callable[..., Settings]) -> AsyncIterator[str]:
    """The control service on 127.0.0.1:<free port>; yields its address."""
    server = await serve(make_settings(), database=clean_db)
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop()


@pytest.fixture
def photos(library: Path) -> Path:
    """library/{a: 2 images, b: 1 image, empty: none}."""
    for rel in ("a/1.jpg", "a/2.jpg", "b/3.jpg"):
        path = library / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (len(rel) * 20, 10, 10)).save(path, "JPEG")
    (library / "empty").mkdir()
    return library


async def cli(address: str, *argv: str) -> tuple[int, str, str]:
    """Run `imagetraining --address ADDRESS ARGV...`; returns (exit code, stdout, stderr)."""

    def run() -> tuple[int, str, str]:
        out = Console(record=True, width=200, file=io.StringIO())
        err = Console(record=True, width=200, file=io.StringIO())
        code = main(["--address", address, "--timeout", "20", *argv], out=out, err=err)
        return code, out.export_text(), err.export_text()

    return await asyncio.to_thread(run)


async def cli_json(address: str, *argv: str) -> dict[str, object]:
    code, out, err = await cli(address, "--json", *argv)
    assert code == 0, err
    document: dict[str, object] = json.loads(out)
    return document


async def test_create_list_get_select_validate(control: str, photos: Path) -> None:
    code, out, err = await cli(control, "sessions", "create", str(photos), "--name", "holiday")
    assert code == 0, err
    assert "sessions/1" in out and "holiday" in out
    assert "0 of 3 selected" in out
    assert "imagetraining sessions select 1" in err  # the next step, as a hint

    code, out, _ = await cli(control, "sessions", "list")
    assert code == 0
    assert "holiday" in out and "PENDING" in out
    code, out, _ = await cli(control, "sessions", "list", "--state", "running")
    assert (code, out.strip()) == (0, "no sessions in state running")

    session = (await cli_json(control, "sessions", "get", "1"))["session"]
    assert isinstance(session, dict)
    assert session["name"] == "sessions/1"
    assert session["state"] == "SESSION_STATE_PENDING"
    assert [Path(s["path"]).name for s in session["subdirectories"]] == ["a", "b", "empty"]

    # Nothing selected: start refuses with the message that says what to do, exit 2.
    code, out, err = await cli(control, "sessions", "start", "sessions/1")
    assert code == 2
    assert err.startswith("error: FAILED_PRECONDITION: No subdirectories selected for session 1")
    assert "precondition SELECTION of sessions/1" in err
    code, out, _ = await cli(control, "validate", "1")
    assert code == 2
    assert "not valid" in out and "SELECTION" in out

    code, out, err = await cli(control, "sessions", "select", "1", "a", str(photos / "b"))
    assert code == 0, err
    assert "2 of 3 selected" in out
    code, out, err = await cli(control, "validate", "1")
    assert code == 0, out + err
    assert "valid: StartSession would succeed" in out
    assert "3 images in 2 of 3 subdirectories selected" in out

    code, out, _ = await cli(control, "sessions", "select", "1", "b", "--unselect")
    assert code == 0 and "1 of 3 selected" in out

    code, out, err = await cli(control, "scan", str(photos))
    assert code == 0, err
    rows = {line.split()[1]: line.split()[3] for line in out.splitlines() if line.startswith("│ ")}
    assert rows == {"a": "2", "b": "1", "empty": "0"}


async def test_state_commands_and_delete(control: str, photos: Path) -> None:
    code, _, err = await cli(control, "sessions", "create", str(photos), "--subdir", "a")
    assert code == 0, err

    code, out, err = await cli(control, "sessions", "start", "1")
    assert code == 0, err
    assert "sessions/1 (library) started: DISCOVERING" in out
    assert "imagetraining watch 1" in err

    # Start again: the message names the call to use instead.
    code, _, err = await cli(control, "sessions", "start", "1")
    assert code == 2 and err.startswith("error: FAILED_PRECONDITION:")
    # Delete is refused while discovering.
    code, _, err = await cli(control, "sessions", "delete", "1")
    assert code == 2 and err.startswith("error: FAILED_PRECONDITION:")

    code, out, err = await cli(control, "sessions", "pause", "1")
    assert code == 0, err
    assert "paused: PAUSED" in out
    code, out, err = await cli(control, "sessions", "resume", "1")
    assert code == 0, err
    assert "resumed: DISCOVERING" in out
    code, out, err = await cli(control, "sessions", "cancel", "1")
    assert code == 0, err
    assert "cancelled: CANCELLED" in out
    code, _, err = await cli(control, "sessions", "cancel", "1")
    assert code == 2 and "FAILED_PRECONDITION" in err

    # A finished session: watch shows the summary at once and exits 1 (not completed).
    code, out, err = await cli(control, "watch", "1", "--plain")
    assert code == 1, out + err
    assert "sessions/1: CANCELLED: processed 0, skipped 0, failed 0" in out

    code, out, err = await cli(control, "jobs", "1")
    assert (code, out.strip()) == (0, "no jobs in sessions/1")
    code, out, _ = await cli(control, "jobs", "1", "--state", "failed")
    assert (code, out.strip()) == (0, "no jobs in state failed in sessions/1")

    code, out, err = await cli(control, "sessions", "restart", "1", "--failed-only")
    assert code == 0, err
    assert "restarted:" in out
    code, _, err = await cli(control, "sessions", "cancel", "1")
    assert code == 0, err

    code, out, err = await cli(control, "sessions", "delete", "1")
    assert (code, out.strip()) == (0, "sessions/1 deleted")
    code, _, err = await cli(control, "sessions", "get", "1")
    assert code == 2 and err.startswith("error: NOT_FOUND:")


async def test_invalid_requests_exit_2_with_details(control: str, photos: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    code, _, err = await cli(control, "sessions", "create", str(outside))
    assert code == 2
    assert err.startswith("error: INVALID_ARGUMENT:")
    assert "invalid root_path:" in err  # the BadRequest field violation

    code, _, err = await cli(control, "sessions", "get", "not-a-session")
    assert code == 2 and err.startswith("error: INVALID_ARGUMENT:")
    code, _, err = await cli(control, "sessions", "get", "999")
    assert code == 2 and err.startswith("error: NOT_FOUND:")

    # train on a directory without subdirectories: no session, a next step instead.
    code, _, err = await cli(control, "train", str(photos / "a"))
    assert code == 2
    assert "has no subdirectories (2 images directly in it)" in err
    assert f"imagetraining sessions create {photos} --subdir a" in err
    code, out, _ = await cli(control, "sessions", "list")
    assert out.strip() == "no sessions"


async def test_unavailable_exits_3(control: str) -> None:
    code, _, err = await cli("127.0.0.1:1", "sessions", "list")
    assert code == 3 and err.startswith("error: UNAVAILABLE:")


async def test_train_runs_a_folder_to_the_end_with_a_worker(
    control: str, library: Path, make_settings: Callable[..., Settings]
) -> None:
    """`imagetraining train` on a folder of photos: create, select all, start, watch, summary; then `jobs`."""
    images.write_jpeg(library / "2023" / "a.jpg", 160, 120, seed=1)
    images.write_png(library / "2023" / "b.png", 160, 120, seed=2)
    images.write_jpeg(library / "2024" / "c.jpg", 160, 120, seed=3)
    images.write_jpeg(library / "2024" / "d.jpg", 160, 120, seed=4)
    images.write_duplicate(library / "2023" / "a.jpg", library / "2024" / "copy-of-a.jpg")
    images.write_corrupt_jpeg(library / "2024" / "broken.jpg")

    worker = await run_worker(make_settings(pool_size=1, max_sessions_per_worker=1), migrate=False)
    try:
        code, out, err = await cli(control, "train", str(library), "--plain", "--ext", "jpg,png")
    finally:
        await worker.stop()
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0] == "sessions/1 (library) started over 2 subdirectories (6 images): DISCOVERING"
    # Streamed live by WatchSession (not polled): every state change is shown, in order.
    assert "progress was polled" not in err
    expected = ["sessions/1: DISCOVERING", "sessions/1: RUNNING", "sessions/1: COMPLETED"]
    assert [line for line in lines if line in expected] == expected, out
    assert "sessions/1: COMPLETED: processed 4, skipped 1, failed 1" in lines
    assert any(line.startswith("sessions/1: skipped duplicate: 1 (e.g. ") for line in lines), out
    assert any(line.startswith("sessions/1: failed ") and "broken.jpg" in line for line in lines), out

    code, out, _ = await cli(control, "jobs", "1", "--state", "failed")
    assert code == 0
    assert "broken.jpg" in out and "FAILED" in out
    jobs = (await cli_json(control, "jobs", "1", "--all"))["jobs"]
    assert isinstance(jobs, list) and len(jobs) == 6
    skipped = [j for j in jobs if j["state"] == "JOB_STATE_SKIPPED"]
    assert len(skipped) == 1 and skipped[0]["skipReason"].startswith("duplicate")
