"""What both services know about embeddings: which model made them, and the pgvector index over them.

The worker stamps every trained asset with a `Provenance` and builds the HNSW index; the control
service groups the images in a search's scope by `Provenance` and uses the index. Both read the
definitions here, so the index the worker builds is the one search looks for (the services never
import each other), and the benchmarks build it with the same statement and settings.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

HNSW_INDEX = "ix_image_assets_embedding_hnsw_{dimension}"
# The graph in memory while it is built: with the server's usual 64 MB, 100,000 vectors of 512 took
# 20 minutes once the graph spilled (case 9). Set for the building connection only.
HNSW_BUILD_MEMORY = "512MB"


class _MadeByTrainer(Protocol):
    name: str
    version: str
    model_digest: str
    dimension: int


@dataclass(frozen=True, slots=True)
class Provenance:
    """Which trainer produced an asset's features and embedding (`dimension` 0: no embedding)."""

    name: str
    version: str
    model_digest: str
    dimension: int

    @classmethod
    def of(cls, trainer: _MadeByTrainer) -> Provenance:
        return cls(trainer.name, trainer.version, trainer.model_digest, trainer.dimension)

    def describe(self) -> str:
        digest = f", model {self.model_digest[:12]}" if self.model_digest else ""
        return f"{self.name} {self.version}{digest}"

    def params(self) -> dict[str, object]:
        """The bind parameters of the SQL that selects this trainer's assets."""
        return {
            "trainer_name": self.name,
            "trainer_version": self.version,
            "model_digest": self.model_digest,
            "dimension": self.dimension,
        }


def hnsw_index_name(dimension: int) -> str:
    return HNSW_INDEX.format(dimension=int(dimension))


def hnsw_ef_search(k: int) -> int:
    """Candidates the HNSW index examines for k results: pgvector's default of 40 gave recall@10 of
    0.05 on 100,000 random 512-d vectors, 400 gave 0.40 (case 9); 1000 is pgvector's maximum."""
    return max(400, min(1000, 20 * k))


def hnsw_index_statement(dimension: int) -> str:
    """The partial index of one dimension's vectors (cosine), built without blocking writes."""
    d = int(dimension)
    return (
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {hnsw_index_name(d)} ON image_assets"
        f" USING hnsw ((CAST(embedding AS vector({d}))) vector_cosine_ops)"
        f" WHERE cardinality(embedding) = {d}"
    )


# A row where the pgvector extension is installed in this database.
HAS_PGVECTOR = "SELECT 1 FROM pg_extension WHERE extname = 'vector'"


def valid_index_query(placeholder: str) -> str:
    """SQL that returns a row when the named index exists and is valid. A CONCURRENTLY build that
    failed or was cut off leaves an invalid index behind, which the planner never uses: it must
    neither count as the index (search would say `exact` false) nor stop the next build."""
    return (
        "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        f" WHERE c.relname = {placeholder} AND i.indisvalid"
    )


# Held (session level) by the connection that builds an index, so another worker neither builds it
# twice nor takes a build in progress (invalid until it finishes) for a failed one and drops it.
_BUILD_LOCK = "SELECT pg_try_advisory_lock(hashtext('imagetraining:' || $1))"
_UNLOCK = "SELECT pg_advisory_unlock(hashtext('imagetraining:' || $1))"


async def build_hnsw_index(conn: Any, dimension: int) -> bool:
    """Build the index on an asyncpg connection where pgvector is installed and no valid index exists.

    True when this call built it; False when there is no pgvector, the index is there, or another
    connection is building it. An invalid one left by a failed build is dropped first. The
    connection's lock_timeout and maintenance_work_mem are changed (a CONCURRENTLY build waits for
    older transactions; the graph should fit in memory), so give it a connection of its own.
    """
    name = hnsw_index_name(dimension)
    if await conn.fetchval(HAS_PGVECTOR) is None:
        return False
    if await conn.fetchval(valid_index_query("$1"), name):
        return False
    if not await conn.fetchval(_BUILD_LOCK, name):
        return False
    try:
        await conn.execute("SET lock_timeout = 0")
        await conn.execute(f"SET maintenance_work_mem = '{HNSW_BUILD_MEMORY}'")
        if await conn.fetchval(valid_index_query("$1"), name):  # built while we took the lock
            return False
        await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")  # what a failed build left
        await conn.execute(hnsw_index_statement(dimension))
        return True
    finally:
        with contextlib.suppress(Exception):  # a broken connection releases the lock as it closes
            await conn.fetchval(_UNLOCK, name)
