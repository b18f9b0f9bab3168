"""The schema: migrations reach the models exactly, on the real database."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from imagetraining.db.engine import Database
from imagetraining.db.migrate import alembic_config
from imagetraining.db.models import Base


def _diff(connection: Connection) -> list[object]:
    ctx = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(ctx, Base.metadata))


async def test_migrated_database_matches_models(database: Database) -> None:
    async with database.engine.connect() as conn:
        diff = await conn.run_sync(_diff)
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
    assert diff == []
    # The newest migration, whatever its number: a new migration must not need this test edited.
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    assert version == head


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


async def test_clean_db_empties_every_table(clean_db: Database) -> None:
    """The per-test TRUNCATE covers every table the migrations made (it once missed
    directory_fingerprints, so a test could see another's rows)."""
    from tests.conftest import TABLES

    async with clean_db.reads.connect() as conn:
        live = {
            r[0]
            for r in await conn.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'")
            )
        }
    assert live == set(TABLES)
