"""The schema: migrations reach the models exactly, on the real database."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, text

from imagetraining.db.engine import Database
from imagetraining.db.models import Base


def _diff(connection: Connection) -> list[object]:
    ctx = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(ctx, Base.metadata))


async def test_migrated_database_matches_models(database: Database) -> None:
    async with database.engine.connect() as conn:
        diff = await conn.run_sync(_diff)
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
    assert diff == []
    assert version == "0003"


async def test_reads_run_each_statement_on_its_own(database: Database) -> None:
    """`Database.reads` is autocommit: no BEGIN/ROLLBACK round trips around a read-only request."""
    async with database.reads.connect() as conn:
        first = (await conn.execute(text("SELECT txid_current()"))).scalar_one()
        second = (await conn.execute(text("SELECT txid_current()"))).scalar_one()
    assert second > first
    async with database.engine.connect() as conn:
        first = (await conn.execute(text("SELECT txid_current()"))).scalar_one()
        second = (await conn.execute(text("SELECT txid_current()"))).scalar_one()
    assert second == first
