"""Case 9, similarity search: FindSimilarImages latency at N stored 512-d vectors, exact and HNSW.

    .venv/bin/python -m benchmarks --cases 9          (--quick: 5,000 vectors and 20 queries, else 100,000 and 200)

Issue #13's benchmark: "Search latency p50/p99 at 100,000 stored vectors, exact and with the HNSW
index, with recall@10 of the index against the exact answer". No service process: the benchmark
calls `control_service.search.Search.find_similar` directly (what the servicer calls), on a
`Database` made as the control service makes its own, so a figure is the search's SQL plus its
round trips, without gRPC.

Two fresh databases hold the same N random L2-normalised float4[512] embeddings (one seed), stored
as the trained assets of one trainer and the completed jobs of one session, written with COPY and
one INSERT ... SELECT:

- (a) on the suite's server (the machine's PostgreSQL; pgvector is dropped from the database if
  that server has it), where search is exact in SQL: `unnest(embedding, query)` summed per row;
- (b) on an embedded pgserver started in the scratch directory (it ships pgvector), where search
  uses `<=>` on `embedding::vector(512)`.

Then Q random unit query vectors (k = 10), each mode once more per repeat, one call at a time
after a few untimed calls:

1. exact, SQL unnest, (a), session scope;
2. exact, pgvector, (b), session scope (a session's search never uses the index);
3. exact, pgvector, (b), every image, before the index exists;
4. HNSW, (b), every image, after building `ix_image_assets_embedding_hnsw_512` as the worker
   does (`imagetraining.vectors.build_hnsw_index`: `CREATE INDEX CONCURRENTLY ... USING hnsw ...
   WHERE cardinality(embedding) = 512` with maintenance_work_mem 512 MB), whose build time is reported.

5. on a fresh database of (b), N vectors gathered around 2,000 centres (a photo library's
   embeddings have neighbourhoods; uniform random vectors in 512 dimensions have none and are the
   worst case of an approximate index): exact pgvector once, for the truth, then the index built
   again and its passes.

Reported: p50 and p99 of each (medians over repeats), each p50 against mode 1's, recall@10 of mode
4 against mode 2 and of mode 5's index against its exact pass (the share of the exact ten the
index returned, over all queries), and whether modes 1 and 2 returned the same ten images. Mode 1
costs seconds a query at 100,000 vectors, so a pass stops at `budget` seconds (at least MIN_QUERIES
queries); the note says how many ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
from sqlalchemy import text

from benchmarks import harness as h
from control_service import search as search_sql
from control_service.search import Search
from discovery_worker.hashing import HASH_ALGORITHM
from imagetraining.db import engine as db_engine
from imagetraining.db.engine import Database, start_embedded, to_libpq_url
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.vectors import build_hnsw_index, hnsw_ef_search, hnsw_index_name

CASE = "9 Similarity search"
DIMENSION = 512
K = 10
CHUNK = 5_000  # vectors generated and copied at a time (5,000 x 512 float4 = 10 MB)
WARMUP = 3
MIN_QUERIES = 10
PART_QUERIES = 20  # queries for the statements timed alone
WIDER_EF = (100, 400)  # hnsw.ef_search values whose recall is measured besides what Search sets (hnsw_ef_search)
DATA_SEED = 913
QUERY_SEED = 1913
# The second data set: vectors around CLUSTERS centres, as a photo library's embeddings gather
# around its events and subjects (uniform random vectors in 512 dimensions, the first set, have no
# neighbourhoods at all: every vector is nearly as far from a query as the nearest one, the worst
# case of any approximate index). SPREAD is the noise's length against the unit centre: two
# members of a cluster are about 0.2 apart in cosine distance, two clusters about 1.0.
CLUSTERS = 2_000
SPREAD = 0.5
TRAINER = ("bench-encoder", "1.0", "b" * 64)
ASSET_COLUMNS = (
    "path",
    "size_bytes",
    "mtime_ns",
    "perceptual_hash",
    "hash_algorithm",
    "width",
    "height",
    "format",
    "trainer_name",
    "trainer_version",
    "model_digest",
    "embedding",
)


@dataclass
class Pass:
    """One mode's timed queries of one repeat."""

    latencies_ms: list[float]
    results: list[list[int]]  # asset ids, nearest first, one list per query
    exact: set[bool] = field(default_factory=set)


def unit_vectors(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, DIMENSION), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def centres() -> np.ndarray:
    return unit_vectors(CLUSTERS, DATA_SEED + 7)


def clustered(rng: np.random.Generator, count: int, around: np.ndarray) -> np.ndarray:
    """`count` unit vectors, each a random centre of `around` plus noise of length about SPREAD."""
    picks = rng.integers(0, len(around), count)
    x = around[picks] + rng.standard_normal((count, DIMENSION), dtype=np.float32) * np.float32(
        SPREAD / np.sqrt(DIMENSION)
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


async def populate(url: str, count: int, around: np.ndarray | None = None) -> tuple[int, float]:
    """The session, `count` trained assets with embeddings (COPY, CHUNK at a time) and their
    completed jobs (one INSERT ... SELECT); then VACUUM ANALYZE. Returns (session id, seconds).
    The embeddings are uniform random unit vectors, or gathered `around` the given centres."""
    t0 = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        name, version, digest = TRAINER
        sid = int(
            await conn.fetchval(
                """
                INSERT INTO training_sessions (display_name, root_path, state, trainer_name, trainer_version,
                       model_digest, embedding_dimension, total_images, processed_images, total_final,
                       start_time, end_time)
                VALUES ('search bench', '/bench/search', 'completed', $1, $2, $3, $4, $5, $5, true, now(), now())
                RETURNING id
                """,
                name,
                version,
                digest,
                DIMENSION,
                count,
            )
        )
        rng = np.random.default_rng(DATA_SEED)
        for start in range(0, count, CHUNK):
            n = min(CHUNK, count - start)
            if around is None:
                x = rng.standard_normal((n, DIMENSION), dtype=np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
            else:
                x = clustered(rng, n, around)
            records = [
                (
                    f"/bench/search/d{i // 1000:03d}/img{i:06d}.jpg",
                    1000 + i % 997,
                    1_700_000_000_000_000_000 + i,
                    f"{i:016x}",
                    HASH_ALGORITHM,
                    32,
                    32,
                    "JPEG",
                    name,
                    version,
                    digest,
                    row,
                )
                for i, row in zip(range(start, start + n), x.tolist(), strict=True)
            ]
            await conn.copy_records_to_table("image_assets", records=records, columns=ASSET_COLUMNS)
            del records, x
        await conn.execute(
            """
            INSERT INTO training_jobs (session_id, asset_id, state, trained_by, attempts)
            SELECT $1, id, 'completed', 'bench', 1 FROM image_assets ORDER BY id
            """,
            sid,
        )
        await conn.execute("VACUUM ANALYZE image_assets")
        await conn.execute("VACUUM ANALYZE training_jobs")
        await conn.execute("ANALYZE training_sessions")
    finally:
        await conn.close()
    return sid, time.perf_counter() - t0


async def timed_pass(
    search: Search, queries: np.ndarray, session_id: int | None, budget: float, warmup: np.ndarray
) -> Pass:
    def request(q: np.ndarray) -> api.FindSimilarImagesRequest:
        return api.FindSimilarImagesRequest(vector=api.QueryVector(values=q.tolist()), k=K)

    for q in warmup:
        await search.find_similar(request(q), session_id)
    out = Pass([], [])
    started = time.perf_counter()
    for i, q in enumerate(queries):
        if i >= MIN_QUERIES and time.perf_counter() - started > budget:
            break
        req = request(q)
        t0 = time.perf_counter()
        response = await search.find_similar(req, session_id)
        out.latencies_ms.append((time.perf_counter() - t0) * 1000)
        out.results.append([int(r.asset_id) for r in response.results])
        out.exact.add(bool(response.exact))
    return out


async def build_index(url: str) -> dict[str, Any]:
    """The worker's build (imagetraining/vectors.py `build_hnsw_index`), timed, with its notices."""
    name = hnsw_index_name(DIMENSION)
    notices: list[str] = []
    conn = await asyncpg.connect(url)
    try:
        conn.add_log_listener(lambda _c, message: notices.append(str(message)))
        settings = {
            s: await conn.fetchval(f"SHOW {s}")
            for s in ("maintenance_work_mem", "max_parallel_maintenance_workers", "shared_buffers")
        }
        t0 = time.perf_counter()
        built = await build_hnsw_index(conn, DIMENSION)  # the worker's own call: its statement and settings
        seconds = time.perf_counter() - t0
        assert built, f"{name} was not built: no pgvector, or it exists already"
        settings["maintenance_work_mem (build)"] = await conn.fetchval("SHOW maintenance_work_mem")
        size = int(await conn.fetchval("SELECT pg_relation_size($1::regclass)", name))
        version = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    finally:
        await conn.close()
    return {"seconds": seconds, "bytes": size, "notices": notices, "settings": settings, "pgvector": version}


@contextlib.asynccontextmanager
async def embedded_server(data_dir: Path) -> AsyncIterator[str]:
    """An embedded pgserver of its own (pgvector included), stopped at the end (before the scratch
    directory that holds its data goes)."""
    url = await asyncio.to_thread(start_embedded, data_dir)
    try:
        yield url
    finally:
        await asyncio.to_thread(_stop_embedded, data_dir)


def _stop_embedded(data_dir: Path) -> None:
    # start_embedded keeps the server for the process's life (pgserver stops it at exit, by
    # then without its data directory): this benchmark's own server is stopped here.
    server = db_engine._embedded.pop(data_dir.expanduser().resolve(), None)
    if server is not None:
        server.cleanup()


async def parts(db: Database, sid: int, queries: np.ndarray, hnsw: bool) -> dict[str, Any]:
    """The statements of a search timed alone (ms), on the reads pool as `Search` sends them: the
    grouping of the images in scope by trainer (which reads every embedding in scope, for its
    `cardinality`), and, with the index, the HNSW statement in its transaction."""
    name, version, digest = TRAINER
    model = {"trainer_name": name, "trainer_version": version, "model_digest": digest, "dimension": DIMENSION}
    out: dict[str, Any] = {"models_session": [], "models_all": [], "hnsw_statement": []}
    out.update({f"ids_ef{ef}": [] for ef in WIDER_EF})
    hnsw_sql = text(search_sql._pgvector(False, DIMENSION))
    for q in queries:
        async with db.reads.connect() as conn:
            t0 = time.perf_counter()
            (await conn.execute(search_sql._SESSION_MODELS, {"id": sid})).all()
            t1 = time.perf_counter()
            out["models_session"].append((t1 - t0) * 1000)
            if hnsw:
                (await conn.execute(search_sql._ALL_MODELS)).all()
                out["models_all"].append((time.perf_counter() - t1) * 1000)
        if hnsw:
            values = {"id": None, **model, "query": [float(v) for v in q], "exclude": 0, "k": K}
            async with db.engine.begin() as tx:
                t0 = time.perf_counter()
                await tx.exec_driver_sql(f"SET LOCAL hnsw.ef_search = {hnsw_ef_search(K)}")
                (await tx.execute(hnsw_sql, values)).all()
                out["hnsw_statement"].append((time.perf_counter() - t0) * 1000)
            for ef in WIDER_EF:  # how recall grows with the candidate list (not what Search sets)
                async with db.engine.begin() as tx:
                    await tx.exec_driver_sql(f"SET LOCAL hnsw.ef_search = {ef}")
                    out[f"ids_ef{ef}"].append([int(r.id) for r in (await tx.execute(hnsw_sql, values)).all()])
    return {k: v for k, v in out.items() if v}


def recall(found: list[list[int]], truth: list[list[int]]) -> float:
    hits = sum(len(set(f) & set(t)) for f, t in zip(found, truth, strict=False))
    total = sum(len(t) for t in truth[: len(found)])
    return hits / total if total else float("nan")


def same_answers(a: list[list[int]], b: list[list[int]]) -> tuple[float, int]:
    """The share of the queries both ran whose ten results are the same set, and how many they both ran."""
    n = min(len(a), len(b))
    return (sum(set(x) == set(y) for x, y in zip(a[:n], b[:n], strict=True)) / n if n else float("nan")), n


async def _pgvector_passes(
    embedded_url: str,
    vectors: int,
    query_vectors: np.ndarray,
    warmup: np.ndarray,
    repeats: int,
    budget: float,
    scratch: Path,
    passes: dict[str, list[Pass]],
    raw: dict[str, Any],
) -> None:
    """Exact pgvector over the session and over every image, then the worker's index and its passes."""
    async with h.fresh_database(embedded_url) as db:
        conn = await asyncpg.connect(db.url)
        try:
            raw["pgvector_server"] = {
                "version": await conn.fetchval("SHOW server_version"),
                "pgvector": await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'"),
            }
        finally:
            await conn.close()
        if raw["pgvector_server"]["pgvector"] is None:
            raise RuntimeError("the embedded pgserver has no pgvector: case 9 needs it")
        sid, seconds = await populate(db.url, vectors)
        raw["pgvector_server"]["populate_seconds"] = seconds
        h.log(f"case 9: {vectors:,} vectors stored on the embedded pgserver in {seconds:.1f}s")
        reads = Database.connect(db.url)
        try:
            search = Search(reads, [scratch])
            for r in range(repeats):
                passes["pgvector_session"].append(await timed_pass(search, query_vectors, sid, budget, warmup))
                passes["pgvector_all"].append(await timed_pass(search, query_vectors, None, budget, warmup))
                h.log(f"case 9: repeat {r + 1}, exact pgvector: session and all-images passes done")
            index = await build_index(to_libpq_url(db.url))
            raw["index"] = index
            h.log(f"case 9: HNSW index built in {index['seconds']:.1f}s ({index['bytes'] / 2**20:.0f} MiB)")
            for _ in range(repeats):
                passes["hnsw"].append(await timed_pass(search, query_vectors, None, budget, warmup))
            raw["parts_pgvector"] = await parts(reads, sid, query_vectors[:PART_QUERIES], hnsw=True)
        finally:
            await reads.dispose()


async def _clustered_passes(
    embedded_url: str,
    vectors: int,
    queries: int,
    repeats: int,
    budget: float,
    scratch: Path,
    passes: dict[str, list[Pass]],
    raw: dict[str, Any],
) -> None:
    """The index on vectors with neighbourhoods: exact pgvector once (the truth), then the HNSW passes."""
    around = centres()
    rng = np.random.default_rng(QUERY_SEED + 2)
    query_vectors = clustered(rng, queries, around)
    warmup = clustered(rng, WARMUP, around)
    async with h.fresh_database(embedded_url) as db:
        sid, seconds = await populate(db.url, vectors, around)
        h.log(f"case 9: {vectors:,} clustered vectors stored on the embedded pgserver in {seconds:.1f}s")
        reads = Database.connect(db.url)
        try:
            search = Search(reads, [scratch])
            passes["clustered_exact"].append(await timed_pass(search, query_vectors, sid, budget, warmup))
            index = await build_index(to_libpq_url(db.url))
            raw["clustered_index"] = index
            h.log(f"case 9: HNSW index on the clustered vectors built in {index['seconds']:.1f}s")
            for _ in range(repeats):
                passes["clustered_hnsw"].append(await timed_pass(search, query_vectors, None, budget, warmup))
        finally:
            await reads.dispose()


async def run_case(
    vectors: int, queries: int, repeats: int, server_url: str, scratch: Path, budget: float
) -> tuple[list[h.Row], dict[str, Any]]:
    raw_load = [[round(x, 2) for x in os.getloadavg()]]
    query_vectors = unit_vectors(queries, QUERY_SEED)
    warmup = unit_vectors(WARMUP, QUERY_SEED + 1)
    passes: dict[str, list[Pass]] = {
        "unnest": [],
        "pgvector_session": [],
        "pgvector_all": [],
        "hnsw": [],
        "clustered_exact": [],
        "clustered_hnsw": [],
    }
    raw: dict[str, Any] = {"vectors": vectors, "dimension": DIMENSION, "k": K, "queries": queries, "budget": budget}

    # (a) the suite's server: exact in SQL.
    async with h.fresh_database(server_url) as db:
        conn = await asyncpg.connect(db.url)
        try:
            had_pgvector = await conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'vector'") is not None
            if had_pgvector:
                await conn.execute("DROP EXTENSION vector")
            raw["plain_server"] = {"version": await conn.fetchval("SHOW server_version"), "had_pgvector": had_pgvector}
        finally:
            await conn.close()
        sid, seconds = await populate(db.url, vectors)
        raw["plain_server"]["populate_seconds"] = seconds
        h.log(f"case 9: {vectors:,} vectors stored on the plain server in {seconds:.1f}s")
        reads = Database.connect(db.url)  # as the control service connects
        try:
            search = Search(reads, [scratch])
            for r in range(repeats):
                passes["unnest"].append(await timed_pass(search, query_vectors, sid, budget, warmup))
                h.log(f"case 9: repeat {r + 1}, exact SQL: {len(passes['unnest'][-1].latencies_ms)} queries")
            raw["parts_plain"] = await parts(reads, sid, query_vectors[:PART_QUERIES], hnsw=False)
        finally:
            await reads.dispose()

    # (b) an embedded pgserver with pgvector.
    async with embedded_server(scratch / "search-pgdata") as embedded_url:
        await _pgvector_passes(embedded_url, vectors, query_vectors, warmup, repeats, budget, scratch, passes, raw)
        # (c) the same server, a fresh database, clustered vectors: exact pgvector, then the index.
        await _clustered_passes(embedded_url, vectors, queries, repeats, budget, scratch, passes, raw)

    raw_load.append([round(x, 2) for x in os.getloadavg()])
    raw["loadavg_start_end"] = raw_load
    h.log(f"case 9: load average (1, 5, 15 min) at start {raw_load[0]}, at end {raw_load[1]}")
    return rows_of(passes, raw, vectors)


def rows_of(passes: dict[str, list[Pass]], raw: dict[str, Any], vectors: int) -> tuple[list[h.Row], dict[str, Any]]:
    plain = raw["plain_server"]
    vec = raw["pgvector_server"]
    labels = {
        "unnest": f"exact, SQL unnest (PostgreSQL {plain['version'].split()[0]}, no pgvector), session",
        "pgvector_session": f"exact, pgvector {vec['pgvector']} (pgserver {vec['version'].split()[0]}), session",
        "pgvector_all": "exact, pgvector, all images (no index yet)",
        "hnsw": f"HNSW index (m 16, ef_construction 64, ef_search {hnsw_ef_search(K)}), all images",
        "clustered_exact": f"exact, pgvector, session, vectors in {CLUSTERS:,} clusters",
        "clustered_hnsw": f"HNSW index, all images, vectors in {CLUSTERS:,} clusters",
    }

    def stat(mode: str, q: float) -> list[float]:
        return [h.percentile(p.latencies_ms, q) for p in passes[mode]]

    base = h.median(stat("unnest", 50))
    rows: list[h.Row] = []
    size = f"{vectors:,} x {DIMENSION}"
    for mode, label in labels.items():
        p50, p99 = stat(mode, 50), stat(mode, 99)
        counts = sorted({len(p.latencies_ms) for p in passes[mode]})
        exact = sorted({e for p in passes[mode] for e in p.exact})
        note = f"{'/'.join(str(c) for c in counts)} queries a repeat, k {K}; response.exact {exact}"
        first = mode == "unnest"
        rows.append(
            h.Row(
                CASE,
                f"p50, {label}, {size}",
                h.median(p50),
                "ms",
                samples=p50,
                baseline="" if first else "exact SQL p50",
                baseline_value=None if first else base,
                ratio=None if first else base / h.median(p50),
                ratio_kind="faster",
                note=note,
            )
        )
        rows.append(h.Row(CASE, f"p99, {label}", h.median(p99), "ms", samples=p99))
        raw[mode] = {
            "p50_ms": p50,
            "p99_ms": p99,
            "queries": counts,
            "exact": exact,
            "latencies_ms": [p.latencies_ms for p in passes[mode]],
        }
    index = raw["index"]
    rows.append(
        h.Row(
            CASE,
            "HNSW index build (CREATE INDEX CONCURRENTLY, as the worker)",
            index["seconds"],
            "s",
            note=(
                f"{index['bytes'] / 2**20:.0f} MiB; {index['settings']}"
                + (f"; notices: {' | '.join(index['notices'])}" if index["notices"] else "")
            ),
        )
    )
    truth = passes["pgvector_session"]
    recalls = [recall(hn.results, ex.results) for hn, ex in zip(passes["hnsw"], truth, strict=True)]
    rows.append(
        h.Row(
            CASE,
            "recall@10, HNSW against exact pgvector (uniform random vectors: the worst case)",
            h.median(recalls),
            "",
            samples=recalls,
        )
    )
    clustered_truth = passes["clustered_exact"][0].results
    clustered_recalls = [recall(hn.results, clustered_truth) for hn in passes["clustered_hnsw"]]
    rows.append(
        h.Row(
            CASE,
            f"recall@10, HNSW against exact pgvector (vectors in {CLUSTERS:,} clusters)",
            h.median(clustered_recalls),
            "",
            samples=clustered_recalls,
            note=(
                f"index built in {raw['clustered_index']['seconds']:.1f}s; the truth: "
                f"{len(clustered_truth)} exact queries; each vector a cluster centre plus noise of length {SPREAD}"
            ),
        )
    )
    raw["clustered_recall_at_10"] = clustered_recalls
    agree = [same_answers(a.results, b.results) for a, b in zip(passes["unnest"], truth, strict=True)]
    rows.append(
        h.Row(
            CASE,
            "same ten images, exact SQL and exact pgvector",
            h.median([a for a, _n in agree]),
            "",
            samples=[a for a, _n in agree],
            note=f"share of the {'/'.join(str(n) for _a, n in agree)} queries both ran whose top-10 sets are equal",
        )
    )
    for key, server, what in (
        ("parts_plain", "plain", "models_session"),
        ("parts_pgvector", "pgserver", "models_session"),
        ("parts_pgvector", "pgserver", "models_all"),
        ("parts_pgvector", "pgserver", "hnsw_statement"),
    ):
        times = raw[key][what]
        label = {
            "models_session": "the trainer grouping of a session's images",
            "models_all": "the trainer grouping of every image",
            "hnsw_statement": "the HNSW statement (SET LOCAL ef_search + SELECT)",
        }[what]
        rows.append(
            h.Row(
                CASE,
                f"p50, alone: {label} ({server})",
                h.percentile(times, 50),
                "ms",
                note=f"{len(times)} runs, p99 {h.percentile(times, 99):.1f} ms",
            )
        )
    for ef in WIDER_EF:
        found = raw["parts_pgvector"][f"ids_ef{ef}"]
        rows.append(
            h.Row(
                CASE,
                f"recall@10, HNSW statement with hnsw.ef_search {ef}",
                recall(found, truth[0].results),
                "",
                note=f"{len(found)} queries; Search sets ef_search {hnsw_ef_search(K)} for k {K}",
            )
        )
    raw["recall_at_10"] = recalls
    raw["exact_agreement"] = [a for a, _n in agree]
    return rows, raw
