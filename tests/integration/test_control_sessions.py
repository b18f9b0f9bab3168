"""Control service over real gRPC and PostgreSQL: create, read, list, update, delete, scan, validate."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from tests.integration.test_control_helpers import Control, details, make_tree, running_control, session_id, set_state

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
async def control(clean_db: Database, make_settings: Callable[..., Settings]) -> AsyncIterator[Control]:
    async with running_control(make_settings()) as c:
        yield c


async def _fails(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    return info.value


# ---- CreateSession ---------------------------------------------------------------------------------


async def test_create_selects_the_given_subdirectories(control: Control, library: Path) -> None:
    make_tree(library, {"a/1.jpg": "x", "b/": "", "c/": ""})
    session = await control.create(library, "a", library / "b")
    assert session.name == "sessions/1"
    assert session.state == pb.SESSION_STATE_PENDING
    assert session.display_name == "library"
    assert session.root_path == str(library)
    assert [(s.path, s.selected) for s in session.subdirectories] == [
        (str(library / "a"), True),
        (str(library / "b"), True),
    ]
    assert list(session.config.extensions) == ["jpg", "jpeg", "png", "webp"]
    assert session.config.HasField("recursive") and session.config.recursive
    assert session.progress.indeterminate and not session.progress.HasField("percentage")
    assert session.HasField("create_time") and not session.HasField("start_time")
    got = (await control.stub.GetSession(api.GetSessionRequest(name=session.name))).session
    assert got == session


async def test_create_without_subdirectories_adds_the_immediate_ones_unselected(
    control: Control, library: Path
) -> None:
    make_tree(library, {"b/x/": "", "a/": "", "c/1.jpg": "x", "top.jpg": "x"})
    session = await control.create(library, display_name="holiday")
    assert session.display_name == "holiday"
    # The root holds an image directly (top.jpg): it is offered first, so a flat folder can be trained.
    assert [(s.path, s.selected) for s in session.subdirectories] == [
        (str(library), False),
        *((str(library / n), False) for n in ("a", "b", "c")),
    ]
    (library / "top.jpg").unlink()
    session = await control.create(library, display_name="no loose images")
    assert [s.path for s in session.subdirectories] == [str(library / n) for n in ("a", "b", "c")]


async def test_create_validates_display_name_and_config(control: Control, library: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"display_name": "x" * 201}, "display_name"),
        ({"config": pb.SessionConfig(extensions=["exe"])}, "config.extensions"),
        ({"config": pb.SessionConfig(batch_size=50)}, "config.batch_size"),
        ({"config": pb.SessionConfig(batch_size=10_001)}, "config.batch_size"),
        ({"config": pb.SessionConfig(near_duplicate_distance=9)}, "config.near_duplicate_distance"),
        ({"config": pb.SessionConfig(near_duplicate_distance=-1)}, "config.near_duplicate_distance"),
        ({"request_id": "r" * 129}, "request_id"),
    ]
    for fields, field in cases:
        err = await _fails(control.create(library, **fields), INVALID)
        assert details(err).fields == [field]
    session = await control.create(
        library, config=pb.SessionConfig(extensions=[".PNG", "jpg", "png"], recursive=False, batch_size=100)
    )
    assert list(session.config.extensions) == ["png", "jpg"]
    assert session.config.recursive is False and session.config.batch_size == 100
    assert session.config.near_duplicate_distance == 4  # the default, stated
    session = await control.create(library, config=pb.SessionConfig(near_duplicate_distance=0))
    assert session.config.HasField("near_duplicate_distance") and session.config.near_duplicate_distance == 0


@pytest.mark.parametrize(
    ("make_path", "description"),
    [
        (lambda lib: "library", "must be an absolute path"),
        (lambda lib: f"{lib}/../library", "must not contain '..'"),
        (lambda lib: f"{lib}/a\x00b", "contains a NUL byte"),
        (lambda lib: f"{lib}/a\nb", "contains a control character"),
        (lambda lib: f"{lib}/" + "/".join(["d" * 200] * 21), "is longer than 4096 bytes"),
        (lambda lib: "", "required"),
        (lambda lib: f"{lib}/missing", "is not an existing directory"),
        (lambda lib: f"{lib}/file.jpg", "is not an existing directory"),
        (lambda lib: f"{lib.parent}/outside", "is outside the configured library roots"),
        (lambda lib: f"{lib}/escape", "is outside the configured library roots"),
    ],
)
async def test_create_refuses_bad_root_paths(
    control: Control, library: Path, make_path: Callable[[Path], str], description: str
) -> None:
    make_tree(library, {"file.jpg": "x"})
    (library.parent / "outside").mkdir()
    (library / "escape").symlink_to(library.parent / "outside")
    err = await _fails(control.create(make_path(library)), INVALID)
    d = details(err)
    assert d.fields == ["root_path"]
    assert description in d.bad_request.field_violations[0].description  # type: ignore[union-attr]
    assert description in d.message


async def test_outside_paths_get_the_same_answer_whether_or_not_they_exist(control: Control, library: Path) -> None:
    (library.parent / "secret").mkdir()
    (library / "link").symlink_to(library.parent / "secret")
    answers = []
    for path in (library.parent / "secret", library.parent / "nothing-here", library / "link"):
        d = details(await _fails(control.create(path), INVALID))
        answers.append((d.code, d.message, d.fields, d.bad_request))
    assert answers[0] == answers[1] == answers[2]
    scans = []
    for path in (library.parent / "secret", library.parent / "nothing-here"):
        d = details(await _fails(control.stub.ScanDirectory(api.ScanDirectoryRequest(path=str(path))), INVALID))
        scans.append((d.message, d.fields))
    assert scans[0] == scans[1] and scans[0][1] == ["path"]


async def test_create_refuses_bad_subdirectories(control: Control, library: Path) -> None:
    make_tree(library, {"root/a/": "", "other/": ""})
    root = library / "root"
    for subdirectory in (library / "other", "../other", "missing", "/etc"):
        d = details(await _fails(control.create(root, "a", subdirectory), INVALID))
        assert d.fields == ["subdirectories[1]"], subdirectory
    too_many = [f"d{i}" for i in range(1001)]
    d = details(await _fails(control.create(root, *too_many), INVALID))
    assert d.fields == ["subdirectories"]


async def test_create_with_request_id_returns_the_first_answer(
    control: Control, library: Path, clean_db: Database
) -> None:
    make_tree(library, {"a/": ""})
    calls = [control.create(library, "a", request_id="create-1") for _ in range(8)]
    sessions = await asyncio.gather(*calls)
    assert len({s.name for s in sessions}) == 1
    again = await control.create(library, request_id="create-1", display_name="ignored")
    assert again == sessions[0]
    async with clean_db.engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM training_sessions"))).scalar_one() == 1
    other = await control.create(library, request_id="create-2")
    assert other.name != sessions[0].name


# ---- Names, GetSession, NOT_FOUND ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", "session/1", "sessions/", "sessions/0", "sessions/-1", "sessions/x", "sessions/1/"]
)
async def test_malformed_names_are_invalid_argument(control: Control, name: str) -> None:
    d = details(await _fails(control.stub.GetSession(api.GetSessionRequest(name=name)), INVALID))
    assert d.fields == ["name"]


async def test_unknown_session_is_not_found_on_every_per_session_call(control: Control) -> None:
    name = "sessions/424242"
    s = control.stub
    calls = [
        s.GetSession(api.GetSessionRequest(name=name)),
        s.UpdateSession(api.UpdateSessionRequest(name=name, display_name="x")),
        s.DeleteSession(api.DeleteSessionRequest(name=name)),
        s.UpdateSubdirectories(api.UpdateSubdirectoriesRequest(name=name)),
        s.ValidateSession(api.ValidateSessionRequest(name=name)),
        s.StartSession(api.StartSessionRequest(name=name)),
        s.PauseSession(api.PauseSessionRequest(name=name)),
        s.ResumeSession(api.ResumeSessionRequest(name=name)),
        s.CancelSession(api.CancelSessionRequest(name=name)),
        s.RestartSession(api.RestartSessionRequest(name=name)),
        s.GetSessionProgress(api.GetSessionProgressRequest(name=name)),
        s.ListJobs(api.ListJobsRequest(name=name)),
    ]
    for call in calls:
        err = await _fails(call, grpc.StatusCode.NOT_FOUND)
        assert "sessions/424242 not found" in (err.details() or "")


# ---- ListSessions ---------------------------------------------------------------------------------


async def test_list_sessions_pages_newest_first_and_filters(
    control: Control, library: Path, clean_db: Database
) -> None:
    make_tree(library, {"a/": ""})
    for _ in range(5):
        await control.create(library, "a")
    await set_state(clean_db, "sessions/2", "cancelled")
    await set_state(clean_db, "sessions/4", "cancelled")

    names: list[str] = []
    token = ""
    while True:
        page = await control.stub.ListSessions(api.ListSessionsRequest(page_size=2, page_token=token))
        assert len(page.sessions) <= 2
        assert all(len(s.subdirectories) == 0 for s in page.sessions)
        names += [s.name for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert names == [f"sessions/{i}" for i in (5, 4, 3, 2, 1)]

    cancelled = api.ListSessionsRequest(state=pb.SESSION_STATE_CANCELLED, page_size=1)
    first = await control.stub.ListSessions(cancelled)
    assert [s.name for s in first.sessions] == ["sessions/4"]
    second = await control.stub.ListSessions(
        api.ListSessionsRequest(state=pb.SESSION_STATE_CANCELLED, page_size=1, page_token=first.next_page_token)
    )
    assert [s.name for s in second.sessions] == ["sessions/2"] and second.next_page_token == ""

    d = details(
        await _fails(control.stub.ListSessions(api.ListSessionsRequest(page_token=first.next_page_token)), INVALID)
    )
    assert d.fields == ["page_token"] and "another filter" in d.message
    for bad in ("garbage!", "eyJ4IjogMX0", "e30"):
        d = details(await _fails(control.stub.ListSessions(api.ListSessionsRequest(page_token=bad)), INVALID))
        assert d.fields == ["page_token"]
    d = details(await _fails(control.stub.ListSessions(api.ListSessionsRequest(page_size=-1)), INVALID))
    assert d.fields == ["page_size"]


async def test_list_sessions_page_size_defaults_to_50_and_is_cut_to_500(
    control: Control, library: Path, clean_db: Database
) -> None:
    async with clean_db.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO training_sessions (display_name, root_path)"
                " SELECT 's' || g, :root FROM generate_series(1, 501) AS g"
            ),
            {"root": str(library)},
        )
    default = await control.stub.ListSessions(api.ListSessionsRequest())
    assert len(default.sessions) == 50 and default.next_page_token
    big = await control.stub.ListSessions(api.ListSessionsRequest(page_size=100_000))
    assert len(big.sessions) == 500 and big.next_page_token
    rest = await control.stub.ListSessions(api.ListSessionsRequest(page_size=500, page_token=big.next_page_token))
    assert [s.name for s in rest.sessions] == ["sessions/1"] and rest.next_page_token == ""


# ---- UpdateSession, DeleteSession -----------------------------------------------------------------


async def test_update_session_renames_in_any_state_and_changes_config_only_when_allowed(
    control: Control, library: Path, clean_db: Database
) -> None:
    session = await control.create(library)
    renamed = (
        await control.stub.UpdateSession(api.UpdateSessionRequest(name=session.name, display_name="renamed"))
    ).session
    assert renamed.display_name == "renamed" and list(renamed.config.extensions) == ["jpg", "jpeg", "png", "webp"]
    assert renamed.update_time.ToNanoseconds() >= session.update_time.ToNanoseconds()
    changed = (
        await control.stub.UpdateSession(
            api.UpdateSessionRequest(name=session.name, config=pb.SessionConfig(extensions=["gif"], batch_size=500))
        )
    ).session
    assert changed.display_name == "renamed"
    assert list(changed.config.extensions) == ["gif"] and changed.config.batch_size == 500

    await set_state(clean_db, session.name, "running")
    again = await control.stub.UpdateSession(api.UpdateSessionRequest(name=session.name, display_name="while running"))
    assert again.session.display_name == "while running"
    err = await _fails(
        control.stub.UpdateSession(api.UpdateSessionRequest(name=session.name, config=pb.SessionConfig())),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    d = details(err)
    assert d.violation_types == ["STATE"] and "RUNNING" in d.message and "PauseSession" in d.message

    for request, field in [
        (api.UpdateSessionRequest(name=session.name, display_name=""), "display_name"),
        (api.UpdateSessionRequest(name=session.name, display_name="x" * 201), "display_name"),
        (api.UpdateSessionRequest(name=session.name, config=pb.SessionConfig(extensions=["svg"])), "config.extensions"),
    ]:
        assert details(await _fails(control.stub.UpdateSession(request), INVALID)).fields == [field]


async def test_delete_session_cascades_jobs_and_keeps_assets(
    control: Control, library: Path, clean_db: Database
) -> None:
    make_tree(library, {"a/": ""})
    session = await control.create(library, "a")
    async with clean_db.engine.begin() as conn:
        await conn.execute(text("INSERT INTO image_assets (id, path, size_bytes, mtime_ns) VALUES (1, '/x.jpg', 1, 1)"))
        await conn.execute(text("INSERT INTO training_jobs (session_id, asset_id) VALUES (1, 1)"))
    await control.stub.DeleteSession(api.DeleteSessionRequest(name=session.name))
    await _fails(control.stub.GetSession(api.GetSessionRequest(name=session.name)), grpc.StatusCode.NOT_FOUND)
    async with clean_db.engine.connect() as conn:
        counts = (
            await conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM training_jobs), (SELECT count(*) FROM session_subdirectories),"
                    " (SELECT count(*) FROM image_assets)"
                )
            )
        ).one()
    assert tuple(counts) == (0, 0, 1)
    await _fails(control.stub.DeleteSession(api.DeleteSessionRequest(name=session.name)), grpc.StatusCode.NOT_FOUND)


# ---- UpdateSubdirectories -------------------------------------------------------------------------


async def test_update_subdirectories_selects_unselects_and_adds(control: Control, library: Path) -> None:
    make_tree(library, {"a/": "", "b/": "", "b/deep/": ""})
    session = await control.create(library)
    updated = (
        await control.stub.UpdateSubdirectories(
            api.UpdateSubdirectoriesRequest(
                name=session.name,
                selections=[
                    api.SubdirectorySelection(path="a", selected=True),
                    api.SubdirectorySelection(path=str(library / "b" / "deep"), selected=True),
                    api.SubdirectorySelection(path="b", selected=True),
                    api.SubdirectorySelection(path="b", selected=False),  # the last one wins
                    api.SubdirectorySelection(path="gone", selected=False),  # unselecting needs no directory
                ],
            )
        )
    ).session
    assert [(s.path, s.selected) for s in updated.subdirectories] == [
        (str(library / "a"), True),
        (str(library / "b"), False),
        (str(library / "b" / "deep"), True),
        (str(library / "gone"), False),
    ]
    for path, field_ok in [("../x", True), ("missing", True), ("/etc", True)]:
        request = api.UpdateSubdirectoriesRequest(
            name=session.name, selections=[api.SubdirectorySelection(path=path, selected=True)]
        )
        d = details(await _fails(control.stub.UpdateSubdirectories(request), INVALID))
        assert d.fields == ["selections[0].path"] and field_ok
    request = api.UpdateSubdirectoriesRequest(
        name=session.name, selections=[api.SubdirectorySelection(path="a")] * 1001
    )
    assert details(await _fails(control.stub.UpdateSubdirectories(request), INVALID)).fields == ["selections"]


# ---- ScanDirectory ----------------------------------------------------------------------------------


async def test_scan_directory_counts_recursively_and_truncates(control: Control, library: Path) -> None:
    make_tree(
        library,
        {
            "top.jpg": "x",
            "notes.txt": "x",
            "a/1.jpg": "x",
            "a/2.JPEG": "x",
            "a/3.txt": "x",
            "a/deep/4.png": "x",
            "b/": "",
            "c/5.gif": "x",
        },
    )
    scan = await control.stub.ScanDirectory(api.ScanDirectoryRequest(path=str(library)))
    assert scan.path == str(library) and scan.direct_image_count == 1 and not scan.truncated
    assert [(d.path, d.image_count, d.truncated) for d in scan.subdirectories] == [
        (str(library / "a"), 3, False),
        (str(library / "b"), 0, False),
        (str(library / "c"), 0, False),
    ]
    assert list(scan.extensions) == ["jpg", "jpeg", "png", "webp"]

    gif = await control.stub.ScanDirectory(api.ScanDirectoryRequest(path=str(library), extensions=["GIF"]))
    assert [d.image_count for d in gif.subdirectories] == [0, 0, 1] and list(gif.extensions) == ["gif"]

    capped = await control.stub.ScanDirectory(api.ScanDirectoryRequest(path=str(library), max_files=3))
    assert capped.truncated and any(d.truncated for d in capped.subdirectories)

    # A deadline too close to count anything: the answer still arrives, marked truncated.
    rushed = await control.stub.ScanDirectory(api.ScanDirectoryRequest(path=str(library)), timeout=0.45)
    assert rushed.truncated

    for request, field in [
        (api.ScanDirectoryRequest(path=str(library), max_files=-1), "max_files"),
        (api.ScanDirectoryRequest(path=str(library), extensions=["exe"]), "extensions"),
        (api.ScanDirectoryRequest(path="relative"), "path"),
        (api.ScanDirectoryRequest(path=str(library / "top.jpg")), "path"),
    ]:
        assert details(await _fails(control.stub.ScanDirectory(request), INVALID)).fields == [field]


async def test_scan_directory_file_cap_comes_from_settings(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path
) -> None:
    make_tree(library, {f"a/{i}.jpg": "x" for i in range(10)})
    async with running_control(make_settings(scan_max_files=4)) as control:
        scan = await control.stub.ScanDirectory(api.ScanDirectoryRequest(path=str(library), max_files=1000))
        assert scan.truncated and scan.subdirectories[0].image_count <= 4


# ---- ValidateSession ---------------------------------------------------------------------------------


async def test_validate_session_reports_problems_without_changing_anything(
    control: Control, library: Path, clean_db: Database
) -> None:
    make_tree(library, {"a/1.jpg": "x", "a/sub/2.png": "x", "b/readme.txt": "x", "c/": "", "gone/": ""})
    session = await control.create(library, "a", "c")
    ok = await control.stub.ValidateSession(api.ValidateSessionRequest(name=session.name))
    assert ok.valid and list(ok.problems) == [] and ok.state == pb.SESSION_STATE_PENDING
    assert ok.image_count == 2 and not ok.truncated
    assert [(d.path, d.image_count) for d in ok.selected_subdirectories] == [
        (str(library / "a"), 2),
        (str(library / "c"), 0),
    ]
    assert (ok.subdirectories_total, ok.subdirectories_selected) == (2, 2)
    assert list(ok.supported_formats) == ["jpg", "jpeg", "png", "webp"]

    empty = await control.create(library, "b", "c")
    result = await control.stub.ValidateSession(api.ValidateSessionRequest(name=empty.name))
    assert not result.valid and [p.type for p in result.problems] == ["NO_IMAGES"]
    assert result.problems[0].description.startswith(
        "Selected subdirectories contain no image files. Supported formats: .jpg, .jpeg, .png, .webp"
    )
    assert str(library / "b") in result.problems[0].description

    nothing = await control.create(library)
    result = await control.stub.ValidateSession(api.ValidateSessionRequest(name=nothing.name))
    assert [p.type for p in result.problems] == ["SELECTION"]
    assert result.problems[0].description == (
        f"No subdirectories selected for session {session_id(nothing)}: select at least one with UpdateSubdirectories"
    )

    broken = await control.create(library, "a", "gone")
    os.rmdir(library / "gone")
    await set_state(clean_db, broken.name, "paused", resume_state="running")
    result = await control.stub.ValidateSession(api.ValidateSessionRequest(name=broken.name))
    assert [p.type for p in result.problems] == ["STATE", "UNREADABLE"]
    assert "PAUSED" in result.problems[0].description and "ResumeSession" in result.problems[0].description
    assert result.problems[1].subject == str(library / "gone")
    assert result.image_count == 2 and result.state == pb.SESSION_STATE_PAUSED
    after = (await control.stub.GetSession(api.GetSessionRequest(name=broken.name))).session
    assert after.state == pb.SESSION_STATE_PAUSED and after.update_time.ToNanoseconds() > 0


# ---- GetSessionProgress, ListJobs -------------------------------------------------------------------


async def test_get_session_progress_percentage_rules(control: Control, library: Path, clean_db: Database) -> None:
    session = await control.create(library)
    request = api.GetSessionProgressRequest(name=session.name)

    await set_state(clean_db, session.name, "discovering", images_found=120, processed_images=10)
    p = await control.stub.GetSessionProgress(request)
    assert p.name == session.name and p.state == pb.SESSION_STATE_DISCOVERING
    assert p.progress.indeterminate and not p.progress.HasField("percentage")
    assert p.progress.discovered_images == 120 and p.discovery.images_found == 120

    await set_state(
        clean_db,
        session.name,
        "running",
        total_final=True,
        total_images=200,
        images_found=200,
        processed_images=50,
        failed_images=25,
        skipped_images=25,
        training_seconds=10.0,
    )
    p = await control.stub.GetSessionProgress(request)
    assert not p.progress.indeterminate and p.progress.percentage == 50.0
    assert p.progress.images_per_second == 10.0 and p.progress.eta.seconds == 10
    assert p.discovery.total_final

    await set_state(
        clean_db,
        session.name,
        "failed",
        total_images=0,
        images_found=0,
        processed_images=0,
        failed_images=0,
        skipped_images=0,
        state_reason="no images",
    )
    p = await control.stub.GetSessionProgress(request)
    assert not p.progress.indeterminate and not p.progress.HasField("percentage")
    assert p.state == pb.SESSION_STATE_FAILED and p.state_reason == "no images"


async def test_list_jobs_filters_pages_and_joins_assets(control: Control, library: Path, clean_db: Database) -> None:
    session = await control.create(library)
    async with clean_db.engine.begin() as conn:
        await conn.execute(
            text(
                """
                INSERT INTO image_assets (id, path, size_bytes, mtime_ns, perceptual_hash, hash_algorithm,
                                          width, height, format)
                SELECT g, '/lib/' || g || '.jpg', 10, 10, 'ff00', 'dhash-64', 640, 480, 'JPEG'
                  FROM generate_series(1, 5) AS g
                """
            )
        )
        await conn.execute(
            text(
                """
                INSERT INTO training_jobs (session_id, asset_id, state, error_class, error_message, skip_reason)
                VALUES (1, 1, 'completed', '', '', ''), (1, 2, 'failed', 'corrupt', 'cannot decode', ''),
                       (1, 3, 'skipped', '', '', 'duplicate of asset 1'), (1, 4, 'failed', 'vanished', 'gone', ''),
                       (1, 5, 'pending', '', '', '')
                """
            )
        )
    all_jobs = await control.stub.ListJobs(api.ListJobsRequest(name=session.name))
    assert [j.name for j in all_jobs.jobs] == [f"sessions/1/jobs/{i}" for i in range(1, 6)]
    first = all_jobs.jobs[0]
    assert (first.path, first.state, first.perceptual_hash, first.hash_algorithm) == (
        "/lib/1.jpg",
        pb.JOB_STATE_COMPLETED,
        "ff00",
        "dhash-64",
    )
    assert (first.width, first.height, first.format, first.asset_id) == (640, 480, "JPEG", 1)
    assert all_jobs.jobs[2].skip_reason == "duplicate of asset 1"
    assert all_jobs.next_page_token == ""

    failed = await control.stub.ListJobs(api.ListJobsRequest(name=session.name, state=pb.JOB_STATE_FAILED, page_size=1))
    assert [(j.error_class, j.error_message) for j in failed.jobs] == [("corrupt", "cannot decode")]
    more = await control.stub.ListJobs(
        api.ListJobsRequest(
            name=session.name, state=pb.JOB_STATE_FAILED, page_size=1, page_token=failed.next_page_token
        )
    )
    assert [j.error_class for j in more.jobs] == ["vanished"] and more.next_page_token == ""

    d = details(
        await _fails(
            control.stub.ListJobs(api.ListJobsRequest(name=session.name, page_token=failed.next_page_token)), INVALID
        )
    )
    assert d.fields == ["page_token"]
    d = details(await _fails(control.stub.ListJobs(api.ListJobsRequest(name=session.name, page_size=-5)), INVALID))
    assert d.fields == ["page_size"]
    d = details(await _fails(control.stub.ListJobs(api.ListJobsRequest(name=session.name, state=42)), INVALID))  # type: ignore[arg-type]
    assert d.fields == ["state"]
