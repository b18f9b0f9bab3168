"""The control service's use cases: create, read, list, edit and move sessions.

The statements that change a session's state are `imagetraining.transitions`'s (the state machine
both services share); refusals say what to do instead (control_service/refusals.py); counting the
files of ScanDirectory and ValidateSession is control_service/counting.py's.

Rules kept here (see docs/architecture.md):
- Every transition is one guarded UPDATE (`transitions.Transition`: `WHERE id = :id AND state = ANY(:allowed)`).
  Zero rows means someone else moved the session first (or it never was in an allowed state): the
  current state is read back and the caller gets FAILED_PRECONDITION naming it and the call to use
  instead. Of concurrent conflicting calls exactly one wins; PostgreSQL's row lock decides.
- Read-check-write use cases (UpdateSession, UpdateSubdirectories) lock the session row with
  `FOR UPDATE NOWAIT`: a concurrent change in progress makes them ABORTED (retry after GetSession)
  instead of queueing behind it and applying a change decided on a stale state.
- No request touches a file except CreateSession / UpdateSubdirectories (path resolution, one
  bounded directory read), ScanDirectory and ValidateSession (bounded counting), always in a thread.
  StartSession, RestartSession and friends only write rows; workers do the walking.
- Every control transition also raises `event_sequence` by one (the stream's sequence ceiling), so
  the state change it causes is numbered above anything a worker has sent, and sends
  `NOTIFY imagetraining_sessions, '<id>'` in the same transaction (delivered on commit): a wake-up
  for workers and the relay, never a source of truth.
- Job rows are changed set-based (one statement), never in a per-row loop.
- `request_id` makes CreateSession, StartSession and RestartSession safe to retry
  (control_service/idempotency.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import RowMapping, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from control_service.counting import Counting, ScanOutcome, Validation
from control_service.idempotency import Idempotency
from control_service.inputs import (
    MAX_DISPLAY_NAME,
    MAX_PATHS_PER_REQUEST,
    MAX_SUBDIRECTORIES_PER_SESSION,
    check_display_name,
)
from control_service.pages import decode_token, encode_token, page_size_of
from control_service.refusals import (
    concurrent_change,
    lock_wait_seconds,
    no_selection,
    session_busy,
    wrong_state,
)
from imagetraining import convert, transitions, walk
from imagetraining.db import faults
from imagetraining.db.engine import Database
from imagetraining.errors import (
    InvalidArgument,
    NotFound,
    PreconditionViolation,
    ResourceExhausted,
)
from imagetraining.formats import DEFAULT_EXTENSIONS, describe
from imagetraining.names import session_name
from imagetraining.notifications import notify
from imagetraining.paths import resolve_directory
from imagetraining.settings import Settings
from imagetraining.states import ACTIVE_STATES, JobState, SessionState
from imagetraining.v1 import resources_pb2 as pb

SESSIONS_PAGE_DEFAULT, SESSIONS_PAGE_MAX = 50, 500
JOBS_PAGE_DEFAULT, JOBS_PAGE_MAX = 100, 1000

_SET_LOCK_TIMEOUT = text("SELECT set_config('lock_timeout', :ms, true)")

# The configured trainer: the one the most recently started worker announced.
_CONFIGURED_TRAINER = text(
    """
    SELECT trainer_name, trainer_version, model_digest, embedding_dimension
      FROM worker_trainers ORDER BY announced_at DESC, worker_id LIMIT 1
    """
)

# Trained images of a session whose stored features come from another trainer (RestartSession(ALL)
# decodes and trains exactly these again).
_STALE_IMAGES = text(
    """
    SELECT count(*) FROM training_jobs j JOIN image_assets a ON a.id = j.asset_id
     WHERE j.session_id = :id AND j.state = 'completed'
       AND (a.trainer_name IS DISTINCT FROM :trainer_name OR a.trainer_version IS DISTINCT FROM :trainer_version
            OR a.model_digest IS DISTINCT FROM :model_digest)
    """
)

_SUBDIRECTORIES = text(
    """
    SELECT path, selected, image_count, trained_count
      FROM session_subdirectories
     WHERE session_id = :id
     ORDER BY path
    """
)
# --------------------------------------------------------------------------------------------------
# Results that are not a Session.


@dataclass(frozen=True)
class Progress:
    name: str
    state: SessionState
    state_reason: str
    training: pb.TrainingProgress
    discovery: pb.DiscoveryProgress


# --------------------------------------------------------------------------------------------------


class SessionUseCases:
    """Use cases of TrainingSessionService over one database and the configured library roots (the
    servicer translates protobuf to these calls; "Sessions" alone would also name the domain objects)."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.roots = settings.library_roots
        self.counting = Counting(settings)
        self.idempotency = Idempotency(db, self._begin)

    @contextlib.asynccontextmanager
    async def _begin(self, call: str, session_id: int | None) -> AsyncIterator[AsyncConnection]:
        """A write transaction whose lock waits are bounded by the request's deadline.

        A lock not granted in time is UNAVAILABLE (retry: the holder is a worker's short write, or a
        frozen worker that PostgreSQL cuts off within seconds); a serialization failure or deadlock
        is ABORTED (a concurrent writer won).
        """
        try:
            async with self.db.engine.begin() as conn:
                await conn.execute(_SET_LOCK_TIMEOUT, {"ms": f"{round(lock_wait_seconds() * 1000)}ms"})
                yield conn
        except DBAPIError as exc:
            if faults.sqlstate(exc) == "55P03":
                raise session_busy(session_id, call) from None
            if faults.is_conflict(exc):
                raise concurrent_change(session_id, call) from None
            raise

    # ---- reads ---------------------------------------------------------------------------------

    async def _row(self, conn: AsyncConnection, session_id: int) -> RowMapping:
        row = (
            (await conn.execute(text("SELECT * FROM training_sessions WHERE id = :id"), {"id": session_id}))
            .mappings()
            .first()
        )
        if row is None:
            raise NotFound(session_name(session_id))
        return row

    async def _proto(self, conn: AsyncConnection, row: RowMapping) -> pb.Session:
        subdirectories = (await conn.execute(_SUBDIRECTORIES, {"id": row["id"]})).mappings().all()
        return convert.session_to_proto(row, subdirectories)

    async def get(self, session_id: int) -> pb.Session:
        """GetSession: the session with its subdirectories and progress, the configured trainer and
        how many of its images that trainer would retrain."""
        async with self.db.reads.connect() as conn:
            row = await self._row(conn, session_id)
            session = await self._proto(conn, row)
            if SessionState(row["state"]) in ACTIVE_STATES:
                # Counted between runs only: during one it moves with every chunk, and the count
                # (a join over the session's jobs) made GetSession take seconds under load (case 2).
                return session
            configured = (await conn.execute(_CONFIGURED_TRAINER)).mappings().first()
            if configured is not None:
                session.configured_trainer.CopyFrom(convert.trainer_to_proto(configured))
                params = {
                    "id": session_id,
                    **{k: configured[k] for k in ("trainer_name", "trainer_version", "model_digest")},
                }
                session.stale_images = int((await conn.execute(_STALE_IMAGES, params)).scalar_one())
            return session

    async def get_with_sequence(self, session_id: int) -> tuple[pb.Session, int]:
        """The session and its stored event sequence ceiling: the snapshot WatchSession starts with."""
        async with self.db.reads.connect() as conn:
            row = await self._row(conn, session_id)
            return await self._proto(conn, row), int(row["event_sequence"])

    async def progress(self, session_id: int) -> Progress:
        """GetSessionProgress: one primary-key read, no subdirectories."""
        async with self.db.reads.connect() as conn:
            row = await self._row(conn, session_id)
        return Progress(
            name=session_name(session_id),
            state=SessionState(row["state"]),
            state_reason=row["state_reason"],
            training=convert.training_progress(row),
            discovery=convert.discovery_progress(row),
        )

    async def list_sessions(
        self, page_size: int, page_token: str, state: SessionState | None
    ) -> tuple[list[pb.Session], str]:
        """ListSessions: newest first (id descending), keyset-paginated, without subdirectories."""
        limit = page_size_of(page_size, SESSIONS_PAGE_DEFAULT, SESSIONS_PAGE_MAX)
        scope = f"sessions;state={state.value if state else ''}"
        after = decode_token(page_token, scope)
        where = ["true"]
        params: dict[str, Any] = {"limit": limit + 1}
        if state is not None:
            where.append("state = :state")
            params["state"] = state.value
        if after is not None:
            where.append("id < :after")
            params["after"] = after
        sql = f"SELECT * FROM training_sessions WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT :limit"
        async with self.db.reads.connect() as conn:
            rows = (await conn.execute(text(sql), params)).mappings().all()
        page = rows[:limit]
        token = encode_token(int(page[-1]["id"]), scope) if len(rows) > limit else ""
        return [convert.session_to_proto(r) for r in page], token

    async def list_jobs(
        self, session_id: int, page_size: int, page_token: str, state: JobState | None
    ) -> tuple[list[pb.Job], str]:
        """ListJobs: per-image outcomes in job id order, joined with their asset."""
        limit = page_size_of(page_size, JOBS_PAGE_DEFAULT, JOBS_PAGE_MAX)
        scope = f"{session_name(session_id)}/jobs;state={state.value if state else ''}"
        after = decode_token(page_token, scope)
        where = ["j.session_id = :id"]
        params: dict[str, Any] = {"id": session_id, "limit": limit + 1}
        if state is not None:
            where.append("j.state = :state")
            params["state"] = state.value
        if after is not None:
            where.append("j.id > :after")
            params["after"] = after
        sql = f"""
            SELECT j.id, j.session_id, j.asset_id, j.state, j.error_class, j.error_message,
                   j.skip_reason, j.create_time, j.update_time, j.near_duplicate_distance,
                   a.path, a.perceptual_hash, a.hash_algorithm, a.width, a.height, a.format,
                   dup.path AS duplicate_of, near.path AS near_duplicate_of
              FROM training_jobs j
              JOIN image_assets a ON a.id = j.asset_id
              LEFT JOIN image_assets dup ON dup.id = j.duplicate_of_asset_id
              LEFT JOIN image_assets near ON near.id = j.near_duplicate_of_asset_id
             WHERE {" AND ".join(where)}
             ORDER BY j.id
             LIMIT :limit"""
        async with self.db.reads.connect() as conn:
            await self._row(conn, session_id)
            rows = (await conn.execute(text(sql), params)).mappings().all()
        page = rows[:limit]
        token = encode_token(int(page[-1]["id"]), scope) if len(rows) > limit else ""
        return [convert.job_to_proto(r) for r in page], token

    # ---- transitions ---------------------------------------------------------------------------

    async def _transition(self, conn: AsyncConnection, session_id: int, t: transitions.Transition) -> RowMapping:
        """One guarded UPDATE; on zero rows, the reason as an API error. Wakes the workers."""
        row = (await conn.execute(t.statement, t.params(session_id))).mappings().first()
        if row is None:
            await self._refusal(conn, session_id, t.call, t.source, t.need_selection)
        for statement in t.also:
            await conn.execute(statement, {"id": session_id})
        await notify(conn, session_id)
        return row

    async def _refusal(
        self, conn: AsyncConnection, session_id: int, call: str, allowed: Sequence[SessionState], need_selection: bool
    ) -> NoReturn:
        """Why a guarded UPDATE matched no row, as the error the client gets. Always raises."""
        current = (
            await conn.execute(
                text(
                    f"SELECT state, {transitions.HAS_SELECTION} AS has_selection FROM training_sessions WHERE id = :id"
                ),
                {"id": session_id},
            )
        ).first()
        if current is None:
            raise NotFound(session_name(session_id))
        if current.state not in allowed:
            raise wrong_state(call, session_id, current.state)
        if need_selection and not current.has_selection:
            raise no_selection(session_id)
        # The state and the selection allow it now, but did not when the UPDATE ran.
        raise concurrent_change(session_id, call)

    async def start(self, session_id: int, request_id: str = "") -> pb.Session:
        """StartSession: pending|failed -> discovering, committed and NOTIFYed. Touches no file."""

        async def work(conn: AsyncConnection) -> pb.Session:
            return await self._proto(conn, await self._transition(conn, session_id, transitions.START))

        return await self.idempotency.run("StartSession", request_id, session_id, work)

    async def restart(self, session_id: int, failed_only: bool, request_id: str = "") -> pb.Session:
        """RestartSession: completed|cancelled|failed -> discovering (all) or running (failed only)."""

        async def work(conn: AsyncConnection) -> pb.Session:
            if not failed_only:
                return await self._proto(conn, await self._transition(conn, session_id, transitions.RESTART_ALL))
            await self._transition(conn, session_id, transitions.RESTART_FAILED)
            row = (await conn.execute(transitions.RETRY_FAILED_JOBS, {"id": session_id})).mappings().one()
            return await self._proto(conn, row)

        return await self.idempotency.run("RestartSession", request_id, session_id, work)

    async def _simple_transition(self, session_id: int, t: transitions.Transition) -> pb.Session:
        async with self._begin(t.call, session_id) as conn:
            return await self._proto(conn, await self._transition(conn, session_id, t))

    async def pause(self, session_id: int) -> pb.Session:
        """PauseSession: discovering|running -> paused, remembering where to resume."""
        return await self._simple_transition(session_id, transitions.PAUSE)

    async def resume(self, session_id: int) -> pb.Session:
        """ResumeSession: paused -> the state it paused from."""
        return await self._simple_transition(session_id, transitions.RESUME)

    async def cancel(self, session_id: int) -> pb.Session:
        """CancelSession: any non-terminal state -> cancelled (workers never overwrite it)."""
        return await self._simple_transition(session_id, transitions.CANCEL)

    async def delete(self, session_id: int) -> None:
        """DeleteSession: one guarded DELETE; subdirectories and jobs cascade, assets stay."""
        async with self._begin("DeleteSession", session_id) as conn:
            allowed = transitions.EDITABLE
            deleted = (
                await conn.execute(transitions.DELETE, {"id": session_id, "allowed": [s.value for s in allowed]})
            ).first()
            if deleted is None:
                await self._refusal(conn, session_id, "DeleteSession", allowed, False)
            await notify(conn, session_id)

    # ---- edits ---------------------------------------------------------------------------------

    async def _lock(self, conn: AsyncConnection, session_id: int, call: str) -> RowMapping:
        """Lock the session row for a read-check-write; ABORTED if a concurrent change holds it."""
        # NOWAIT: a concurrent change in progress is ABORTED at once (retry after GetSession).
        try:
            row = (
                (
                    await conn.execute(
                        text("SELECT id, state, root_path FROM training_sessions WHERE id = :id FOR UPDATE NOWAIT"),
                        {"id": session_id},
                    )
                )
                .mappings()
                .first()
            )
        except DBAPIError as exc:
            if faults.sqlstate(exc) == "55P03":
                raise concurrent_change(session_id, call) from None
            raise
        if row is None:
            raise NotFound(session_name(session_id))
        return row

    async def update(self, session_id: int, display_name: str | None, config: dict[str, Any] | None) -> pb.Session:
        """UpdateSession: rename in any state; replace the config unless a run is active."""
        if display_name is not None:
            check_display_name(display_name)
            if not display_name.strip():
                raise InvalidArgument.field("display_name", "must not be empty")
        async with self._begin("UpdateSession", session_id) as conn:
            current = await self._lock(conn, session_id, "UpdateSession")
            if config is not None and current["state"] in ACTIVE_STATES:
                raise wrong_state("UpdateSession", session_id, current["state"])
            params = {
                "id": session_id,
                "display_name": display_name,
                "config": None if config is None else json.dumps(config),
            }
            row = (await conn.execute(transitions.EDIT, params)).mappings().one()
            return await self._proto(conn, row)

    def _resolve_selections(self, root: str, selections: Sequence[tuple[str, bool]]) -> dict[str, bool]:
        """Blocking: resolve each path under the root (a selected one must exist). Last one wins."""
        out: dict[str, bool] = {}
        for i, (raw, selected) in enumerate(selections):
            path = resolve_directory(raw, self.roots, f"selections[{i}].path", base=Path(root), must_exist=selected)
            out[str(path)] = selected
        return out

    async def update_subdirectories(self, session_id: int, selections: Sequence[tuple[str, bool]]) -> pb.Session:
        """UpdateSubdirectories: select / unselect (adding unknown paths under the root)."""
        if len(selections) > MAX_PATHS_PER_REQUEST:
            raise InvalidArgument.field("selections", f"at most {MAX_PATHS_PER_REQUEST} per request")
        async with self.db.reads.connect() as conn:
            root = (await self._row(conn, session_id))["root_path"]
        resolved = await asyncio.to_thread(self._resolve_selections, root, selections)
        async with self._begin("UpdateSubdirectories", session_id) as conn:
            current = await self._lock(conn, session_id, "UpdateSubdirectories")
            if current["state"] in ACTIVE_STATES:
                raise wrong_state("UpdateSubdirectories", session_id, current["state"])
            if resolved:
                await conn.execute(
                    text(
                        """
                        INSERT INTO session_subdirectories (session_id, path, selected)
                        SELECT :id, p, s FROM unnest(CAST(:paths AS text[]), CAST(:selected AS boolean[])) AS t(p, s)
                        ON CONFLICT (session_id, path) DO UPDATE SET selected = EXCLUDED.selected
                        """
                    ),
                    {"id": session_id, "paths": list(resolved), "selected": list(resolved.values())},
                )
                total = (
                    await conn.execute(
                        text("SELECT count(*) FROM session_subdirectories WHERE session_id = :id"), {"id": session_id}
                    )
                ).scalar_one()
                if total > MAX_SUBDIRECTORIES_PER_SESSION:
                    raise ResourceExhausted(
                        f"session {session_id} would hold {total} subdirectories; at most "
                        f"{MAX_SUBDIRECTORIES_PER_SESSION} per session: select a parent directory instead",
                        metadata={"limit": str(MAX_SUBDIRECTORIES_PER_SESSION)},
                    )
            row = (await conn.execute(transitions.TOUCH, {"id": session_id})).mappings().one()
            return await self._proto(conn, row)

    # ---- create --------------------------------------------------------------------------------

    def _resolve_create(
        self, root_path: str, subdirectories: Sequence[str], extensions: Sequence[str]
    ) -> tuple[Path, list[str], bool]:
        """Blocking: the resolved root, the subdirectory paths, and whether they are selected.

        Without subdirectories the choice is offered, unselected: the root itself first when it
        holds images directly (selecting it trains those and everything under it: a flat folder
        has nothing else to select), then its immediate subdirectories.
        """
        root = resolve_directory(root_path, self.roots, "root_path")
        if subdirectories:
            paths = [
                str(resolve_directory(raw, self.roots, f"subdirectories[{i}]", base=root))
                for i, raw in enumerate(subdirectories)
            ]
            return root, list(dict.fromkeys(paths)), True
        try:
            found, _more = walk.list_subdirectories(str(root), self.roots, MAX_PATHS_PER_REQUEST - 1)
            loose = walk.has_direct_images(
                str(root),
                extensions or DEFAULT_EXTENSIONS,
                self.roots,
                max_files=self.settings.scan_max_files,
                deadline=time.monotonic() + self.settings.scan_max_seconds,
            )
        except OSError as err:
            raise InvalidArgument.field("root_path", f"cannot be read: {err.strerror or err}") from None
        return root, ([str(root)] if loose else []) + found, False

    async def create(
        self,
        *,
        display_name: str,
        root_path: str,
        subdirectories: Sequence[str],
        config: dict[str, Any],
        request_id: str = "",
    ) -> pb.Session:
        """CreateSession: resolve and check the paths (in a thread), insert the session and its rows."""
        check_display_name(display_name)
        if len(subdirectories) > MAX_PATHS_PER_REQUEST:
            raise InvalidArgument.field("subdirectories", f"at most {MAX_PATHS_PER_REQUEST} per request")
        if request_id:
            stored = await self.idempotency.stored("CreateSession", request_id, None)
            if stored is not None:
                return stored
        root, paths, selected = await asyncio.to_thread(
            self._resolve_create, root_path, subdirectories, list(config.get("extensions") or ())
        )
        name = display_name.strip() or (root.name or str(root))[:MAX_DISPLAY_NAME]

        async def work(conn: AsyncConnection) -> pb.Session:
            session_id = (
                await conn.execute(
                    text(
                        """
                        INSERT INTO training_sessions
                               (display_name, root_path, config, create_request_id, event_sequence)
                        VALUES (:display_name, :root_path, CAST(:config AS jsonb), :request_id, 1)
                        RETURNING id
                        """
                    ),
                    {
                        "display_name": name,
                        "root_path": str(root),
                        "config": json.dumps(config),
                        "request_id": request_id or None,
                    },
                )
            ).scalar_one()
            if paths:
                await conn.execute(
                    text(
                        """
                        INSERT INTO session_subdirectories (session_id, path, selected)
                        SELECT :id, p, :selected FROM unnest(CAST(:paths AS text[])) AS t(p)
                        """
                    ),
                    {"id": session_id, "paths": paths, "selected": selected},
                )
            return await self._proto(conn, await self._row(conn, session_id))

        return await self.idempotency.run("CreateSession", request_id, None, work)

    # ---- counting (bounded, in a thread) -------------------------------------------------------

    async def scan_directory(
        self, path: str, extensions: Sequence[str], max_files: int, time_remaining: float | None
    ) -> ScanOutcome:
        """ScanDirectory: immediate subdirectories with recursive image counts, within a cap and deadline."""
        return await self.counting.scan_directory(path, extensions, max_files, time_remaining)

    async def validate(self, session_id: int, time_remaining: float | None) -> Validation:
        """ValidateSession: StartSession's checks and a bounded image count, changing nothing."""
        async with self.db.reads.connect() as conn:
            row = await self._row(conn, session_id)
            subdirectories = (await conn.execute(_SUBDIRECTORIES, {"id": session_id})).mappings().all()
        state = SessionState(row["state"])
        config = convert.config_to_proto(row["config"])
        exts = tuple(config.extensions)
        name = session_name(session_id)
        problems: list[PreconditionViolation] = []
        if state not in transitions.START.source and state not in transitions.RESTART_ALL.source:
            call = "StartSession" if state is SessionState.PENDING else "RestartSession"
            problems.append(wrong_state(call, session_id, state).violations[0])
        selected = [s["path"] for s in subdirectories if s["selected"]]
        if not selected:
            problems.append(no_selection(session_id).violations[0])
        unreadable, counts, truncated, image_count = await self.counting.count_selected(
            selected, exts, config.recursive, time_remaining
        )
        problems.extend(unreadable)
        if counts and image_count == 0 and not truncated:
            problems.append(
                PreconditionViolation(
                    "NO_IMAGES",
                    name,
                    f"Selected subdirectories contain no image files. Supported formats: {describe(exts)}. "
                    f"Searched: {', '.join(c.path for c in counts)}. "
                    "Select other subdirectories or change config.extensions.",
                )
            )
        return Validation(
            valid=not problems,
            problems=problems,
            state=state,
            image_count=image_count,
            truncated=truncated,
            selected=counts,
            subdirectories_total=len(subdirectories),
            subdirectories_selected=len(selected),
            supported_formats=exts,
        )
