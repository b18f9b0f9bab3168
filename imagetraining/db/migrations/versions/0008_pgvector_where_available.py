"""pgvector where the server has it: similarity search computed and indexed by the extension

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 10:15:00
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Optional on purpose: search is exact on every PostgreSQL (control_service/search.py); with the
    # extension (the embedded pgserver ships it) distances are computed by it and an HNSW index per
    # embedding dimension is built by the workers (discovery_worker/worker.py). A server without it,
    # or a role that may not create it, keeps working without it.
    op.execute(
        """
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') THEN
                CREATE EXTENSION IF NOT EXISTS vector;
            END IF;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'pgvector is available but this role may not create it: search stays exact without it';
        END
        $$
        """
    )


def downgrade() -> None:
    op.execute("DROP EXTENSION IF EXISTS vector")
