"""Case 8, one session over many workers: the same 12 MP JPEGs trained by one worker, then by two.

    .venv/bin/python -m benchmarks --cases 8          (--quick: 40 images, else 200)

Any worker trains chunks of a running session it does not own (discovery_worker/helpers.py), so a
second worker should nearly double a session's training rate while the CPU is the bound. Measured
here, on its own database, with real worker processes of one pool process each
(IMAGETRAINING_POOL_SIZE=1, IMAGETRAINING_WORKER_ID bench-w1 and bench-w2):

- the training phase of one session (the session row's `discovery_finished_at` to `end_time`) with
  one worker, and of a session over a copy of the same files under another directory (new paths,
  so no stored hash is reused) with two; each repeat starts from empty tables, and the order of
  the two runs alternates between repeats;
- what the workers did, from `training_jobs`: the images each worker wrote (`trained_by`), and the
  chunks committed, counted as distinct (`trained_by`, `update_time`) groups (every RECORD_OUTCOMES
  commit stamps its jobs with its transaction's `now()`); pg_stat_statements would count the
  statements themselves, but it needs `shared_preload_libraries` and is usually not loaded;
- PostgreSQL's CPU over each session: the CPU time (/proc/PID/schedstat) of every backend of the
  benchmark database, when the server runs on this machine;
- the chunk statements alone (`chunk_statement_times`): RECLAIM_EXPIRED_CHUNKS + CLAIM_CHUNK, then
  TRAINING_FENCE + CHUNK_FENCE + the asset write + RECORD_OUTCOMES, as the worker sends them
  (discovery_worker/training.py), on a synthetic running session of pending jobs with no worker
  running, back to back on one connection: wall time per transaction and the backend's CPU;
- from those, how many workers one PostgreSQL could keep busy: (1 s / database seconds per chunk) x
  images per chunk / images per second of one worker.

The end-to-end run of case 7's library with one and two workers is `cases.case8_end_to_end_workers`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from benchmarks import harness as h
from benchmarks import hashing_bench
from discovery_worker.hashing import HASH_ALGORITHM
from discovery_worker.training import _WRITE_ASSETS
from imagetraining import transitions
from imagetraining.db.engine import Database
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc

CASE = "8 Many workers"
PER_FOLDER = 50
WORKER_IDS = ("bench-w1", "bench-w2")
FINISHED = ("completed", "failed", "cancelled")
# What DefaultTrainer stores per image (its shape and about its size), for the synthetic asset write.
# What the default trainer writes with each asset: its provenance and a 24-value embedding.
TRAINER = {"trainer_name": "default-colour-stats", "trainer_version": "2", "model_digest": ""}
EMBEDDING = "{" + ",".join(["0.2041241"] * 24) + "}"
FEATURES = json.dumps(
    {
        "mean_rgb": [121.53, 118.02, 117.61],
        "brightness": 118.93,
        "contrast": 41.27,
        "colourfulness": 38.11,
        "histogram_rgb": [[0.0312, 0.0981, 0.1733, 0.2151, 0.2012, 0.1501, 0.0902, 0.0408]] * 3,
        "aspect_ratio": 1.3333,
    }
)


# ---------------------------------------------------------------- data


def _write_one(args: tuple[str, int]) -> str:
    path, seed = args
    return hashing_bench.write(Path(path), 4000, 3000, seed=seed)


def generate(root: Path, count: int) -> h.Library:
    """`count` distinct photo-like 12 MP JPEGs (as case 5 makes them), PER_FOLDER to a folder, on all cores."""
    jobs = []
    for i in range(count):
        folder = root / f"d{i // PER_FOLDER:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"img{i:04d}.jpg"), 50_000 + i))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, cores)) as pool:
        list(pool.map(_write_one, jobs))
    return library(root, count)


def library(root: Path, count: int) -> h.Library:
    subdirs = sorted(str(p) for p in root.iterdir() if p.is_dir())
    return h.Library(root=root, subdirectories=subdirs, files=count, folders=len(subdirs))


# ---------------------------------------------------------------- PostgreSQL CPU


def _cpu_ns(pid: int) -> int | None:
    """CPU time of a local PostgreSQL process, from schedstat; None when it is not one of ours to read."""
    try:
        if not Path(f"/proc/{pid}/comm").read_text().startswith("postgres"):
            return None
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


async def backend_cpu(conn: asyncpg.Connection) -> dict[int, int] | None:
    """CPU nanoseconds of every backend of this database; None when the server is not local."""
    pids = [
        int(r["pid"]) for r in await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
    ]
    out = {}
    for pid in pids:
        ns = _cpu_ns(pid)
        if ns is None:
            return None
        out[pid] = ns
    return out


def cpu_seconds(before: dict[int, int] | None, after: dict[int, int] | None) -> float:
    """Backend CPU between two samples (a backend started in between counts from zero)."""
    if before is None or after is None:
        return float("nan")
    return sum(ns - before.get(pid, 0) for pid, ns in after.items()) / 1e9


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) of these processes and all their descendants (a worker's pool
    processes are children of its forkserver); a process gone meanwhile counts nothing."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
    return total


# ---------------------------------------------------------------- one session


@dataclass
class Run:
    """One session's training, from its row and its jobs."""

    workers: int
    images: int
    seconds: float  # discovery_finished_at -> end_time
    owner: str | None
    shares: dict[str, int]  # trained_by -> images written
    chunks: int  # RECORD_OUTCOMES commits: distinct (trained_by, update_time)
    lag: float  # last chunk commit -> end_time (the owner finishing)
    pg_cpu: float  # seconds of CPU of the database's backends from StartSession to the end
    worker_cpu: float  # seconds of CPU of the worker processes and their pools, the same span
    load: float  # the machine's 1-minute load average at the end (others' work included)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def helper_share(self) -> float:
        """Percent of the images written by workers other than the owner (nan: owner not seen)."""
        if self.owner is None or not self.images:
            return float("nan")
        return 100.0 * sum(n for w, n in self.shares.items() if w != self.owner) / self.images


async def train_once(
    stub: api_grpc.TrainingSessionServiceStub,
    url: str,
    lib: h.Library,
    label: str,
    workers: list[h.Service],
    timeout: float,
) -> Run:
    """Create and start a session over `lib`, wait until it ends, read what the workers did."""
    name = await h.create_session(stub, lib, label)
    sid = h.session_id(name)
    conn = await asyncpg.connect(url)
    try:
        pids = [w.proc.pid for w in workers]
        cpu0, wcpu0 = await backend_cpu(conn), tree_cpu(pids)
        started = time.perf_counter()
        await stub.StartSession(api.StartSessionRequest(name=name))
        owner = None
        deadline = time.monotonic() + timeout
        while True:
            state, owner_id = await conn.fetchrow("SELECT state, owner_id FROM training_sessions WHERE id = $1", sid)
            owner = owner or owner_id
            if state in FINISHED:
                wall = time.perf_counter() - started
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"case 8: {name} still {state} after {timeout:.0f}s")
            await asyncio.sleep(0.05)
        cpu1, wcpu1 = await backend_cpu(conn), tree_cpu(pids)
        row = dict(await conn.fetchrow("SELECT * FROM training_sessions WHERE id = $1", sid))
        if row["state"] != "completed":
            raise RuntimeError(f"case 8: {name} ended {row['state']}: {row['state_reason']}")
        jobs = await conn.fetch(
            """
            SELECT coalesce(trained_by, '?') AS worker, count(*) AS images,
                   count(DISTINCT update_time) AS chunks, max(update_time) AS last
              FROM training_jobs WHERE session_id = $1 GROUP BY 1
            """,
            sid,
        )
        relabelled = await conn.fetchval(
            "SELECT count(*) FROM training_jobs WHERE session_id = $1 AND state <> 'completed'", sid
        )
    finally:
        await conn.close()

    async def free() -> bool:
        return (await h.session_row(url, sid))["owner_id"] is None

    await h.wait_for(free, 30, f"session {sid} to be released", interval=0.05)
    last = max(r["last"] for r in jobs)
    run = Run(
        workers=len(workers),
        images=int(row["total_images"]),
        seconds=(row["end_time"] - row["discovery_finished_at"]).total_seconds(),
        owner=owner,
        shares={str(r["worker"]): int(r["images"]) for r in jobs},
        chunks=sum(int(r["chunks"]) for r in jobs),
        lag=(row["end_time"] - last).total_seconds(),
        pg_cpu=cpu_seconds(cpu0, cpu1),
        worker_cpu=wcpu1 - wcpu0,
        load=os.getloadavg()[0],
        extra={
            "wall_seconds": wall,
            "processed": row["processed_images"],
            "skipped": row["skipped_images"],
            "failed": row["failed_images"],
            "not_completed_jobs": relabelled,
            "discovery_seconds": (row["discovery_finished_at"] - row["discovery_started_at"]).total_seconds(),
        },
    )
    return run


def describe(run: Run, chunks: bool = True) -> str:
    """One log line. `chunks=False` where duplicates were relabelled at the finish (their jobs' update_time
    is the finish's, so neither the chunk count nor the last commit can be read from the jobs)."""
    shares = ", ".join(f"{w}{' (owner)' if w == run.owner else ''} {n}" for w, n in sorted(run.shares.items()))
    text = f"{run.images} images trained in {run.seconds:.2f}s = {run.rate:.1f} img/s; images by worker: {shares}"
    if chunks:
        text += (
            f"; {run.chunks} chunks ({run.chunks / run.seconds:.1f}/s, {run.images / max(run.chunks, 1):.1f} images"
            f" each); last chunk commit to completed {run.lag:.2f}s"
        )
    return (
        f"{text}; CPU from StartSession to completed: workers {run.worker_cpu:.2f}s, PostgreSQL "
        f"{run.pg_cpu:.2f}s; load average {run.load:.1f}"
    )


# ---------------------------------------------------------------- the chunk statements alone


async def _synthetic_session(url: str, jobs: int) -> int:
    """A running session with `jobs` pending jobs over as many unhashed assets (no worker may run)."""
    await h.reset_sessions(url)
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            sid = await conn.fetchval(
                """
                INSERT INTO training_sessions (display_name, root_path, state, config, total_final, total_images,
                                               start_time, discovery_started_at, discovery_finished_at)
                VALUES ('chunk-statements', '/synthetic', 'running', '{}', true, $1, now(), now(), now())
                RETURNING id
                """,
                jobs,
            )
            sub = await conn.fetchval(
                "INSERT INTO session_subdirectories (session_id, path, selected, image_count)"
                " VALUES ($1, '/synthetic/a', true, $2) RETURNING id",
                sid,
                jobs,
            )
            await conn.execute(
                "INSERT INTO image_assets (path, size_bytes, mtime_ns)"
                " SELECT '/synthetic/a/img' || lpad(g::text, 7, '0') || '.jpg', 3500000, 1"
                " FROM generate_series(1, $1) g",
                jobs,
            )
            await conn.execute(
                "INSERT INTO training_jobs (session_id, asset_id, subdirectory_id)"
                " SELECT $1, id, $2 FROM image_assets ORDER BY id",
                sid,
                sub,
            )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return int(sid)


@dataclass
class StatementTimes:
    chunk: int  # images per chunk
    chunks: int  # chunks timed per repeat
    claim_ms: list[float]  # per repeat: median ms of the claim transaction
    write_ms: list[float]  # per repeat: median ms of the write transaction
    total_ms: list[float]  # per repeat: median ms of both
    cpu_ms: list[float]  # per repeat: the backend's CPU ms per chunk (nan when the server is not local)


async def chunk_statement_times(url: str, jobs: int, chunk: int, chunks: int, repeats: int) -> StatementTimes:
    """Claim and write `chunks` chunks of `chunk` jobs as a worker does, one connection, back to back."""
    out = StatementTimes(chunk, chunks, [], [], [], [])
    warm = 5
    for r in range(repeats):
        sid = await _synthetic_session(url, jobs)
        # The worker's connection settings (custom plans); one connection, so one backend to read.
        db = Database.connect(url, pool_size=1, max_overflow=0, custom_plans=True)
        try:
            async with db.engine.connect() as conn:
                pid = int((await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one())
            claims, writes, totals = [], [], []
            after = 0
            cpu0 = None
            for i in range(warm + chunks):
                if i == warm:
                    cpu0 = _cpu_ns(pid)
                token = str(uuid.uuid4())
                t0 = time.perf_counter()
                async with db.engine.begin() as conn:
                    await conn.execute(transitions.RECLAIM_EXPIRED_CHUNKS, {"id": sid})
                    rows = (
                        await conn.execute(
                            transitions.CLAIM_CHUNK,
                            {
                                "id": sid,
                                "after": after,
                                "limit": chunk,
                                "token": token,
                                "worker": "bench-synthetic",
                                "lease": 30.0,
                                "algorithm": HASH_ALGORITHM,
                                **TRAINER,
                            },
                        )
                    ).all()
                t1 = time.perf_counter()
                if len(rows) != chunk:
                    raise RuntimeError(f"case 8: claimed {len(rows)} jobs, not {chunk} (too few jobs prepared?)")
                job_ids = [int(x.job_id) for x in rows]
                asset_ids = [int(x.asset_id) for x in rows]
                after = job_ids[-1]
                n = len(job_ids)
                async with db.engine.begin() as conn:
                    if (await conn.execute(transitions.TRAINING_FENCE, {"id": sid})).first() is None:
                        raise RuntimeError("case 8: the synthetic session is not running")
                    held = (await conn.execute(transitions.CHUNK_FENCE, {"job_ids": job_ids, "token": token})).all()
                    if len(held) != n:
                        raise RuntimeError("case 8: the synthetic chunk was lost")
                    await conn.execute(
                        _WRITE_ASSETS,
                        {
                            "algorithm": HASH_ALGORITHM,
                            "asset_ids": asset_ids,
                            "hashes": [f"{(a * 2654435761) % 2**64:016x}" for a in asset_ids],
                            "digests": [f"{a:032x}" for a in asset_ids],
                            "widths": [4000] * n,
                            "heights": [3000] * n,
                            "formats": ["JPEG"] * n,
                            "features": [FEATURES] * n,
                            "embeddings": [EMBEDDING] * n,
                            "sizes": [3500000] * n,
                            "mtimes": [1] * n,
                            **TRAINER,
                        },
                    )
                    await conn.execute(
                        transitions.RECORD_OUTCOMES,
                        {
                            "id": sid,
                            "token": token,
                            "worker": "bench-synthetic",
                            "seconds": 0.2,
                            "nested_ids": [],
                            "job_ids": job_ids,
                            "states": ["completed"] * n,
                            "error_classes": [""] * n,
                            "error_messages": [""] * n,
                            "skip_reasons": [""] * n,
                            "duplicate_of": [None] * n,
                            "near_of": [None] * n,
                            "near_distances": [None] * n,
                        },
                    )
                t2 = time.perf_counter()
                if i >= warm:
                    claims.append(1000 * (t1 - t0))
                    writes.append(1000 * (t2 - t1))
                    totals.append(1000 * (t2 - t0))
            cpu1 = _cpu_ns(pid)
        finally:
            await db.dispose()
        out.claim_ms.append(h.median(claims))
        out.write_ms.append(h.median(writes))
        out.total_ms.append(h.median(totals))
        cpu = (cpu1 - cpu0) / 1e6 / chunks if cpu0 is not None and cpu1 is not None else float("nan")
        out.cpu_ms.append(cpu)
        h.log(
            f"case 8 chunk statements repeat {r + 1}: {chunks} chunks of {chunk} over {jobs:,} jobs: claim "
            f"{out.claim_ms[-1]:.2f} ms, write {out.write_ms[-1]:.2f} ms, both {out.total_ms[-1]:.2f} ms "
            f"(medians); backend CPU {cpu:.2f} ms per chunk"
        )
    await h.reset_sessions(url)
    return out


# ---------------------------------------------------------------- the case


async def run_case(
    count: int, repeats: int, scratch: Path, server_url: str, *, timeout: float, synthetic_jobs: int
) -> tuple[list[h.Row], dict[str, Any]]:
    """Case 8 for the suite: rows, and the raw figures for the JSON."""
    base = scratch / "many"
    t0 = time.perf_counter()
    one = await asyncio.to_thread(generate, base / "one", count)
    await asyncio.to_thread(shutil.copytree, base / "one", base / "two")  # the same bytes under new paths
    two = library(base / "two", count)
    h.log(
        f"case 8: generated {count} 12 MP JPEGs (and a copy under another directory) in {time.perf_counter() - t0:.1f}s"
    )
    # Same-run baseline for one worker: the same files through a TrainingPool of 1 in this process
    # (case 5's "pool of 1"), before any service runs.
    paths = sorted(str(p) for p in one.root.rglob("*.jpg"))
    _startup, alone = await hashing_bench.pool_samples(1, {"12MP": paths}, repeats)
    h.log(f"case 8: TrainingPool of 1 alone: {', '.join(f'{x:.1f}' for x in alone['12MP'])} img/s")
    runs: dict[int, list[Run]] = {1: [], 2: []}
    services: list[h.Service] = []
    async with h.fresh_database(server_url) as db:
        logs = scratch / "case8-services"  # its own logs (the suite's cluster numbers its logs from 1 too)
        logs.mkdir(exist_ok=True)
        # The shipped poll, heartbeat and lease (settings.py defaults), not the harness's quick ones: a
        # worker polling every 0.2 s spends about 4% of a core on it (0.45 CPU-s in a 5 s run of 2
        # workers), which on this 2-core machine comes straight out of the pool's share.
        cluster = h.Cluster(
            db.url,
            [base],
            logs,
            worker_env={
                "IMAGETRAINING_POOL_SIZE": "1",
                "IMAGETRAINING_POLL_SECONDS": "2",
                "IMAGETRAINING_HEARTBEAT_SECONDS": "2",
                "IMAGETRAINING_LEASE_SECONDS": "10",
            },
        )
        try:
            await cluster.start_control()
            async with h.channel(cluster.address) as chan:
                stub = api_grpc.TrainingSessionServiceStub(chan)
                services.append(await cluster.start_worker(IMAGETRAINING_WORKER_ID=WORKER_IDS[0]))
                for r in range(repeats):
                    await h.reset_sessions(db.url)
                    for workers in (1, 2) if r % 2 == 0 else (2, 1):
                        if workers == 2:
                            services.append(await cluster.start_worker(IMAGETRAINING_WORKER_ID=WORKER_IDS[1]))
                        lib = one if workers == 1 else two
                        running = [w for w in (cluster.worker, *cluster.extra_workers) if w is not None]
                        run = await train_once(stub, db.url, lib, f"c8-{workers}w-{r}", running, timeout)
                        if workers == 2:
                            await cluster.stop_extra_workers()
                        runs[workers].append(run)
                        h.log(f"case 8 repeat {r + 1}, {workers} worker(s): {describe(run)}")
        finally:
            await cluster.stop()  # no worker may run during the statement timing
        problems = [f"{s.log_path.name}: {line}" for s in services for line in s.problems()]
        for line in problems[:20]:
            h.log(f"case 8 worker log: {line}")
        per_chunk = [run.images / max(run.chunks, 1) for run in runs[2]]
        chunk = max(4, round(h.median(per_chunk)))
        jobs = max(synthetic_jobs, 210 * chunk)
        statements = await chunk_statement_times(db.url, jobs=jobs, chunk=chunk, chunks=200, repeats=repeats)
    rows = rows_for(count, runs, statements, problems, alone["12MP"])
    raw = {
        "runs": {str(k): [v.__dict__ | {"rate": v.rate} for v in vs] for k, vs in runs.items()},
        "chunk_statements": statements.__dict__,
        "pool_of_1_alone": alone["12MP"],
        "worker_log_problems": problems,
    }
    return rows, raw


def rows_for(
    count: int, runs: dict[int, list[Run]], st: StatementTimes, problems: list[str], alone: list[float]
) -> list[h.Row]:
    one, two = runs[1], runs[2]
    r1, r2 = [x.rate for x in one], [x.rate for x in two]
    m1, m2 = h.median(r1), h.median(r2)
    cps1, cps2 = [x.chunks / x.seconds for x in one], [x.chunks / x.seconds for x in two]
    ipc1, ipc2 = [x.images / max(x.chunks, 1) for x in one], [x.images / max(x.chunks, 1) for x in two]
    lag1, lag2 = [x.lag for x in one], [x.lag for x in two]
    helper = [x.helper_share for x in two]
    # Cores the workers (event loops and pools) got while the session ran: what two pools of 1 can use
    # on a 2-core machine shared with others.
    cores1 = [x.worker_cpu / x.extra["wall_seconds"] for x in one]
    cores2 = [x.worker_cpu / x.extra["wall_seconds"] for x in two]
    loads = ", ".join(f"{x.load:.1f}" for x in [*one, *two])
    per_image1 = [1000 * x.worker_cpu / x.images for x in one]
    per_image2 = [1000 * x.worker_cpu / x.images for x in two]
    cpu_real = [1000 * x.pg_cpu / max(x.chunks, 1) for x in two]
    cpu_one = [1000 * x.pg_cpu / max(x.chunks, 1) for x in one]
    per_second = "; ".join(
        f"{w} worker(s) {h.median([x.pg_cpu / x.extra['wall_seconds'] for x in runs[w]]):.3f} CPU-s per second"
        for w in (1, 2)
    )
    label = f"{count} 12MP JPEGs"
    db_ms = h.median(st.total_ms)
    decode_ms = 1000 * st.chunk / m1  # one chunk's images in one pool process, at the one-worker rate
    workers = (1000 / db_ms) * st.chunk / m1
    cpu_ms = h.median(st.cpu_ms)
    by_cpu = (1000 / cpu_ms) * st.chunk / m1
    by_lock = (1000 / h.median(st.write_ms)) * st.chunk / m1
    real_ms = h.median(cpu_real)
    by_real = (1000 / real_ms) * st.chunk / m1
    shares = "; ".join(
        ", ".join(f"{w}{' (owner)' if w == x.owner else ''} {n}" for w, n in sorted(x.shares.items())) for x in two
    )
    rows = [
        h.Row(
            CASE,
            f"training img/s, {label}, 1 worker (pool of 1)",
            m1,
            "img/s",
            r1,
            baseline="TrainingPool of 1 alone",
            baseline_value=h.median(alone),
            ratio=m1 / h.median(alone),
            note="total_images / (end_time - discovery_finished_at) of the session row; every image decoded "
            "(new paths, empty tables each repeat)",
        ),
        h.Row(
            CASE,
            f"training img/s, {label}, 2 workers (pool of 1 each)",
            m2,
            "img/s",
            r2,
            baseline="1 worker",
            baseline_value=m1,
            ratio=m2 / m1,
            aim=">= 1.8x 1 worker",
            met=m2 / m1 >= 1.8,
            note=f"the same bytes under another directory; images by worker per repeat: {shares}",
        ),
        h.Row(
            CASE,
            "cores used by the workers, 2 workers",
            h.median(cores2),
            "cores",
            cores2,
            baseline="1 worker",
            baseline_value=h.median(cores1),
            ratio=h.median(cores2) / h.median(cores1),
            note="CPU seconds of the worker processes and their pools / StartSession to completed; the "
            f"machine's 1-minute load average (ours included) at the end of each run: {loads}",
        ),
        h.Row(
            CASE,
            "workers' CPU per image, 2 workers",
            h.median(per_image2),
            "ms",
            per_image2,
            baseline="1 worker",
            baseline_value=h.median(per_image1),
            ratio=h.median(per_image2) / h.median(per_image1),
            note="the same CPU seconds / images: what helping costs the workers, whatever share of the "
            "machine they got",
        ),
        h.Row(
            CASE,
            "images written by the helper, 2 workers",
            h.median(helper),
            "%",
            helper,
            note="trained_by other than the session's owner; 50% is an even split",
        ),
        h.Row(
            CASE,
            "chunks committed/s, 2 workers",
            h.median(cps2),
            "chunks/s",
            cps2,
            baseline="1 worker",
            baseline_value=h.median(cps1),
            ratio=h.median(cps2) / h.median(cps1),
            note="distinct (trained_by, update_time) of the session's jobs (one per RECORD_OUTCOMES commit) / "
            "training seconds; pg_stat_statements is not used (it needs shared_preload_libraries)",
        ),
        h.Row(
            CASE,
            "images per chunk, 2 workers",
            h.median(ipc2),
            "images",
            ipc2,
            baseline="1 worker",
            baseline_value=h.median(ipc1),
            ratio=h.median(ipc2) / h.median(ipc1),
        ),
        h.Row(
            CASE,
            "last chunk commit to completed, 2 workers",
            h.median(lag2),
            "s",
            lag2,
            baseline="1 worker",
            baseline_value=h.median(lag1),
            ratio=h.median(lag2) / h.median(lag1) if h.median(lag1) > 0 else None,
            note="the owner's finish (duplicates resolved, FINISH); counted in the training phase",
        ),
        h.Row(
            CASE,
            f"database time per chunk of {st.chunk} (claim + write), synthetic",
            db_ms,
            "ms",
            st.total_ms,
            baseline=f"{st.chunk} images at the 1-worker rate",
            baseline_value=decode_ms,
            ratio=db_ms / decode_ms,
            note=f"median of {st.chunks} chunks x {len(st.total_ms)} repeats, one connection, statements of "
            "imagetraining.transitions back to back, no worker running",
        ),
        h.Row(CASE, "  claim: RECLAIM_EXPIRED_CHUNKS + CLAIM_CHUNK", h.median(st.claim_ms), "ms", st.claim_ms),
        h.Row(
            CASE,
            "  write: TRAINING_FENCE + CHUNK_FENCE + assets + RECORD_OUTCOMES",
            h.median(st.write_ms),
            "ms",
            st.write_ms,
            note="the session row stays locked from TRAINING_FENCE to the commit: one session's chunk writes "
            "are serialised",
        ),
        h.Row(CASE, "  PostgreSQL backend CPU per chunk, synthetic", cpu_ms, "ms", st.cpu_ms),
        h.Row(
            CASE,
            "PostgreSQL CPU per chunk, 2-worker run",
            h.median(cpu_real),
            "ms",
            cpu_real,
            baseline="1 worker",
            baseline_value=h.median(cpu_one),
            ratio=h.median(cpu_real) / h.median(cpu_one) if h.median(cpu_one) > 0 else None,
            note="CPU of every backend of the database from StartSession to completed / chunks: discovery, "
            f"heartbeats, polls and the finish included (synthetic chunk alone: {cpu_ms:.2f} ms); {per_second}",
        ),
        h.Row(
            CASE,
            "workers one PostgreSQL can feed (estimate)",
            workers,
            "workers",
            note=f"(1000 ms / {db_ms:.2f} ms per chunk) x {st.chunk} images per chunk / {m1:.1f} img/s per worker "
            f"= {workers:.0f}; with the backend's CPU only ({cpu_ms:.2f} ms) {by_cpu:.0f} per PostgreSQL core; "
            f"one session's writes alone (session row lock, {h.median(st.write_ms):.2f} ms) {by_lock:.0f}; with "
            f"the 2-worker run's PostgreSQL CPU per chunk ({real_ms:.2f} ms, polls and heartbeats included) "
            f"{by_real:.0f} per PostgreSQL core",
        ),
    ]
    if problems:
        rows.append(
            h.Row(
                CASE,
                "warnings and errors in the workers' logs",
                float(len(problems)),
                "lines",
                note=problems[0][:200],
            )
        )
    return rows
