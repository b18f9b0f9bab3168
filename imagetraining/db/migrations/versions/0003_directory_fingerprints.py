"""directory fingerprints: a rescan skips the per-file work of directories it finds unchanged

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 02:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "directory_fingerprints",
        sa.Column("session_id", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["training_sessions.id"],
            name=op.f("fk_directory_fingerprints_session_id_training_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("session_id", "path", name=op.f("pk_directory_fingerprints")),
    )


def downgrade() -> None:
    op.drop_table("directory_fingerprints")
