"""The cases of issue #5 that run the real services (1, 2, 3, 4, 6, 7, 8) and their same-run baselines.

Topology: the benchmark process is only a client (and reads rows). The control service and the
discovery worker run as real processes (`python -m control_service`, `python -m discovery_worker`),
so no case measures one service's latency on an event loop the other one is busy with.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil

from benchmarks import harness as h
from benchmarks import many_workers, seed
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc

TERMINAL = (pb.SESSION_STATE_COMPLETED, pb.SESSION_STATE_FAILED, pb.SESSION_STATE_CANCELLED)
PROGRESS = (pb.EVENT_KIND_DISCOVERY_PROGRESS, pb.EVENT_KIND_TRAINING_PROGRESS)


@dataclass
class Sizes:
    big_files: int
    big_folders: int
    small_files: int
    calls: int  # StartSession calls per size and repeat
    idle_calls: int  # GetSession calls on an idle system
    repeats: int
    subscribers: tuple[int, ...]
    watch_files: int  # library of the progress-delivery session (case 6)
    e2e_timeout: float


QUICK = Sizes(
    big_files=6_000,
    big_folders=120,
    small_files=100,
    calls=50,
    idle_calls=200,
    repeats=2,
    subscribers=(1, 10, 100),
    watch_files=2_000,
    e2e_timeout=120,
)
FULL = Sizes(
    big_files=100_000,
    big_folders=2_000,
    small_files=100,
    calls=250,
    idle_calls=500,
    repeats=3,
    subscribers=(1, 100, 1000),
    watch_files=10_000,
    e2e_timeout=900,
)


@dataclass
class Context:
    sizes: Sizes
    url: str  # the benchmark database
    scratch: Path
    big: h.Library
    small: h.Library
    watch: h.Library
    cluster: h.Cluster
    rows: list[h.Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    completed_big: str | None = None  # a completed session over the big library (for the rescan)
    seed_first: seed.SeedResult | None = None


def ms(seconds: float) -> float:
    return seconds * 1000.0


def since(a: dt.datetime | None, b: dt.datetime | None) -> float:
    return (b - a).total_seconds() if a is not None and b is not None else float("nan")


async def wait_state(
    stub: api_grpc.TrainingSessionServiceStub, name: str, states: tuple[int, ...], timeout: float
) -> int:
    deadline = time.monotonic() + timeout
    while True:
        state = (await stub.GetSessionProgress(api.GetSessionProgressRequest(name=name))).state
        if state in states:
            return int(state)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} still in {pb.SessionState.Name(state)} after {timeout:.0f}s")
        await asyncio.sleep(0.05)


async def released(url: str, sid: int, timeout: float = 30) -> None:
    """Until no worker owns the session (so that its rows may be truncated)."""

    async def free() -> bool:
        return (await h.session_row(url, sid))["owner_id"] is None

    await h.wait_for(free, timeout, f"session {sid} to be released", interval=0.05)


async def seed_first(ctx: Context) -> seed.SeedResult:
    """The seed's StartSession over the big library on an empty table (measured once per run)."""
    if ctx.seed_first is None:
        h.log(f"seed's way: first StartSession over {ctx.big.files:,} files (blocking, inline hashing)")
        ctx.seed_first = await seed.measure(ctx.url, ctx.big.subdirectories, fresh=True)
        ctx.raw["seed_first"] = ctx.seed_first.__dict__
        h.log(
            f"seed's way: {ctx.seed_first.seconds:.1f}s ({ctx.seed_first.files / ctx.seed_first.seconds:,.0f} files/s)"
        )
    return ctx.seed_first


# ---------------------------------------------------------------- case 1


async def case1_start_latency(ctx: Context, stub: api_grpc.TrainingSessionServiceStub) -> None:
    """StartSession p50/p99 over `calls` sessions of each size, no worker running (the call alone)."""
    s = ctx.sizes
    p50: dict[str, list[float]] = {"small": [], "big": []}
    p99: dict[str, list[float]] = {"small": [], "big": []}
    for r in range(s.repeats):
        await h.reset_sessions(ctx.url)
        for label, lib in (("small", ctx.small), ("big", ctx.big)):
            names = [await h.create_session(stub, lib, f"c1-{label}-{i}") for i in range(s.calls)]
            await stub.StartSession(api.StartSessionRequest(name=names[0]))  # warm the path
            latencies = []
            for name in names[1:]:
                t0 = time.perf_counter()
                await stub.StartSession(api.StartSessionRequest(name=name))
                latencies.append(ms(time.perf_counter() - t0))
            p50[label].append(h.percentile(latencies, 50))
            p99[label].append(h.percentile(latencies, 99))
            h.log(f"case 1 repeat {r + 1}: {label} p50 {p50[label][-1]:.2f} ms p99 {p99[label][-1]:.2f} ms")
    await h.reset_sessions(ctx.url)
    first = await seed_first(ctx)
    small_n, big_n = f"{ctx.small.files:,}", f"{ctx.big.files:,}"
    calls = f"{s.calls - 1} calls x {s.repeats} repeats; no worker running (the call itself)"
    for q, data in (("p50", p50), ("p99", p99)):
        small, big = h.median(data["small"]), h.median(data["big"])
        ctx.rows.append(
            h.Row(
                "1 StartSession",
                f"{q}, {small_n} images",
                small,
                "ms",
                data["small"],
                aim="p99 < 10 ms" if q == "p99" else "",
                met=small < 10 if q == "p99" else None,
                note=calls if q == "p50" else "",
            )
        )
        ctx.rows.append(
            h.Row(
                "1 StartSession",
                f"{q}, {big_n} images",
                big,
                "ms",
                data["big"],
                baseline=f"{small_n} images",
                baseline_value=small,
                ratio=big / small,
                aim="p99 < 10 ms, ratio < 1.2" if q == "p99" else "",
                met=(big < 10 and big / small < 1.2) if q == "p99" else None,
            )
        )
    big99 = h.median(p99["big"])
    ctx.rows.append(
        h.Row(
            "1 StartSession",
            f"p99, {big_n} images vs the seed's way",
            big99,
            "ms",
            p99["big"],
            baseline="seed's way (1 call)",
            baseline_value=ms(first.seconds),
            ratio=ms(first.seconds) / big99,
            ratio_kind="faster",
            note="seed's way: glob + SELECT/INSERT per file + inline dhash, one call, measured once",
        )
    )


# ---------------------------------------------------------------- case 3


def find_rate(lib: h.Library) -> float:
    find = shutil.which("find")
    if find is None:
        return float("nan")
    t0 = time.perf_counter()
    out = subprocess.run([find, str(lib.root), "-type", "f", "-printf", "%s %T@\n"], capture_output=True, check=True)
    seconds = time.perf_counter() - t0
    return out.stdout.count(b"\n") / seconds


def glob_rate(lib: h.Library) -> float:
    t0 = time.perf_counter()
    n = 0
    for sub in lib.subdirectories:
        for p in Path(sub).glob("**/*"):
            if p.is_file():
                p.stat()
                n += 1
    return n / (time.perf_counter() - t0)


def scandir_rate(lib: h.Library) -> float:
    import os

    t0 = time.perf_counter()
    n = 0
    stack = [str(lib.root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file():
                    e.stat()
                    n += 1
    return n / (time.perf_counter() - t0)


async def case3_discovery(ctx: Context, stub: api_grpc.TrainingSessionServiceStub) -> None:
    """Discovery of the big library, warm page cache: walk, stat, upsert assets and jobs; then cancel."""
    s = ctx.sizes
    rates, finds, globs, scans = [], [], [], []
    for r in range(s.repeats):
        await h.reset_sessions(ctx.url)
        finds.append(find_rate(ctx.big))
        globs.append(glob_rate(ctx.big))
        scans.append(scandir_rate(ctx.big))
        name = await h.create_session(stub, ctx.big, f"c3-{r}")
        sid = h.session_id(name)
        await stub.StartSession(api.StartSessionRequest(name=name))

        async def walked(sid: int = sid) -> bool:
            return bool((await h.session_row(ctx.url, sid))["total_final"])

        await h.wait_for(walked, s.e2e_timeout, "discovery to finish", interval=0.05)
        await stub.CancelSession(api.CancelSessionRequest(name=name))
        row = await h.session_row(ctx.url, sid)
        seconds = since(row["discovery_started_at"], row["discovery_finished_at"])
        rates.append(row["images_found"] / seconds)
        h.log(f"case 3 repeat {r + 1}: {row['images_found']:,} files in {seconds:.2f}s = {rates[-1]:,.0f} files/s")
        await released(ctx.url, sid)
    await h.reset_sessions(ctx.url)
    h.log("seed's way without hashing (glob + one query per file)")
    walk_only = await seed.measure(ctx.url, ctx.big.subdirectories, fresh=True, hash_images=False)
    first = await seed_first(ctx)
    n = f"{ctx.big.files:,} files / {ctx.big.folders:,} folders"
    rate = h.median(rates)
    ctx.rows += [
        h.Row(
            "3 Discovery",
            f"files/s, {n}",
            rate,
            "files/s",
            rates,
            baseline="find -printf",
            baseline_value=h.median(finds),
            ratio=rate / h.median(finds),
            aim=">= 50,000 files/s",
            met=rate >= 50_000,
            note="discovery_started_at to discovery_finished_at (walk, stat, set-based upserts of assets and jobs)",
        ),
        h.Row(
            "3 Discovery",
            "vs the seed's walk + query per file",
            rate,
            "files/s",
            rates,
            baseline="seed, no hashing",
            baseline_value=walk_only.files / walk_only.seconds,
            ratio=rate / (walk_only.files / walk_only.seconds),
            ratio_kind="faster",
        ),
        h.Row(
            "3 Discovery",
            "vs the seed's whole StartSession",
            rate,
            "files/s",
            rates,
            baseline="seed, with dhash",
            baseline_value=first.files / first.seconds,
            ratio=rate / (first.files / first.seconds),
            ratio_kind="faster",
        ),
        h.Row("3 Discovery", "walk floor: Path.glob + stat (Python)", h.median(globs), "files/s", globs),
        h.Row("3 Discovery", "walk floor: os.scandir + stat (Python)", h.median(scans), "files/s", scans),
    ]


# ---------------------------------------------------------------- cases 2 and 7


async def get_latencies(stub: api_grpc.TrainingSessionServiceStub, name: str, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await stub.GetSession(api.GetSessionRequest(name=name))
        out.append(ms(time.perf_counter() - t0))
    return out


async def case2_7_end_to_end(ctx: Context, stub: api_grpc.TrainingSessionServiceStub, record: bool = True) -> None:
    """A big session from StartSession to completed, GetSession probed every 10 ms meanwhile."""
    s = ctx.sizes
    repeats = s.repeats if record else 1
    idle99, load99, load50, idle50, totals = [], [], [], [], []
    phases: dict[str, list[float]] = {"claim": [], "discovery": [], "training": []}
    for r in range(repeats):
        await h.reset_sessions(ctx.url)
        probe = await h.create_session(stub, ctx.small, "idle-probe")
        await get_latencies(stub, probe, 20)
        idle = await get_latencies(stub, probe, s.idle_calls)
        name = await h.create_session(stub, ctx.big, f"e2e-{r}")
        sid = h.session_id(name)
        t0 = time.perf_counter()
        await stub.StartSession(api.StartSessionRequest(name=name))
        loaded: list[float] = []
        while True:
            c0 = time.perf_counter()
            session = (await stub.GetSession(api.GetSessionRequest(name=name))).session
            loaded.append(ms(time.perf_counter() - c0))
            if session.state in TERMINAL:
                total = time.perf_counter() - t0
                break
            if time.perf_counter() - t0 > s.e2e_timeout:
                raise TimeoutError(f"end to end: {name} not done after {s.e2e_timeout:.0f}s")
            await asyncio.sleep(0.01)
        row = await h.session_row(ctx.url, sid)
        if row["state"] != "completed":
            raise RuntimeError(f"end to end: {name} ended {row['state']}: {row['state_reason']}")
        await released(ctx.url, sid)
        ctx.completed_big = name
        if not record:
            return
        idle50.append(h.percentile(idle, 50))
        idle99.append(h.percentile(idle, 99))
        load50.append(h.percentile(loaded, 50))
        load99.append(h.percentile(loaded, 99))
        totals.append(total)
        phases["claim"].append(since(row["start_time"], row["discovery_started_at"]))
        phases["discovery"].append(since(row["discovery_started_at"], row["discovery_finished_at"]))
        phases["training"].append(since(row["discovery_finished_at"], row["end_time"]))
        h.log(
            f"case 7 repeat {r + 1}: {total:.1f}s (claim {phases['claim'][-1]:.2f}s, discovery "
            f"{phases['discovery'][-1]:.2f}s, training {phases['training'][-1]:.1f}s; processed "
            f"{row['processed_images']:,}, skipped {row['skipped_images']:,}, failed {row['failed_images']:,}; "
            f"end_time to the GetSession that saw it {total - since(row['start_time'], row['end_time']):.2f}s, "
            f"that call {loaded[-1]:.1f} ms, slowest call {max(loaded):.1f} ms); "
            f"GetSession p99 idle {idle99[-1]:.2f} ms, loaded {load99[-1]:.2f} ms over {len(loaded)} calls"
        )
        ctx.raw.setdefault("end_to_end", []).append(
            {"total_seconds": total, **{k: v[-1] for k, v in phases.items()}, "get_calls_under_load": len(loaded)}
        )
    n = f"{ctx.big.files:,} files"
    i99, l99 = h.median(idle99), h.median(load99)
    first = await seed_first(ctx)
    total = h.median(totals)
    ctx.rows += [
        h.Row("2 GetSession", "p50 idle", h.median(idle50), "ms", idle50, note=f"{s.idle_calls} sequential calls"),
        h.Row("2 GetSession", "p99 idle", i99, "ms", idle99),
        h.Row(
            "2 GetSession",
            f"p50 while {n} discover and train",
            h.median(load50),
            "ms",
            load50,
            baseline="idle p50",
            baseline_value=h.median(idle50),
            ratio=h.median(load50) / h.median(idle50),
        ),
        h.Row(
            "2 GetSession",
            f"p99 while {n} discover and train",
            l99,
            "ms",
            load99,
            baseline="idle p99",
            baseline_value=i99,
            ratio=l99 / i99,
            aim="< 20 ms and < 3x idle",
            met=l99 < 20 and l99 / i99 < 3,
            note="one call every 10 ms from StartSession to completed, same session",
        ),
        h.Row(
            "7 End to end",
            f"StartSession to completed, {n}",
            total,
            "s",
            totals,
            baseline="seed's way (1 call)",
            baseline_value=first.seconds,
            ratio=first.seconds / total,
            ratio_kind="faster",
            note="the seed's way hashes with dhash only; here every image is also decoded for features and "
            "duplicates are resolved",
        ),
        h.Row("7 End to end", "  phase: queued until claimed", h.median(phases["claim"]), "s", phases["claim"]),
        h.Row("7 End to end", "  phase: discovery", h.median(phases["discovery"]), "s", phases["discovery"]),
        h.Row(
            "7 End to end",
            "  phase: training",
            h.median(phases["training"]),
            "s",
            phases["training"],
            note=f"training rate {ctx.big.files / h.median(phases['training']):,.0f} images/s (tiny 32x32 JPEGs)",
        ),
    ]


# ---------------------------------------------------------------- case 4


async def case4_rescan(ctx: Context, stub: api_grpc.TrainingSessionServiceStub) -> None:
    """RestartSession(ALL) of a completed big session over unchanged files: walk, compare, nothing decoded."""
    s = ctx.sizes
    if ctx.completed_big is None:
        h.log("case 4 needs a completed session over the big library: running one end to end (not recorded)")
        await case2_7_end_to_end(ctx, stub, record=False)
    assert ctx.completed_big is not None
    name, sid = ctx.completed_big, h.session_id(ctx.completed_big)
    rates, totals, touched = [], [], []
    for r in range(s.repeats):
        conn = await asyncpg.connect(ctx.url)
        try:
            before = await conn.fetchval("SELECT now()")
        finally:
            await conn.close()
        t0 = time.perf_counter()
        await stub.RestartSession(api.RestartSessionRequest(name=name, scope=api.RESTART_SCOPE_ALL))
        await wait_state(stub, name, TERMINAL, s.e2e_timeout)
        totals.append(time.perf_counter() - t0)
        row = await h.session_row(ctx.url, sid)
        seconds = since(row["discovery_started_at"], row["discovery_finished_at"])
        rates.append(row["files_seen"] / seconds)
        conn = await asyncpg.connect(ctx.url)
        try:
            touched.append(
                await conn.fetchval(
                    "SELECT count(*) FROM training_jobs WHERE session_id = $1 AND update_time >= $2", sid, before
                )
            )
        finally:
            await conn.close()
        h.log(
            f"case 4 repeat {r + 1}: {row['files_seen']:,} files in {seconds:.2f}s = {rates[-1]:,.0f} files/s; "
            f"unchanged {row['assets_unchanged']:,}, new {row['assets_new']}, changed {row['assets_changed']}; "
            f"jobs touched {touched[-1]}; restart to completed {totals[-1]:.2f}s"
        )
        await released(ctx.url, sid)
    h.log("seed's way again over the same files (rows exist: SELECT per file + dhash again)")
    again = await seed.measure(ctx.url, ctx.big.subdirectories, fresh=False)
    rate = h.median(rates)
    ctx.rows += [
        h.Row(
            "4 Rescan",
            f"files/s, {ctx.big.files:,} unchanged files",
            rate,
            "files/s",
            rates,
            baseline="seed's way again",
            baseline_value=again.files / again.seconds,
            ratio=rate / (again.files / again.seconds),
            ratio_kind="faster",
            aim=">= 100,000 files/s",
            met=rate >= 100_000,
            note="discovery phase of RestartSession(ALL); the seed's way decodes every file again",
        ),
        h.Row("4 Rescan", "RestartSession to completed", h.median(totals), "s", totals),
        h.Row(
            "4 Rescan",
            "jobs re-queued or decoded again",
            h.median([float(t) for t in touched]),
            "",
            [float(t) for t in touched],
            aim="0",
            met=max(touched) == 0,
        ),
    ]


# ---------------------------------------------------------------- case 6


async def case6_delivery(ctx: Context, stub: api_grpc.TrainingSessionServiceStub) -> None:
    """Worker event_time to subscriber receipt for progress events, with N subscribers on one session."""
    s = ctx.sizes
    assert ctx.cluster.control is not None
    control = psutil.Process(ctx.cluster.control.proc.pid)
    for n in s.subscribers:
        p50s, p99s, per_sub_kib, counts = [], [], [], []
        for r in range(s.repeats):
            await h.reset_sessions(ctx.url)
            name = await h.create_session(stub, ctx.watch, f"c6-{n}-{r}")
            channels = [h.channel(ctx.cluster.address) for _ in range(max(1, min(8, n // 50)))]
            try:
                stubs = [api_grpc.TrainingSessionServiceStub(c) for c in channels]
                warm = stubs[0].WatchSession(api.WatchSessionRequest(name=name))
                await warm.read()
                rss0 = control.memory_info().rss
                calls = [stubs[i % len(stubs)].WatchSession(api.WatchSessionRequest(name=name)) for i in range(n)]
                await asyncio.gather(*(c.read() for c in calls))  # every one has its snapshot
                rss1 = control.memory_info().rss
                per_sub_kib.append((rss1 - rss0) / n / 1024)
                latencies: list[float] = []

                async def read(call: Any, latencies: list[float] = latencies) -> None:
                    while True:
                        response = await call.read()
                        now = time.time()
                        if response is grpc.aio.EOF:
                            return
                        event = response.event
                        if event.kind in PROGRESS:
                            latencies.append(ms(now - event.event_time.ToNanoseconds() / 1e9))
                        if event.state in TERMINAL:
                            return

                readers = [asyncio.create_task(read(c)) for c in calls]
                warm.cancel()
                await stub.StartSession(api.StartSessionRequest(name=name))
                await asyncio.wait_for(asyncio.gather(*readers), s.e2e_timeout)
            finally:
                for c in channels:
                    await c.close()
            await released(ctx.url, h.session_id(name))
            p50s.append(h.percentile(latencies, 50))
            p99s.append(h.percentile(latencies, 99))
            counts.append(len(latencies))
            h.log(
                f"case 6 {n} subscribers repeat {r + 1}: p50 {p50s[-1]:.1f} ms p99 {p99s[-1]:.1f} ms over "
                f"{len(latencies):,} receipts; control RSS +{per_sub_kib[-1]:.1f} KiB per subscriber"
            )
        label = f"{n:,} subscriber" + ("s" if n > 1 else "")
        one = next((row for row in ctx.rows if row.metric == "p99, 1 subscriber"), None)
        ctx.rows += [
            h.Row(
                "6 Progress delivery",
                f"p50, {label}",
                h.median(p50s),
                "ms",
                p50s,
                note=f"{h.median([float(c) for c in counts]):,.0f} progress receipts per repeat"
                if n == s.subscribers[-1]
                else "",
            ),
            h.Row(
                "6 Progress delivery",
                f"p99, {label}",
                h.median(p99s),
                "ms",
                p99s,
                baseline="1 subscriber" if one is not None else "",
                baseline_value=one.value if one else None,
                ratio=h.median(p99s) / one.value if one else None,
                aim="< 50 ms" if n >= 1000 else "",
                met=h.median(p99s) < 50 if n >= 1000 else None,
            ),
            h.Row(
                "6 Progress delivery", f"control RSS per subscriber, {label}", h.median(per_sub_kib), "KiB", per_sub_kib
            ),
        ]


# ---------------------------------------------------------------- case 8 (end to end, 1 and 2 workers)


async def case8_end_to_end_workers(ctx: Context, stub: api_grpc.TrainingSessionServiceStub) -> None:
    """Case 7's session (the big library of tiny JPEGs) with the suite's worker alone, then with a second
    worker started beside it (same settings); the order alternates between repeats. The rest of case
    8 (12 MP images, pools of 1, the chunk statements) is benchmarks/many_workers.py."""
    s = ctx.sizes
    totals: dict[int, list[float]] = {1: [], 2: []}
    rates: dict[int, list[float]] = {1: [], 2: []}
    helper: list[float] = []
    runs: list[dict[str, Any]] = []
    services: list[h.Service] = []
    first = ctx.cluster.worker
    seen = len(first.problems()) if first is not None else 0  # the first worker's earlier cases' lines
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(ctx.cluster.stop_extra_workers)
        for r in range(s.repeats):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                await h.reset_sessions(ctx.url)
                if workers == 2:
                    services.append(await ctx.cluster.start_worker())
                running = [w for w in (ctx.cluster.worker, *ctx.cluster.extra_workers) if w is not None]
                run = await many_workers.train_once(
                    stub, ctx.url, ctx.big, f"c8-e2e-{workers}w-{r}", running, s.e2e_timeout
                )
                total = float(run.extra["wall_seconds"])
                if workers == 2:
                    await ctx.cluster.stop_extra_workers()
                    helper.append(run.helper_share)
                totals[workers].append(total)
                runs.append(run.__dict__)
                rates[workers].append(run.rate)
                h.log(
                    f"case 8 end to end repeat {r + 1}, {workers} worker(s): {total:.1f}s "
                    f"(discovery {run.extra['discovery_seconds']:.2f}s); {many_workers.describe(run, chunks=False)}"
                )
    problems = [f"{first.log_path.name}: {line}" for line in first.problems()[seen:]] if first is not None else []
    problems += [f"{svc.log_path.name}: {line}" for svc in services for line in svc.problems()]
    for line in problems[:20]:
        h.log(f"case 8 end to end, worker log: {line}")
    ctx.raw["case8_end_to_end"] = {
        "totals": totals,
        "rates": rates,
        "helper_share": helper,
        "runs": runs,
        "problems": problems,
    }
    n = f"{ctx.big.files:,} tiny files (case 7)"
    t1, t2 = h.median(totals[1]), h.median(totals[2])
    q1, q2 = h.median(rates[1]), h.median(rates[2])
    ctx.rows += [
        h.Row(many_workers.CASE, f"end to end, {n}, 1 worker", t1, "s", totals[1]),
        h.Row(
            many_workers.CASE,
            f"end to end, {n}, 2 workers",
            t2,
            "s",
            totals[2],
            baseline="1 worker",
            baseline_value=t1,
            ratio=t1 / t2,
            ratio_kind="faster",
            note="StartSession to completed; the suite's worker settings (IMAGETRAINING_POOL_SIZE=0: a pool "
            "process per core) for both workers",
        ),
        h.Row(many_workers.CASE, "  training phase, 1 worker", q1, "img/s", rates[1]),
        h.Row(
            many_workers.CASE,
            "  training phase, 2 workers",
            q2,
            "img/s",
            rates[2],
            baseline="1 worker",
            baseline_value=q1,
            ratio=q2 / q1,
            note=f"images written by the helper: {', '.join(f'{x:.0f}%' for x in helper)} (one per repeat)",
        ),
    ]


# ---------------------------------------------------------------- orchestration


async def run(ctx: Context, cases: set[int]) -> None:
    cluster = ctx.cluster
    await cluster.start_control()
    try:
        async with contextlib.AsyncExitStack() as stack:
            chan = await stack.enter_async_context(h.channel(cluster.address))
            stub = api_grpc.TrainingSessionServiceStub(chan)
            if 1 in cases:
                h.log("case 1: StartSession latency")
                await case1_start_latency(ctx, stub)
            if cases & {2, 3, 4, 6, 7, 8}:
                await cluster.start_worker()
            if 3 in cases:
                h.log("case 3: discovery throughput")
                await case3_discovery(ctx, stub)
            if cases & {2, 7}:
                h.log("cases 2 and 7: end to end, GetSession under load")
                await case2_7_end_to_end(ctx, stub)
            if 4 in cases:
                h.log("case 4: rescan of unchanged files")
                await case4_rescan(ctx, stub)
            if 6 in cases:
                h.log("case 6: progress delivery")
                await case6_delivery(ctx, stub)
            if 8 in cases:
                h.log("case 8: end to end of case 7's library with 1 and 2 workers")
                await case8_end_to_end_workers(ctx, stub)
    finally:
        await cluster.stop()
