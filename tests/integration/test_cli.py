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
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from PIL import Image
from rich.console import Console
from sqlalchemy import text

from control_service.server import serve
from discovery_worker.worker import run_worker
from imagetraining.cli import main
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc
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
    # Field names as grpcurl and the .proto spell them (#10 item 11), not protobuf's camelCase.
    assert "root_path" in session and "create_time" in session and "rootPath" not in session
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

    # train on a directory without images: no session, what to do instead.
    code, _, err = await cli(control, "train", str(photos / "empty"))
    assert code == 2
    assert f"no images in {photos / 'empty'} or its subdirectories" in err and "--ext" in err
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
    assert lines[0] == f"sessions/1 (library) started over {library} (6 images): DISCOVERING"
    # Streamed live by WatchSession (not polled): every state change is shown, in order.
    assert "progress was polled" not in err
    expected = ["sessions/1: DISCOVERING", "sessions/1: RUNNING", "sessions/1: COMPLETED"]
    # Each state once, in order. DISCOVERING may be over before the watch connects (six images walk
    # in milliseconds): then the first message already says RUNNING, and the line before said
    # DISCOVERING.
    assert [line for line in lines if line in expected] in (expected, expected[1:]), out
    assert "sessions/1: COMPLETED: processed 4, skipped 1, failed 1" in lines
    assert any(line.startswith("sessions/1: skipped exact_duplicate: 1 (e.g. ") for line in lines), out
    assert any(line.startswith("sessions/1: failed ") and "broken.jpg" in line for line in lines), out

    code, out, _ = await cli(control, "jobs", "1", "--state", "failed")
    assert code == 0
    assert "broken.jpg" in out and "FAILED" in out
    jobs = (await cli_json(control, "jobs", "1", "--all"))["jobs"]
    assert isinstance(jobs, list) and len(jobs) == 6
    skipped = [j for j in jobs if j["state"] == "JOB_STATE_SKIPPED"]
    assert len(skipped) == 1 and skipped[0]["skip_reason"] == "exact_duplicate"
    assert skipped[0]["duplicate_of"] == str(library / "2023" / "a.jpg")


# ---- every hint is a call that works (#10 item 8) -------------------------------------------------

HINT_STATES = ["pending", "discovering", "running", "paused", "completed", "cancelled", "failed"]


async def _session_in(database: Database, address: str, root: Path, state: str) -> int:
    """A session over `root/a`, put straight into `state` (no worker runs: it stays there)."""
    code, out, err = await cli(address, "--json", "sessions", "create", str(root), "--subdir", "a")
    assert code == 0, err
    sid = int(json.loads(out)["session"]["name"].split("/")[1])
    async with database.engine.begin() as conn:
        await conn.execute(
            text("UPDATE training_sessions SET state = :state, total_final = :final WHERE id = :id"),
            {"state": state, "final": state in ("running", "completed", "cancelled", "failed"), "id": sid},
        )
    return sid


async def _run_hint(address: str, hint: str, sid: int) -> None:
    """Run the hinted command and check the server accepted it."""
    argv = hint.removeprefix("imagetraining ").replace("SUBDIRECTORY...", "a").split()
    if argv[0] == "watch":
        # A watch of an active session runs until it ends; the server must accept the stream.
        async with grpc.aio.insecure_channel(address) as channel:
            call = api_grpc.TrainingSessionServiceStub(channel).WatchSession(
                api.WatchSessionRequest(name=f"sessions/{sid}")
            )
            first = await asyncio.wait_for(call.read(), 10)
            call.cancel()
        assert first is not grpc.aio.EOF and first.event.kind == pb.EVENT_KIND_SNAPSHOT
        return
    code, out, err = await cli(address, *argv)
    assert code == 0, f"the hint {hint!r} failed: {out}{err}"


@pytest.mark.parametrize("state", HINT_STATES)
async def test_every_cli_hint_works_in_its_state(control: str, photos: Path, clean_db: Database, state: str) -> None:
    """validate, get-and-select, and each transition print a `next:` hint; run it, it must succeed."""
    sid = await _session_in(clean_db, control, photos, state)
    code, out, err = await cli(control, "validate", str(sid))
    hints = re.findall(r"next: (imagetraining [^\n]*?)\s*$", out + err, re.MULTILINE)
    if state in ("pending", "completed", "cancelled", "failed"):
        assert code == 0 and hints, out + err  # startable or restartable: valid, with the next step
    for hint in hints:
        await _run_hint(control, hint.split("  or  ")[-1], sid)

    sid = await _session_in(clean_db, control, photos, state)
    code, out, err = await cli(control, "sessions", "select", str(sid), "b")
    if code == 0:
        hint = re.findall(r"next: (imagetraining [^\n]*?)\s*$", err, re.MULTILINE)
        assert hint, err
        for part in hint[0].split("  or  "):
            await _run_hint(control, part, sid)


@pytest.mark.parametrize(
    ("state", "command"),
    [
        ("pending", ["sessions", "start"]),
        ("discovering", ["sessions", "pause"]),
        ("running", ["sessions", "pause"]),
        ("paused", ["sessions", "resume"]),
        ("completed", ["sessions", "restart"]),
        ("cancelled", ["sessions", "restart"]),
        ("failed", ["sessions", "restart", "--failed-only"]),
        ("discovering", ["sessions", "cancel"]),
    ],
)
async def test_the_hint_after_each_transition_works(
    control: str, photos: Path, clean_db: Database, state: str, command: list[str]
) -> None:
    sid = await _session_in(clean_db, control, photos, state)
    code, out, err = await cli(control, *command[:2], str(sid), *command[2:])
    assert code == 0, out + err
    hints = re.findall(r"next: (imagetraining [^\n]*?)\s*$", err, re.MULTILINE)
    assert len(hints) == 1, err
    await _run_hint(control, hints[0], sid)


CALLS = {
    "StartSession": lambda name: api.StartSessionRequest(name=name),
    "PauseSession": lambda name: api.PauseSessionRequest(name=name),
    "ResumeSession": lambda name: api.ResumeSessionRequest(name=name),
    "CancelSession": lambda name: api.CancelSessionRequest(name=name),
    "RestartSession": lambda name: api.RestartSessionRequest(name=name),
    "DeleteSession": lambda name: api.DeleteSessionRequest(name=name),
    "UpdateSubdirectories": lambda name: api.UpdateSubdirectoriesRequest(
        name=name, selections=[api.SubdirectorySelection(path="b", selected=True)]
    ),
}


@pytest.mark.parametrize("state", HINT_STATES)
async def test_every_refusal_names_a_call_that_works(
    control: str, photos: Path, clean_db: Database, state: str
) -> None:
    """Each FAILED_PRECONDITION for a state names what to do instead: that call succeeds in that state
    (and a call it says to make "first" makes the refused one succeed after it)."""
    async with grpc.aio.insecure_channel(control) as channel:
        stub = api_grpc.TrainingSessionServiceStub(channel)
        for call, build in CALLS.items():
            sid = await _session_in(clean_db, control, photos, state)
            try:
                await getattr(stub, call)(build(f"sessions/{sid}"))
                continue
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (call, state, err.details())
                advice = (err.details() or "").split("; ", 1)[1]
            named = [c for c in re.findall(r"\b([A-Z][a-z]+(?:Session|Subdirectories))\b", advice) if c in CALLS]
            assert named, (call, state, advice)
            chains = re.findall(r"(\w+Session)\b[^,;()]*, then (\w+Session)", advice)
            later = {second for _, second in chains}
            # Each call named as an alternative works now, on a session in the same state...
            for alternative in named:
                if alternative in later:
                    continue
                sid = await _session_in(clean_db, control, photos, state)
                await getattr(stub, alternative)(CALLS[alternative](f"sessions/{sid}"))
                if "first" in advice:
                    # ..."X it first": after X, the refused call works.
                    await getattr(stub, call)(CALLS[call](f"sessions/{sid}"))
            # ..."X, then Y": Y works after X.
            for first, second in chains:
                sid = await _session_in(clean_db, control, photos, state)
                await getattr(stub, first)(CALLS[first](f"sessions/{sid}"))
                await getattr(stub, second)(CALLS[second](f"sessions/{sid}"))


# ---- a flat folder: the root itself is selectable (#10 item 4) ------------------------------------


async def test_train_a_flat_folder(control: str, library: Path, make_settings: Callable[..., Settings]) -> None:
    """14 photos and no subfolder: `train` selects the root itself and trains every one."""
    holiday = library / "holiday"
    for i in range(14):
        images.write_jpeg(holiday / f"IMG_{i:04d}.jpg", 64, 48, seed=100 + i)
    worker = await run_worker(make_settings(pool_size=1, max_sessions_per_worker=1), migrate=False)
    try:
        code, out, err = await cli(control, "train", str(holiday), "--plain")
    finally:
        await worker.stop()
    assert code == 0, out + err
    assert "sessions/1: COMPLETED: processed 14, skipped 0, failed 0" in out.splitlines(), out
    session = (await cli_json(control, "sessions", "get", "1"))["session"]
    assert isinstance(session, dict)
    assert [(s["path"], s.get("selected", False)) for s in session["subdirectories"]] == [(str(holiday), True)]


async def test_the_root_is_offered_counted_and_trained_with_its_subfolders(
    control: str, library: Path, make_settings: Callable[..., Settings]
) -> None:
    """A root with 3 loose photos and a subfolder of 2: CreateSession offers the root itself (it holds
    images), ScanDirectory and ValidateSession count it, and selecting it trains all 5 exactly once,
    also when the subfolder is selected too."""
    for i in range(3):
        images.write_jpeg(library / f"loose{i}.jpg", 40, 30, seed=200 + i)
    for i in range(2):
        images.write_jpeg(library / "sub" / f"in{i}.jpg", 40, 30, seed=300 + i)
    scan = await cli_json(control, "scan", str(library))
    assert int(scan["direct_image_count"]) == 3
    created = (await cli_json(control, "sessions", "create", str(library)))["session"]
    assert isinstance(created, dict)
    offered = [s["path"] for s in created["subdirectories"]]
    assert offered == [str(library), str(library / "sub")]
    code, out, err = await cli(control, "sessions", "select", "1", str(library), "sub")
    assert code == 0, out + err
    validated = await cli_json(control, "validate", "1")
    assert validated["valid"] is True and int(validated["image_count"]) == 5
    worker = await run_worker(make_settings(pool_size=1, max_sessions_per_worker=1), migrate=False)
    try:
        code, out, err = await cli(control, "sessions", "start", "1")
        assert code == 0, err
        code, out, err = await cli(control, "watch", "1", "--plain")
    finally:
        await worker.stop()
    assert code == 0, out + err
    assert "sessions/1: COMPLETED: processed 5, skipped 0, failed 0" in out.splitlines(), out
    session = (await cli_json(control, "sessions", "get", "1"))["session"]
    assert isinstance(session, dict)
    counts = {
        s["path"]: (int(s.get("image_count", 0)), int(s.get("trained_count", 0))) for s in session["subdirectories"]
    }
    assert counts == {str(library): (5, 5), str(library / "sub"): (2, 2)}


async def test_similar_lists_the_nearest_images(
    control: str, clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> None:
    """`imagetraining similar PATH`: a photo's two copies (half size, re-encoded) come first."""
    from tests import worker_support as ws
    from tests.conftest import wait_for
    from tests.images import photo_image

    for seed in range(3):
        image = photo_image(160, 120, seed=seed * 7 + 1)
        (library / "a").mkdir(exist_ok=True)
        image.save(library / "a" / f"p{seed}.jpg", "JPEG", quality=92)
        image.resize((80, 60)).save(library / "a" / f"p{seed}_small.jpg", "JPEG", quality=92)
        image.save(library / "a" / f"p{seed}_q60.jpg", "JPEG", quality=60)
    handle = await run_worker(make_settings(pool_size=1), migrate=False)
    try:
        sid = await ws.start_session(clean_db, library, [library / "a"])

        async def done() -> bool:
            return await ws.state(clean_db, sid) == "completed"

        await wait_for(done, timeout=60, what="the session to complete")
    finally:
        await handle.stop()
    query = str(library / "a" / "p1.jpg")
    document = await cli_json(control, "similar", query, "--session", str(sid), "-k", "2")
    results = document["results"]
    assert isinstance(results, list)
    assert {r["path"] for r in results} == {str(library / "a" / "p1_small.jpg"), str(library / "a" / "p1_q60.jpg")}
    code, out, err = await cli(control, "similar", query, "-k", "2")
    assert code == 0, err
    assert "p1_small.jpg" in out and "p1_q60.jpg" in out and "cosine distance, " in out
    document = await cli_json(control, "similar", query, "-k", "2", "--exact")
    assert document["exact"] is True  # every image, never the approximate index
    assert {r["path"] for r in document["results"]} == {str(library / "a" / f"p1_{n}.jpg") for n in ("small", "q60")}
    code, _out, err = await cli(control, "similar", str(library / "a" / "missing.jpg"))
    assert code == 2 and "is not a trained image" in err
