"""Every allowed and forbidden transition, what each one resets, idempotency and races."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import grpc
import pytest
from sqlalchemy import text

from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from tests.conftest import wait_for
from tests.integration.test_control_helpers import Control, details, make_tree, row, running_control, set_state

STATES = ["pending", "discovering", "running", "paused", "completed", "cancelled", "failed"]
PROTO_STATE = {s: getattr(pb, f"SESSION_STATE_{s.upper()}") for s in STATES}

Call = Callable[[Control, str], Awaitable[object]]
CALLS: dict[str, tuple[Call, set[str]]] = {
    "StartSession": (
        lambda c, n: c.stub.StartSession(api.StartSessionRequest(name=n)),
        {"pending", "failed"},
    ),
    "PauseSession": (
        lambda c, n: c.stub.PauseSession(api.PauseSessionRequest(name=n)),
        {"discovering", "running"},
    ),
    "ResumeSession": (
        lambda c, n: c.stub.ResumeSession(api.ResumeSessionRequest(name=n)),
        {"paused"},
    ),
    "CancelSession": (
        lambda c, n: c.stub.CancelSession(api.CancelSessionRequest(name=n)),
        {"pending", "discovering", "running", "paused"},
    ),
    "RestartSession(ALL)": (
        lambda c, n: c.stub.RestartSession(api.RestartSessionRequest(name=n, scope=api.RESTART_SCOPE_ALL)),
        {"completed", "cancelled", "failed"},
    ),
    "RestartSession(FAILED_ONLY)": (
        lambda c, n: c.stub.RestartSession(api.RestartSessionRequest(name=n, scope=api.RESTART_SCOPE_FAILED_ONLY)),
        {"completed", "cancelled", "failed"},
    ),
    "DeleteSession": (
        lambda c, n: c.stub.DeleteSession(api.DeleteSessionRequest(name=n)),
        {"pending", "paused", "completed", "cancelled", "failed"},
    ),
    "UpdateSession(config)": (
        lambda c, n: c.stub.UpdateSession(api.UpdateSessionRequest(name=n, config=pb.SessionConfig())),
        {"pending", "paused", "completed", "cancelled", "failed"},
    ),
    "UpdateSubdirectories": (
        lambda c, n: c.stub.UpdateSubdirectories(
            api.UpdateSubdirectoriesRequest(name=n, selections=[api.SubdirectorySelection(path="a", selected=True)])
        ),
        {"pending", "paused", "completed", "cancelled", "failed"},
    ),
}
# Where an allowed call leaves a session (None: deleted; "same": unchanged).
EXPECTED_STATE = {
    "StartSession": "discovering",
    "PauseSession": "paused",
    "ResumeSession": "running",  # resume_state is 'running' in the table below
    "CancelSession": "cancelled",
    "RestartSession(ALL)": "discovering",
    "RestartSession(FAILED_ONLY)": "running",  # total_final is true in the table below
    "DeleteSession": None,
    "UpdateSession(config)": "same",
    "UpdateSubdirectories": "same",
}


@pytest.fixture
async def control(clean_db: Database, make_settings: Callable[..., Settings]) -> AsyncIterator[Control]:
    async with running_control(make_settings()) as c:
        yield c


@pytest.fixture
async def selected(control: Control, library: Path) -> pb.Session:
    """A pending session with one selected subdirectory."""
    make_tree(library, {"a/1.jpg": "x"})
    return await control.create(library, "a")


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("call_name", list(CALLS))
async def test_transition_table(
    control: Control, selected: pb.Session, clean_db: Database, call_name: str, state: str
) -> None:
    call, allowed = CALLS[call_name]
    resume_state = "running" if state == "paused" else None
    await set_state(clean_db, selected.name, state, resume_state=resume_state, total_final=True)
    before = await row(clean_db, selected.name)
    if state in allowed:
        await call(control, selected.name)
        after = await row(clean_db, selected.name)
        expected = EXPECTED_STATE[call_name]
        if expected is None:
            assert after is None
        else:
            assert after.state == (state if expected == "same" else expected)
        return
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(control, selected.name)
    d = details(info.value)
    assert d.code == grpc.StatusCode.FAILED_PRECONDITION
    assert d.violation_types == ["STATE"]
    assert d.precondition is not None and d.precondition.violations[0].subject == selected.name
    assert state.upper() in d.message
    assert d.info is not None and d.info.metadata["state"] == f"SESSION_STATE_{state.upper()}"
    after = await row(clean_db, selected.name)
    assert after.state == state and after.update_time == before.update_time  # nothing written


@pytest.mark.parametrize(
    ("state", "hint"),
    [
        ("paused", "ResumeSession"),
        ("completed", "RestartSession"),
        ("cancelled", "RestartSession"),
        ("discovering", "already started"),
        ("running", "already started"),
    ],
)
async def test_start_refusal_names_the_state_and_the_call_to_use(
    control: Control, selected: pb.Session, clean_db: Database, state: str, hint: str
) -> None:
    await set_state(clean_db, selected.name, state, resume_state="running" if state == "paused" else None)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await control.stub.StartSession(api.StartSessionRequest(name=selected.name))
    message = info.value.details() or ""
    assert f"session 1 is {state.upper()}" in message and hint in message


async def test_start_without_selection_is_a_selection_precondition(control: Control, library: Path) -> None:
    make_tree(library, {"a/": ""})
    session = await control.create(library)  # a added unselected
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await control.stub.StartSession(api.StartSessionRequest(name=session.name))
    d = details(info.value)
    assert d.code == grpc.StatusCode.FAILED_PRECONDITION
    assert d.message == "No subdirectories selected for session 1: select at least one with UpdateSubdirectories"
    assert d.precondition is not None
    (violation,) = d.precondition.violations
    assert (violation.type, violation.subject) == ("SELECTION", "sessions/1")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await control.stub.RestartSession(api.RestartSessionRequest(name=session.name))
    assert details(info.value).violation_types == ["STATE"]  # pending: the state is checked first


async def test_start_resets_the_run_and_notifies_workers(
    control: Control, selected: pb.Session, clean_db: Database
) -> None:
    await set_state(
        clean_db,
        selected.name,
        "failed",
        state_reason="worker crashed 5 times on this session",
        attempts=5,
        owner_id="w1",
        owner_address="127.0.0.1:1",
        total_final=True,
        total_images=7,
        images_found=7,
        files_seen=9,
        directories_scanned=3,
        assets_new=7,
        unreadable_paths=1,
        current_directory="/x",
        processed_images=4,
        failed_images=3,
    )
    notified: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(clean_db.url)
    await listener.add_listener("imagetraining_sessions", lambda *args: notified.put_nowait(args[3]))
    try:
        started = (await control.stub.StartSession(api.StartSessionRequest(name=selected.name))).session
        assert await asyncio.wait_for(notified.get(), 5.0) == "1"
    finally:
        await listener.close()
    assert started.state == pb.SESSION_STATE_DISCOVERING
    assert started.HasField("start_time") and not started.HasField("end_time")
    assert started.state_reason == "" and started.attempts == 0
    assert started.progress.indeterminate and not started.progress.HasField("percentage")
    assert [s.selected for s in started.subdirectories] == [True]
    r = await row(clean_db, selected.name)
    assert (r.owner_id, r.owner_address, r.lease_expires_at, r.run_scope) == (None, None, None, "all")
    assert (r.total_final, r.images_found, r.files_seen, r.directories_scanned, r.assets_new) == (
        False,
        0,
        0,
        0,
        0,
    )
    assert (r.unreadable_paths, r.current_directory, r.discovery_checkpoint) == (0, "", None)
    assert (r.processed_images, r.failed_images) == (4, 3)  # training counters equal the jobs table


async def test_pause_resume_and_cancel_record_what_they_must(
    control: Control, selected: pb.Session, clean_db: Database
) -> None:
    await control.stub.StartSession(api.StartSessionRequest(name=selected.name))
    paused = (await control.stub.PauseSession(api.PauseSessionRequest(name=selected.name))).session
    assert paused.state == pb.SESSION_STATE_PAUSED
    assert (await row(clean_db, selected.name)).resume_state == "discovering"
    resumed = (await control.stub.ResumeSession(api.ResumeSessionRequest(name=selected.name))).session
    assert resumed.state == pb.SESSION_STATE_DISCOVERING
    await set_state(clean_db, selected.name, "running")
    await control.stub.PauseSession(api.PauseSessionRequest(name=selected.name))
    resumed = (await control.stub.ResumeSession(api.ResumeSessionRequest(name=selected.name))).session
    assert resumed.state == pb.SESSION_STATE_RUNNING
    assert (await row(clean_db, selected.name)).resume_state is None
    cancelled = (await control.stub.CancelSession(api.CancelSessionRequest(name=selected.name))).session
    assert cancelled.state == pb.SESSION_STATE_CANCELLED
    assert cancelled.state_reason == "cancelled by a client" and cancelled.HasField("end_time")
    # Every control transition moved the stream sequence ceiling up.
    assert (await row(clean_db, selected.name)).event_sequence == 7  # 1 at creation, then one per transition


async def _add_jobs(db: Database, states: list[str]) -> None:
    async with db.engine.begin() as conn:
        for i, state in enumerate(states, start=1):
            await conn.execute(
                text("INSERT INTO image_assets (id, path, size_bytes, mtime_ns) VALUES (:i, :path, 1, 1)"),
                {"i": i, "path": f"/f{i}.jpg"},
            )
            await conn.execute(
                text(
                    "INSERT INTO training_jobs (session_id, asset_id, state, error_class, error_message)"
                    " VALUES (1, :i, :state, :error_class, :error_message)"
                ),
                {
                    "i": i,
                    "state": state,
                    "error_class": "corrupt" if state == "failed" else "",
                    "error_message": "bad" if state == "failed" else "",
                },
            )


async def _job_states(db: Database) -> list[tuple[str, str]]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(text("SELECT state, error_class FROM training_jobs ORDER BY id"))
        return [(r.state, r.error_class) for r in rows]


async def test_restart_all_rediscovers_and_keeps_the_jobs(
    control: Control, selected: pb.Session, clean_db: Database
) -> None:
    # A cancel leaves jobs pending, never "running": nothing sets a job running (results are
    # committed with their counters in one transaction), so a restart has nothing to put back.
    await _add_jobs(clean_db, ["completed", "pending", "failed"])
    await set_state(
        clean_db, selected.name, "cancelled", total_final=True, total_images=3, processed_images=1, failed_images=1
    )
    restarted = (
        await control.stub.RestartSession(api.RestartSessionRequest(name=selected.name, scope=api.RESTART_SCOPE_ALL))
    ).session
    assert restarted.state == pb.SESSION_STATE_DISCOVERING and restarted.state_reason == ""
    assert await _job_states(clean_db) == [("completed", ""), ("pending", ""), ("failed", "corrupt")]
    r = await row(clean_db, selected.name)
    assert (r.run_scope, r.total_final, r.failed_images) == ("all", False, 1)


@pytest.mark.parametrize(("total_final", "expected"), [(True, "running"), (False, "discovering")])
async def test_restart_failed_only_retrains_failed_jobs(
    control: Control, selected: pb.Session, clean_db: Database, total_final: bool, expected: str
) -> None:
    await _add_jobs(clean_db, ["completed", "failed", "failed", "skipped"])
    await set_state(
        clean_db,
        selected.name,
        "failed",
        total_final=total_final,
        total_images=4,
        images_found=4,
        processed_images=1,
        failed_images=2,
        skipped_images=1,
        state_reason="every job failed",
    )
    restarted = (
        await control.stub.RestartSession(
            api.RestartSessionRequest(name=selected.name, scope=api.RESTART_SCOPE_FAILED_ONLY)
        )
    ).session
    assert restarted.state == PROTO_STATE[expected]
    assert restarted.progress.failed_images == 0 and restarted.progress.processed_images == 1
    assert restarted.state_reason == "" and restarted.HasField("start_time")
    assert await _job_states(clean_db) == [("completed", ""), ("pending", ""), ("pending", ""), ("skipped", "")]
    r = await row(clean_db, selected.name)
    assert (r.run_scope, r.total_final, r.images_found) == ("failed_only", total_final, 4)


async def test_restart_needs_a_selection(control: Control, library: Path, clean_db: Database) -> None:
    session = await control.create(library)
    await set_state(clean_db, session.name, "completed")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await control.stub.RestartSession(api.RestartSessionRequest(name=session.name))
    assert details(info.value).violation_types == ["SELECTION"]


async def test_start_with_request_id_returns_the_first_answer(
    control: Control, selected: pb.Session, library: Path
) -> None:
    request = api.StartSessionRequest(name=selected.name, request_id="start-1")
    first = (await control.stub.StartSession(request)).session
    await control.stub.PauseSession(api.PauseSessionRequest(name=selected.name))
    again = (await control.stub.StartSession(request)).session
    assert again == first and again.state == pb.SESSION_STATE_DISCOVERING
    current = (await control.stub.GetSession(api.GetSessionRequest(name=selected.name))).session
    assert current.state == pb.SESSION_STATE_PAUSED  # the retry changed nothing

    other = await control.create(library, "a")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await control.stub.StartSession(api.StartSessionRequest(name=other.name, request_id="start-1"))
    assert details(info.value).fields == ["request_id"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await control.stub.StartSession(api.StartSessionRequest(name=other.name, request_id="x" * 129))
    assert details(info.value).fields == ["request_id"]


async def test_restart_with_request_id_returns_the_first_answer(
    control: Control, selected: pb.Session, clean_db: Database
) -> None:
    await set_state(clean_db, selected.name, "completed")
    request = api.RestartSessionRequest(name=selected.name, request_id="restart-1")
    first = (await control.stub.RestartSession(request)).session
    await control.stub.CancelSession(api.CancelSessionRequest(name=selected.name))
    again = (await control.stub.RestartSession(request)).session
    assert again == first and (await row(clean_db, selected.name)).state == "cancelled"


# ---- races ---------------------------------------------------------------------------------------


async def _outcomes(calls: list[Awaitable[object]]) -> list[object]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


async def test_twenty_concurrent_starts_make_exactly_one_transition(
    control: Control, selected: pb.Session, clean_db: Database
) -> None:
    results = await _outcomes(
        [control.stub.StartSession(api.StartSessionRequest(name=selected.name)) for _ in range(20)]
    )
    ok = [r for r in results if isinstance(r, api.StartSessionResponse)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1 and len(failed) == 19
    for err in failed:
        d = details(err)
        assert d.code == grpc.StatusCode.FAILED_PRECONDITION and "DISCOVERING" in d.message
    r = await row(clean_db, selected.name)
    assert r.state == "discovering" and r.event_sequence == 2


async def test_twenty_concurrent_starts_with_one_request_id_all_get_the_first_answer(
    control: Control, selected: pb.Session, clean_db: Database
) -> None:
    request = api.StartSessionRequest(name=selected.name, request_id="same-start")
    results = await _outcomes([control.stub.StartSession(request) for _ in range(20)])
    assert all(isinstance(r, api.StartSessionResponse) for r in results), results
    sessions = [r.session for r in results if isinstance(r, api.StartSessionResponse)]
    assert all(s == sessions[0] for s in sessions)
    assert (await row(clean_db, selected.name)).event_sequence == 2


async def test_start_against_cancel_races_end_consistently(control: Control, library: Path, clean_db: Database) -> None:
    make_tree(library, {"a/": ""})
    for _ in range(10):
        session = await control.create(library, "a")
        start, cancel = await _outcomes(
            [
                control.stub.StartSession(api.StartSessionRequest(name=session.name)),
                control.stub.CancelSession(api.CancelSessionRequest(name=session.name)),
            ]
        )
        # Cancel is allowed from pending and from discovering: it always wins the end state.
        assert isinstance(cancel, api.CancelSessionResponse), cancel
        assert cancel.session.state == pb.SESSION_STATE_CANCELLED
        if isinstance(start, grpc.aio.AioRpcError):
            d = details(start)
            assert d.code == grpc.StatusCode.FAILED_PRECONDITION and "CANCELLED" in d.message
        else:
            assert isinstance(start, api.StartSessionResponse)
            assert start.session.state == pb.SESSION_STATE_DISCOVERING
        final = await row(clean_db, session.name)
        assert final.state == "cancelled"
        assert final.event_sequence == (3 if isinstance(start, api.StartSessionResponse) else 2)


async def test_pause_against_cancel_races_end_consistently(
    control: Control, selected: pb.Session, clean_db: Database
) -> None:
    await control.stub.StartSession(api.StartSessionRequest(name=selected.name))
    pause, cancel = await _outcomes(
        [
            control.stub.PauseSession(api.PauseSessionRequest(name=selected.name)),
            control.stub.CancelSession(api.CancelSessionRequest(name=selected.name)),
        ]
    )
    assert isinstance(cancel, api.CancelSessionResponse)
    if isinstance(pause, grpc.aio.AioRpcError):
        assert details(pause).code == grpc.StatusCode.FAILED_PRECONDITION
    final = await wait_for(lambda: row(clean_db, selected.name))
    assert final.state == "cancelled"
