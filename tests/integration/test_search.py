"""FindSimilarImages (#13): nearest trained images by embedding, exact on every PostgreSQL (the suite runs
on the machine's, without pgvector, and on the embedded one, with it: both must give numpy's answer),
never across two models."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text as sql

from control_service.server import serve
from discovery_worker.worker import run_worker
from imagetraining.db.engine import Database, to_libpq_url
from imagetraining.settings import Settings
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.v1 import training_session_service_pb2_grpc as api_grpc
from imagetraining.vectors import build_hnsw_index, hnsw_index_name
from tests import worker_support as ws
from tests.conftest import wait_for
from tests.images import photo_image

FAMILIES = 5


def _library(root: Path) -> dict[str, list[Path]]:
    """Photos, each with two siblings: a half-size copy and a re-encoded one, in three directories."""
    families: dict[str, list[Path]] = {}
    for f in range(FAMILIES):
        image = photo_image(320, 240, seed=f * 7 + 1)
        paths = [root / "a" / f"p{f}.jpg", root / "b" / f"p{f}_small.jpg", root / "c" / f"p{f}_q60.jpg"]
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        image.save(paths[0], "JPEG", quality=92)
        image.resize((160, 120), Image.Resampling.LANCZOS).save(paths[1], "JPEG", quality=92)
        image.save(paths[2], "JPEG", quality=60)
        families[f"p{f}"] = paths
    return families


async def _trained(db: Database, settings: Settings, root: Path, dirs: list[Path]) -> int:
    handle = await run_worker(settings, migrate=False)
    try:
        sid = await ws.start_session(db, root, dirs)

        async def done() -> bool:
            return await ws.state(db, sid) in ("completed", "failed", "cancelled")

        await wait_for(done, timeout=60, what="the session to finish")
        assert await ws.state(db, sid) == "completed"
        return sid
    finally:
        await handle.stop()


@pytest.fixture
async def stub(clean_db: Database, make_settings: Callable[..., Settings]) -> AsyncIterator[Any]:
    server = await serve(make_settings(), database=clean_db)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield api_grpc.TrainingSessionServiceStub(channel)
    finally:
        await server.stop()


async def _embeddings(db: Database) -> dict[str, np.ndarray[Any, Any]]:
    async with db.reads.connect() as conn:
        rows = await conn.exec_driver_sql("SELECT path, embedding FROM image_assets WHERE embedding IS NOT NULL")
        return {str(r[0]): np.asarray(r[1], dtype=np.float64) for r in rows}


async def test_siblings_are_nearest_and_distances_are_exact(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path, stub: Any
) -> None:
    families = _library(library)
    sid = await _trained(clean_db, make_settings(pool_size=1), library, [library / "a", library / "b", library / "c"])
    vectors = await _embeddings(clean_db)
    assert len(vectors) == 3 * FAMILIES and {len(v) for v in vectors.values()} == {24}
    for scope in (f"sessions/{sid}", ""):
        for paths in families.values():
            for query in paths:
                response = await stub.FindSimilarImages(
                    api.FindSimilarImagesRequest(session=scope, path=str(query), k=4)
                )
                got = [r.path for r in response.results]
                assert set(got[:2]) == {str(p) for p in paths if p != query}, (query, got)
                # numpy's exact answer: the same order and distances on every server
                q = vectors[str(query)]
                truth = sorted((1 - float(q @ v), p) for p, v in vectors.items() if p != str(query))[:4]
                assert got == [p for _d, p in truth]
                assert [r.distance for r in response.results] == pytest.approx([d for d, _p in truth], abs=1e-5)
                assert response.trainer.name == "default-colour-stats" and response.trainer.embedding_dimension == 24
            if scope:
                assert response.exact

    # A caller's vector (not normalised) finds the image it came from first, at distance 0.
    query = vectors[str(families["p2"][0])] * 3.0
    response = await stub.FindSimilarImages(
        api.FindSimilarImagesRequest(session=f"sessions/{sid}", vector=api.QueryVector(values=list(query)), k=3)
    )
    assert response.results[0].path == str(families["p2"][0])
    assert response.results[0].distance == pytest.approx(0.0, abs=1e-5)


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def test_bad_queries_get_their_status(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path, stub: Any, tmp_path: Path
) -> None:
    families = _library(library)
    sid = await _trained(clean_db, make_settings(pool_size=1), library, [library / "a"])
    name, good = f"sessions/{sid}", str(families["p0"][0])
    find = stub.FindSimilarImages
    cases = [
        (api.FindSimilarImagesRequest(session=name, path=good, k=1001), grpc.StatusCode.INVALID_ARGUMENT, "k"),
        (api.FindSimilarImagesRequest(session=name, path=good, k=-1), grpc.StatusCode.INVALID_ARGUMENT, "k"),
        (api.FindSimilarImagesRequest(session=name), grpc.StatusCode.INVALID_ARGUMENT, "either `path`"),
        (
            api.FindSimilarImagesRequest(session=name, vector=api.QueryVector(values=[1.0, 2.0])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "has 2 values; the embeddings in scope have 24",
        ),
        (
            api.FindSimilarImagesRequest(session=name, vector=api.QueryVector(values=[0.0] * 24)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "all zeros",
        ),
        (
            api.FindSimilarImagesRequest(session=name, vector=api.QueryVector(values=[float("nan")] * 24)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "NaN",
        ),
        (
            api.FindSimilarImagesRequest(session=name, path=str(tmp_path / "elsewhere.jpg")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "outside the configured library roots",
        ),
        (api.FindSimilarImagesRequest(session=name, path="relative.jpg"), grpc.StatusCode.INVALID_ARGUMENT, "absolute"),
        (api.FindSimilarImagesRequest(session="nope", path=good), grpc.StatusCode.INVALID_ARGUMENT, "session"),
        (
            api.FindSimilarImagesRequest(session=name, path=str(families["p0"][1])),  # in b: not in this session
            grpc.StatusCode.NOT_FOUND,
            "is not a trained image of",
        ),
        (api.FindSimilarImagesRequest(session="sessions/999", path=good), grpc.StatusCode.NOT_FOUND, "sessions/999"),
    ]
    for request, code, text in cases:
        got_code, details = await _code(find(request))
        assert (got_code, text in details) == (code, True), (request, details)


async def test_search_never_mixes_two_models(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path, stub: Any
) -> None:
    """Trainer A, then B on half the images: the session whose images now come from both is refused
    (MIXED_MODELS), as is the search over every image; a trainer without embeddings: EMBEDDING."""
    _library(library)
    a, b = library / "a", library / "b"
    both = await _trained(clean_db, make_settings(pool_size=1, trainer="tests.trainers:BatchTrainer"), library, [a, b])
    only_a = await _trained(clean_db, make_settings(pool_size=1, trainer="tests.trainers:BatchTrainerB"), library, [a])
    query = str(library / "b" / "p0_small.jpg")
    code, details = await _code(
        stub.FindSimilarImages(api.FindSimilarImagesRequest(session=f"sessions/{both}", path=query))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "more than one trainer" in details
    assert "batch-test A" in details and "batch-test B" in details
    code, details = await _code(stub.FindSimilarImages(api.FindSimilarImagesRequest(path=query)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "more than one trainer" in details
    # Within the session trained by B alone, search works.
    ok = await stub.FindSimilarImages(
        api.FindSimilarImagesRequest(session=f"sessions/{only_a}", path=str(library / "a" / "p0.jpg"), k=2)
    )
    assert ok.trainer.version == "B" and len(ok.results) == 2

    c = await _trained(
        clean_db, make_settings(pool_size=1, trainer="tests.trainers:NoEmbeddingTrainer"), library, [library / "c"]
    )
    code, details = await _code(
        stub.FindSimilarImages(
            api.FindSimilarImagesRequest(session=f"sessions/{c}", path=str(library / "c" / "p0_q60.jpg"))
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "has an embedding" in details


async def test_search_over_every_image_uses_the_workers_index_where_pgvector_is(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path, stub: Any
) -> None:
    """The worker builds the HNSW index search looks for (one name, imagetraining/vectors.py); where
    it exists, a search over every image uses it (`exact` false) and still finds numpy's answer on a
    library this small. Without pgvector there is no index and every search is exact."""
    families = _library(library)
    await _trained(clean_db, make_settings(pool_size=1), library, [library / "a", library / "b", library / "c"])
    vectors = await _embeddings(clean_db)
    async with clean_db.reads.connect() as conn:
        pgvector = (await conn.exec_driver_sql("SELECT 1 FROM pg_extension WHERE extname = 'vector'")).first()

    async def indexed() -> bool:
        async with clean_db.reads.connect() as conn:
            found = await conn.execute(
                sql("SELECT 1 FROM pg_indexes WHERE indexname = :name"), {"name": hnsw_index_name(24)}
            )
            return found.first() is not None

    if pgvector is not None:
        # _trained stopped the worker; the build it started at start-up has finished or was cut off.
        handle = await run_worker(make_settings(pool_size=1), migrate=False)
        try:
            await wait_for(indexed, timeout=60, what="the worker's HNSW index")
        finally:
            await handle.stop()
    else:
        assert not await indexed()
    query = families["p3"][1]
    response = await stub.FindSimilarImages(api.FindSimilarImagesRequest(path=str(query), k=5))
    assert response.exact == (pgvector is None)
    q = vectors[str(query)]
    truth = sorted((1 - float(q @ v), p) for p, v in vectors.items() if p != str(query))[:5]
    assert [r.path for r in response.results] == [p for _d, p in truth]
    # Asked for, the exact answer even where the index exists.
    exact = await stub.FindSimilarImages(api.FindSimilarImagesRequest(path=str(query), k=5, exact=True))
    assert exact.exact and [r.path for r in exact.results] == [p for _d, p in truth]


async def test_a_failed_index_build_is_neither_used_nor_kept(
    clean_db: Database, make_settings: Callable[..., Settings], library: Path, stub: Any
) -> None:
    """A CONCURRENTLY build that fails or is cut off (a worker stopped mid-build) leaves an invalid
    index. Search must not call itself approximate because of it, and the next build must replace
    it; a build in progress elsewhere (the advisory lock held) is left alone."""
    async with clean_db.reads.connect() as conn:
        if (await conn.exec_driver_sql("SELECT 1 FROM pg_extension WHERE extname = 'vector'")).first() is None:
            pytest.skip("this server has no pgvector: there is no index to build (the embedded pass runs this)")
    families = _library(library)
    await _trained(clean_db, make_settings(pool_size=1), library, [library / "a", library / "b", library / "c"])
    name = hnsw_index_name(24)
    conn = await asyncpg.connect(to_libpq_url(clean_db.url))
    other = await asyncpg.connect(to_libpq_url(clean_db.url))
    try:
        await conn.execute(f"DROP INDEX IF EXISTS {name}")  # whatever the worker built at its start
        assert await build_hnsw_index(conn, 24)
        await conn.execute(f"UPDATE pg_index SET indisvalid = false WHERE indexrelid = '{name}'::regclass")
        request = api.FindSimilarImagesRequest(path=str(families["p1"][0]), k=3)
        assert (await stub.FindSimilarImages(request)).exact  # the invalid index is not used

        # Another connection building (holding the build lock): no drop, no second build.
        assert await other.fetchval("SELECT pg_try_advisory_lock(hashtext('imagetraining:' || $1))", name)
        assert not await build_hnsw_index(conn, 24)
        assert await conn.fetchval("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = $1::regclass", name)
        await other.execute("SELECT pg_advisory_unlock_all()")

        assert await build_hnsw_index(conn, 24)  # the leftover dropped and the index built again
        assert await conn.fetchval("SELECT indisvalid FROM pg_index WHERE indexrelid = $1::regclass", name)
        assert not (await stub.FindSimilarImages(request)).exact
        assert not await build_hnsw_index(conn, 24)  # valid: nothing to do
    finally:
        await conn.close()
        await other.close()
