"""A worker that stops answering (SIGSTOP: a stalled VM, a partition) while it holds its session row's lock.

The worker freezes itself inside a fenced training transaction (IMAGETRAINING_FAULT_POINT with the
`stop` action), so it holds the session row locked, as a frozen worker does in production. Required
(issue #9, items 1 and 2): PostgreSQL ends the frozen transaction (idle_in_transaction_session_timeout
on the worker's connections), another worker takes the session over within lease + a few seconds,
client transitions answer within their deadline meanwhile, WatchSession subscribers follow the new
owner at once and end with the committed counters, and the frozen worker writes nothing after SIGCONT.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from control_service.server import ControlServer, serve
from imagetraining.db import faults
from imagetraining.db.engine import Database
from imagetraining.settings import Settings
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc
from tests import worker_support as ws
from tests.conftest import wait_for
from tests.images import photo_folders

FREEZE = "training_chunk_before_commit:3:stop"


async def row_locked(db: Database, sid: int) -> bool:
    """Is the session row locked by another transaction right now?"""
    try:
        async with db.engine.begin() as conn:
            await conn.execute(text("SELECT 1 FROM training_sessions WHERE id = :id FOR UPDATE NOWAIT"), {"id": sid})
    except DBAPIError as exc:
        if faults.sqlstate(exc) == "55P03":
            return True
        raise
    return False


async def start(stub: api_grpc.TrainingSessionServiceStub, root: Path, folders: list[Path]) -> tuple[str, int]:
    created = await stub.CreateSession(
        api.CreateSessionRequest(root_path=str(root), subdirectories=[str(f) for f in folders])
    )
    await stub.StartSession(api.StartSessionRequest(name=created.session.name))
    return created.session.name, int(created.session.name.split("/")[1])


async def owner_pid(db: Database, sid: int) -> int | None:
    owner = (await ws.session(db, sid))["owner_id"]
    return int(owner.split(":")[1]) if owner else None


@pytest.mark.slow
async def test_a_frozen_owner_loses_the_session_and_subscribers_follow_the_new_one(
    clean_db: Database,
    db_url: str,
    library: Path,
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    worker_processes: list[ws.WorkerProcess],
) -> None:
    folders = photo_folders(library, folders=4, per_folder=150)
    env = ws.paced_env(
        db_url, library, tmp_path, IMAGETRAINING_LEASE_SECONDS="3", IMAGETRAINING_HEARTBEAT_SECONDS="0.5"
    )
    control: ControlServer = await serve(make_settings(), database=clean_db)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{control.port}") as channel:
            stub = api_grpc.TrainingSessionServiceStub(channel)
            name, sid = await start(stub, library, folders)
            arrivals: list[list[tuple[float, pb.SessionEvent]]] = [[] for _ in range(3)]
            calls = [stub.WatchSession(api.WatchSessionRequest(name=name)) for _ in arrivals]

            async def collect(i: int) -> None:
                async for response in calls[i]:
                    arrivals[i].append((time.monotonic(), response.event))

            readers = [asyncio.create_task(collect(i)) for i in range(len(calls))]

            frozen = ws.WorkerProcess({**env, "IMAGETRAINING_FAULT_POINT": FREEZE}, tmp_path / "frozen.log")
            worker_processes.append(frozen)
            await wait_for(lambda: ws.frozen(frozen), timeout=60, what="the worker to freeze in a chunk write")
            frozen_at = time.monotonic()
            # As in the field report: frozen inside a transaction that holds the session row's lock.
            assert await row_locked(clean_db, sid)
            assert await owner_pid(clean_db, sid) == frozen.proc.pid

            rescuer = ws.WorkerProcess(env, tmp_path / "rescuer.log")
            worker_processes.append(rescuer)

            async def taken_over() -> bool:
                return await owner_pid(clean_db, sid) == rescuer.proc.pid

            # Lease 3 s, the frozen transaction ended by PostgreSQL after 2 s: well within lease + a few seconds.
            await wait_for(taken_over, timeout=15, interval=0.05, what="the second worker to take over")
            took_over_at = time.monotonic()
            assert took_over_at - frozen_at < 3 + 5, (took_over_at - frozen_at, rescuer.log()[-2000:])

            async def completed() -> dict[str, Any] | None:
                row = await ws.session(clean_db, sid)
                return row if row["state"] == "completed" else None

            row = await wait_for(completed, timeout=90, what="the session to complete", interval=0.1)
            await asyncio.wait_for(asyncio.gather(*readers), timeout=20)
            for i, got in enumerate(arrivals):
                events = [e for _t, e in got]
                assert all(a.sequence < b.sequence for a, b in itertools.pairwise(events)), i
                last = events[-1]
                assert last.state == pb.SESSION_STATE_COMPLETED
                # The terminal message carries the committed counters, not a stale copy.
                assert (
                    last.training.processed_images,
                    last.training.failed_images,
                    last.training.skipped_images,
                    last.training.total_images,
                ) == (row["processed_images"], row["failed_images"], row["skipped_images"], row["total_images"])
                assert last.training.processed_images == 600
                # Subscribers followed the new owner at once, not after tens of seconds of silence.
                after = [t for t, _e in got if t > took_over_at]
                assert after and after[0] - took_over_at < 5, (i, after[:1], took_over_at)

            # The frozen worker wakes up: its transaction is gone and its lease with it; it writes nothing.
            jobs_before = await ws.jobs(clean_db, sid)
            os.kill(frozen.proc.pid, signal.SIGCONT)

            async def noticed() -> bool:
                return f"session {sid}: stopped" in frozen.log() or "lease" in frozen.log()

            await wait_for(noticed, timeout=20, what="the woken worker to give up the session")
            assert await ws.jobs(clean_db, sid) == jobs_before
            final = await ws.session(clean_db, sid)
            assert final["state"] == "completed" and ws.counters(final) == ws.counters(row)
    finally:
        await control.stop()


@pytest.mark.slow
async def test_client_transitions_answer_within_their_deadline_while_a_frozen_worker_holds_the_row(
    clean_db: Database,
    db_url: str,
    library: Path,
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    worker_processes: list[ws.WorkerProcess],
) -> None:
    folders = photo_folders(library, folders=2, per_folder=100)
    # Lease 10 s: PostgreSQL ends the frozen transaction after 5 s (half the lease).
    env = ws.paced_env(db_url, library, tmp_path, IMAGETRAINING_LEASE_SECONDS="10", IMAGETRAINING_HEARTBEAT_SECONDS="1")
    control = await serve(make_settings(), database=clean_db)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{control.port}") as channel:
            stub = api_grpc.TrainingSessionServiceStub(channel)
            name, sid = await start(stub, library, folders)
            frozen = ws.WorkerProcess({**env, "IMAGETRAINING_FAULT_POINT": FREEZE}, tmp_path / "frozen.log")
            worker_processes.append(frozen)
            await wait_for(lambda: ws.frozen(frozen), timeout=60, what="the worker to freeze in a chunk write")
            frozen_at = time.monotonic()
            assert await row_locked(clean_db, sid)

            # A 2 s deadline: answered before it, UNAVAILABLE with the advice to retry (not DEADLINE_EXCEEDED).
            began = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.PauseSession(api.PauseSessionRequest(name=name), timeout=2.0)
            assert time.monotonic() - began < 2.0
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert "retry" in (info.value.details() or "")

            # Retried as the message says: it succeeds once PostgreSQL has ended the frozen transaction.
            async def paused() -> bool:
                try:
                    await stub.PauseSession(api.PauseSessionRequest(name=name), timeout=2.0)
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                    return False
                return True

            await wait_for(paused, timeout=15, interval=0.2, what="PauseSession to succeed")
            assert time.monotonic() - frozen_at < 5 + 4
            assert (await ws.session(clean_db, sid))["state"] == "paused"

            jobs_before = await ws.jobs(clean_db, sid)
            os.kill(frozen.proc.pid, signal.SIGCONT)

            async def released() -> bool:
                return f"session {sid}: stopped" in frozen.log()

            await wait_for(released, timeout=20, what="the woken worker to let the paused session go")
            assert await ws.jobs(clean_db, sid) == jobs_before
            assert (await ws.session(clean_db, sid))["state"] == "paused"
    finally:
        await control.stop()
