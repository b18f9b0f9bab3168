"""Autogenerate an Alembic revision from the models: `make migration MSG="add foo"`.

Needs DATABASE_URL pointing at a database migrated to head (an empty scratch database is fine:
this script upgrades it first).
"""

from __future__ import annotations

import asyncio
import os
import sys

from alembic import command
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from imagetraining.db.engine import to_asyncpg_url
from imagetraining.db.migrate import alembic_config


def _revise(connection: Connection, message: str) -> None:
    cfg = alembic_config(connection)
    command.upgrade(cfg, "head")
    command.revision(cfg, message=message, autogenerate=True)


async def main(message: str) -> None:
    engine = create_async_engine(to_asyncpg_url(os.environ["DATABASE_URL"]))
    async with engine.begin() as conn:
        await conn.run_sync(_revise, message)
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(" ".join(sys.argv[1:]) or "change"))
