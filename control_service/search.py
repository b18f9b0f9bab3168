"""FindSimilarImages: the k nearest trained images to a query embedding, never across two models.

Every stored embedding is L2-normalised (discovery_worker/hashing.py), so the cosine distance is
1 - the dot product. How it is computed depends on the server:
- on every PostgreSQL, exactly in SQL: `unnest(embedding, query)` summed per candidate (float8
  products of the stored float4 values), ordered, cut at k;
- where the `vector` extension is installed (migration 0008; the embedded pgserver ships it), by
  pgvector's `<=>` on `embedding::vector(D)`; a search over every image may use the workers' HNSW
  index of that dimension (`ix_image_assets_embedding_hnsw_D`, imagetraining/vectors.py), and
  says so (`exact` false), unless the request asks for `exact`. A session's search stays exact: it
  filters by the session's jobs, which an approximate index would apply after its candidate list
  and so could return fewer than k.

Before searching, the images in scope are grouped by the trainer that made them (name, version,
model digest, dimension): none with an embedding is FAILED_PRECONDITION `EMBEDDING`, more than one
group is FAILED_PRECONDITION `MIXED_MODELS`, so a search never compares two models' vectors.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import RowMapping, text
from sqlalchemy.ext.asyncio import AsyncConnection

from imagetraining.db.engine import Database
from imagetraining.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, PreconditionViolation
from imagetraining.names import session_name
from imagetraining.paths import check_form, is_within
from imagetraining.v1 import resources_pb2 as pb
from imagetraining.v1 import training_session_service_pb2 as api
from imagetraining.vectors import HAS_PGVECTOR, Provenance, hnsw_ef_search, hnsw_index_name, valid_index_query

DEFAULT_K = 10
MAX_K = 1000
MAX_DIMENSION = 4096
# The trainers whose results are in scope (a session's completed images, or every trained image),
# largest group first. Only the short provenance columns are read: the vectors themselves (kilobytes
# each, stored out of line) are not, which made this step 0.5 s at 100,000 images (case 9).
_SESSION_MODELS = text(
    """
    SELECT a.trainer_name, a.trainer_version, a.model_digest, count(*) AS images
      FROM training_jobs j JOIN image_assets a ON a.id = j.asset_id
     WHERE j.session_id = :id AND j.state = 'completed'
     GROUP BY 1, 2, 3 ORDER BY images DESC LIMIT 3
    """
)
_ALL_MODELS = text(
    """
    SELECT trainer_name, trainer_version, model_digest, count(*) AS images
      FROM image_assets WHERE perceptual_hash IS NOT NULL AND trainer_name IS NOT NULL
     GROUP BY 1, 2, 3 ORDER BY images DESC LIMIT 3
    """
)
# The dimension of that trainer's vectors, from one of them (none: the trainer makes no embedding).
_DIMENSION = text(
    """
    SELECT cardinality(embedding) FROM image_assets
     WHERE trainer_name = :trainer_name AND trainer_version = :trainer_version AND model_digest = :model_digest
       AND embedding IS NOT NULL
     LIMIT 1
    """
)
_SESSION_EXISTS = text("SELECT 1 FROM training_sessions WHERE id = :id")
_HAS_PGVECTOR = text(HAS_PGVECTOR)
_HAS_INDEX = text(valid_index_query(":name"))

_SAME_MODEL = (
    "a.trainer_name = :trainer_name AND a.trainer_version = :trainer_version AND a.model_digest = :model_digest"
    " AND cardinality(a.embedding) = :dimension"
)
_IN_SESSION = "JOIN training_jobs j ON j.asset_id = a.id AND j.session_id = :id AND j.state = 'completed'"


def _query_of(scoped: bool) -> str:
    return f"""
    SELECT a.id, a.embedding FROM image_assets a {_IN_SESSION if scoped else ""}
     WHERE a.path = :path AND a.embedding IS NOT NULL AND {_SAME_MODEL}
    """


def _exact(scoped: bool) -> str:
    return f"""
    SELECT a.id, a.path,
           1 - (SELECT sum(CAST(x AS float8) * CAST(y AS float8))
                  FROM unnest(a.embedding, CAST(:query AS real[])) AS t(x, y)) AS distance
      FROM image_assets a {_IN_SESSION if scoped else ""}
     WHERE {_SAME_MODEL} AND a.id <> :exclude
     ORDER BY distance, a.id
     LIMIT :k
    """


def _pgvector(scoped: bool, dimension: int) -> str:
    vector = f"vector({int(dimension)})"
    return f"""
    SELECT a.id, a.path,
           CAST(a.embedding AS {vector}) <=> CAST(CAST(:query AS real[]) AS {vector}) AS distance
      FROM image_assets a {_IN_SESSION if scoped else ""}
     WHERE {_SAME_MODEL} AND a.id <> :exclude
     ORDER BY CAST(a.embedding AS {vector}) <=> CAST(CAST(:query AS real[]) AS {vector})
     LIMIT :k
    """


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {description}", [FieldViolation(field, description)])


def _k(request: api.FindSimilarImagesRequest) -> int:
    if request.k == 0:
        return DEFAULT_K
    if not 1 <= request.k <= MAX_K:
        raise _invalid("k", f"must be from 1 to {MAX_K} (0 means {DEFAULT_K}), not {request.k}")
    return int(request.k)


def _normalised(values: Sequence[float], dimension: int) -> list[float]:
    if len(values) != dimension:
        raise _invalid(
            "vector.values",
            f"has {len(values)} values; the embeddings in scope have {dimension} (the model's dimension)",
        )
    if not all(math.isfinite(v) for v in values):
        raise _invalid("vector.values", "holds a NaN or infinite value")
    norm = math.sqrt(math.fsum(v * v for v in values))
    if norm == 0.0:
        raise _invalid("vector.values", "is all zeros: it has no direction to compare")
    return [v / norm for v in values]


class Search:
    """FindSimilarImages over the database; `roots` are the library roots a query path must lie in."""

    def __init__(self, db: Database, roots: Sequence[Path]) -> None:
        self.db = db
        self.roots = list(roots)

    async def find_similar(
        self, request: api.FindSimilarImagesRequest, session_id: int | None
    ) -> api.FindSimilarImagesResponse:
        k = _k(request)
        which = request.WhichOneof("query")
        if which is None:
            raise _invalid("query", "give either `path` (a trained image) or `vector` (a query embedding)")
        if which == "path":
            check_form(request.path, "path")
            path = posixpath.normpath(request.path)  # pure string work: the stored path is what counts
            if not is_within(path, self.roots):
                raise _invalid("path", "is outside the configured library roots (IMAGETRAINING_LIBRARY_ROOTS)")
        elif len(request.vector.values) > MAX_DIMENSION:
            raise _invalid("vector.values", f"has more than {MAX_DIMENSION} values")
        async with self.db.reads.connect() as conn:
            model = await self._model(conn, session_id)
            scoped = session_id is not None
            params: dict[str, object] = {"id": session_id, **model.params()}
            if which == "path":
                row = (await conn.execute(text(_query_of(scoped)), {**params, "path": path})).first()
                if row is None:
                    where = session_name(session_id) if session_id is not None else "any session"
                    raise NotFound(
                        path,
                        f"{path} is not a trained image of {where} with a {model.describe()} embedding",
                    )
                query, exclude = list(row.embedding), int(row.id)
            else:
                query, exclude = _normalised(list(request.vector.values), model.dimension), 0
            pgvector = (await conn.execute(_HAS_PGVECTOR)).first() is not None
            exact = True
            if pgvector:
                if not scoped and not request.exact:
                    name = hnsw_index_name(model.dimension)
                    exact = (await conn.execute(_HAS_INDEX, {"name": name})).first() is None
                sql = _pgvector(scoped, model.dimension)
            else:
                sql = _exact(scoped)
            values = {**params, "query": query, "exclude": exclude, "k": k}
            if exact:
                rows = (await conn.execute(text(sql), values)).all()
        if not exact:
            async with self.db.engine.begin() as tx:
                # Enough candidates for k results (the default list is 40); for this transaction only.
                await tx.exec_driver_sql(f"SET LOCAL hnsw.ef_search = {hnsw_ef_search(k)}")
                rows = (await tx.execute(text(sql), values)).all()
        return api.FindSimilarImagesResponse(
            results=[api.SimilarImage(path=r.path, asset_id=int(r.id), distance=float(r.distance)) for r in rows],
            trainer=pb.Trainer(
                name=model.name,
                version=model.version,
                model_digest=model.model_digest,
                embedding_dimension=model.dimension,
            ),
            exact=exact,
        )

    async def _model(self, conn: AsyncConnection, session_id: int | None) -> Provenance:
        if session_id is not None:
            if (await conn.execute(_SESSION_EXISTS, {"id": session_id})).first() is None:
                raise NotFound(session_name(session_id))
            groups = (await conn.execute(_SESSION_MODELS, {"id": session_id})).mappings().all()
            scope = session_name(session_id)
        else:
            groups = (await conn.execute(_ALL_MODELS)).mappings().all()
            scope = "the trained images"
        dimension = 0
        if len(groups) == 1 and groups[0]["trainer_name"] is not None:
            g = groups[0]
            params = {k: g[k] for k in ("trainer_name", "trainer_version", "model_digest")}
            dimension = int((await conn.execute(_DIMENSION, params)).scalar() or 0)
        if len(groups) == 1 and not dimension:
            raise FailedPrecondition(
                f"no image of {scope} has an embedding: train it with a trainer that makes one"
                " (IMAGETRAINING_TRAINER; the default makes one), then RestartSession with RESTART_SCOPE_ALL",
                [PreconditionViolation("EMBEDDING", scope, "no embeddings in scope")],
            )
        if not groups:
            raise FailedPrecondition(
                f"no image of {scope} has been trained yet: there is nothing to search",
                [PreconditionViolation("EMBEDDING", scope, "no embeddings in scope")],
            )
        if len(groups) > 1:
            described = "; ".join(f"{_group(g)}: {g['images']} images" for g in groups)
            raise FailedPrecondition(
                f"the images of {scope} were trained by more than one trainer ({described}): their embeddings"
                " cannot be compared. RestartSession with RESTART_SCOPE_ALL retrains the stale ones with the"
                " workers' trainer (GetSession's stale_images counts them)",
                [PreconditionViolation("MIXED_MODELS", scope, "embeddings of more than one model in scope")],
            )
        g = groups[0]
        return Provenance(str(g["trainer_name"]), str(g["trainer_version"]), str(g["model_digest"]), dimension)


def _group(g: RowMapping) -> str:
    if g["trainer_name"] is None:
        return "no recorded trainer"
    return Provenance(str(g["trainer_name"]), str(g["trainer_version"]), str(g["model_digest"] or ""), 0).describe()
