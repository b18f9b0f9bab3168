"""Discovery (state `discovering`): walk the selected subdirectories and record assets and jobs.

Three modules, one per job: the walk's thread cuts batches (discovery_worker/walker.py), the
recorder writes each batch in one fenced transaction (discovery_worker/recorder.py), and this module
runs them: it reads batch k+1's rows while batch k writes, and makes the end-of-walk transition.

A library that goes away is not a library that shrank (discovery_worker/library.py): the roots and
selected directories are recorded as anchors when a run's discovery starts and checked when a
claim resumes it; whenever a directory or file fails with an error that could mean "offline", and
once more before the walk is declared complete, the anchors on its way are checked. One missing,
unreadable or replaced raises `LibraryOffline`: the batch in hand is not written, the total is never
finalised from a cut-short walk, and the runner pauses the session with the path in its reason.

Exact counters after a crash (the walk restarts from the beginning; it is deterministic):
- the walk's own counters (directories, files, images, unreadable) count the current pass from
  zero, so they are written as `GREATEST(stored, walk's)`: they never go backwards and end equal to
  the true counts of a full pass;
- new / changed / unchanged cannot be re-derived by a second pass (what the crashed pass upserted
  now looks unchanged). The checkpoint stores how many images of the walk order the committed
  batches covered (`{"images": K}`, in the same transaction as the counters), and a re-walk counts
  only images from position K on. Every image is still upserted (idempotent), so a file added in
  the meantime is never missed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row

from discovery_worker.claims import FenceLost, RunContext, fence
from discovery_worker.faultpoints import fault_point
from discovery_worker.plan import Plan, load_plan, nested_ids, no_images_reason, tops_within_roots
from discovery_worker.recorder import SUBDIRECTORY_COUNTS, DiscoveryTotals, anchor_library, probe, write_batch
from discovery_worker.walker import WalkBatch, walk_thread
from imagetraining import transitions
from imagetraining.notifications import notify

log = logging.getLogger(__name__)

# Batches waiting for the writer; the walk blocks beyond this (memory bound, back-pressure).
QUEUE_BATCHES = 2


async def finish(ctx: RunContext, plan: Plan, final: WalkBatch) -> tuple[str, int]:
    """Fenced end of the walk: -> running with the final total, or -> failed when nothing was found.

    Returns (new state, total images). Raises FenceLost.
    """
    sid = ctx.claim.session_id
    fault_point("before_running_transition")
    async with ctx.db.engine.begin() as conn:
        if await fence(conn, ctx.claim, "discovering") is None:
            raise FenceLost
        if final.images_found == 0:
            row = dict(
                (await conn.execute(transitions.NO_IMAGES, {"id": sid, "reason": no_images_reason(plan)}))
                .mappings()
                .one()
            )
        else:
            if ctx.trainer is not None:
                t = ctx.trainer
                params = {"trainer_name": t.name, "trainer_version": t.version, "model_digest": t.model_digest}
                reopened = (await conn.execute(transitions.REOPEN_STALE_JOBS, {"id": sid, **params})).scalar_one()
                if reopened:
                    log.info("session %d: %d images trained by another trainer than %s", sid, reopened, t.describe())
            row = dict((await conn.execute(transitions.TO_RUNNING, {"id": sid})).mappings().one())
        ctx.acknowledge(row)
        await conn.execute(SUBDIRECTORY_COUNTS, {"id": sid, "nested_ids": nested_ids(plan.subdirectories)})
        await notify(conn, sid)
    ctx.state(row)
    return str(row["state"]), int(row["total_images"])


async def run_discovery(ctx: RunContext) -> tuple[str, int, DiscoveryTotals, WalkBatch | None]:
    """Walk and write until done; returns (state reached: 'running' | 'failed' | 'stopped', total, totals, last batch).

    Raises FenceLost when a write found the session no longer ours.
    """
    plan = await load_plan(ctx)
    tops = await asyncio.to_thread(tops_within_roots, plan, ctx.roots)
    anchors = await anchor_library(ctx, plan, tops)
    totals = DiscoveryTotals()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[WalkBatch] = asyncio.Queue(maxsize=QUEUE_BATCHES)
    abort = threading.Event()
    walker = loop.run_in_executor(None, walk_thread, ctx, plan, anchors, loop, queue, abort)
    stop_wait = asyncio.ensure_future(ctx.stop.event.wait())
    final: WalkBatch | None = None
    ahead: tuple[WalkBatch, asyncio.Task[Sequence[Row[Any]]] | None] | None = None
    try:
        while True:
            if ahead is None:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if ctx.stop.is_set():
                    getter.cancel()
                    return "stopped", 0, totals, final
                batch = getter.result()
                if batch.error is not None:
                    raise batch.error
                probed = None
            else:
                batch, reading = ahead
                ahead = None
                if batch.error is not None:
                    raise batch.error
                probed = None if reading is None else await reading
            if not batch.done and not queue.empty():
                # Read the next batch's rows while this one writes (see `probe`).
                following = queue.get_nowait()
                reading = None if following.error is not None else asyncio.create_task(probe(ctx, following))
                ahead = (following, reading)
            await write_batch(ctx, batch, totals, probed)
            final = batch
            if batch.done:
                break
            if ctx.stop.is_set():
                return "stopped", 0, totals, final
        state, total = await finish(ctx, plan, batch)
        return state, total, totals, final
    finally:
        stop_wait.cancel()
        if ahead is not None and ahead[1] is not None:
            ahead[1].cancel()
            await asyncio.gather(ahead[1], return_exceptions=True)
        # The thread has finished, or returns within ~0.2 s of this (its walk and its put poll `abort`).
        abort.set()
        await asyncio.wait({walker}, timeout=5.0)
