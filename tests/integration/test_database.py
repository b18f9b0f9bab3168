"""The schema: migrations reach the models exactly, on the real database."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, make_url, text

from imagetraining.db.engine import Database, to_asyncpg_url
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


async def test_a_test_may_leave_rows_behind(clean_db: Database) -> None:
    """Writes a row to every table; the next test must not see any of them."""
    async with clean_db.engine.begin() as conn:
        sid = (
            await conn.execute(
                text("INSERT INTO training_sessions (display_name, root_path) VALUES ('left', '/left') RETURNING id")
            )
        ).scalar_one()
        await conn.execute(
            text("INSERT INTO directory_fingerprints (session_id, path, digest) VALUES (:s, '/left/behind', 'x')"),
            {"s": sid},
        )


async def test_each_test_gets_an_empty_migrated_database_of_its_own(clean_db: Database, db_url: str) -> None:
    """Each test's database is a fresh clone of the migrated template (it once was one database emptied
    by a TRUNCATE of a hand-kept table list, which missed directory_fingerprints)."""
    async with clean_db.reads.connect() as conn:
        tables = [
            r[0]
            for r in await conn.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'")
            )
        ]
        counts = {t: (await conn.execute(text(f'SELECT count(*) FROM "{t}"'))).scalar_one() for t in tables}
        name = (await conn.execute(text("SELECT current_database()"))).scalar_one()
    assert set(tables) == set(Base.metadata.tables)
    assert counts == dict.fromkeys(tables, 0)
    assert make_url(to_asyncpg_url(db_url)).database == name and name.startswith("imagetraining_test_")
