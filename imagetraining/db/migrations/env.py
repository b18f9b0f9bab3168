"""Alembic environment: runs on the connection handed in by imagetraining.db.migrate, or on
DATABASE_URL when invoked from the alembic CLI (e.g. to autogenerate a revision)."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from imagetraining.db.engine import to_asyncpg_url
from imagetraining.db.models import Base

config = context.config
target_metadata = Base.metadata


def _include(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    """Leave out of autogenerate what is made outside the migrations: the workers' HNSW indexes on
    embeddings (one per dimension, where pgvector exists; discovery_worker/worker.py)."""
    return not (type_ == "index" and (name or "").startswith("ix_image_assets_embedding_hnsw_"))


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection, target_metadata=target_metadata, compare_type=True, include_object=_include
    )
    with context.begin_transaction():
        context.run_migrations()


async def _migrate_url(url: str) -> None:
    engine = create_async_engine(to_asyncpg_url(url))
    async with engine.begin() as conn:
        await conn.run_sync(_migrate)
    await engine.dispose()


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("DATABASE_URL: required to run alembic from the command line")
    asyncio.run(_migrate_url(url))


run()
