"""trainer provenance and embeddings: which trainer made each asset's features, and its vector

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 10:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Which trainer (name, version, model file digest) produced the asset's features and embedding:
    # a job whose asset was trained by another trainer is decoded and trained again. NULL: never
    # trained by a trainer that recorded itself (rows from before this revision), so always stale.
    op.add_column("image_assets", sa.Column("trainer_name", sa.String(length=100), nullable=True))
    op.add_column("image_assets", sa.Column("trainer_version", sa.String(length=100), nullable=True))
    op.add_column("image_assets", sa.Column("model_digest", sa.String(length=64), nullable=True))
    # The trainer's vector, L2-normalised (float4[] on every PostgreSQL; pgvector indexes it where
    # the extension exists).
    op.add_column("image_assets", sa.Column("embedding", postgresql.ARRAY(sa.REAL()), nullable=True))
    # The trainer of the session's latest run, stamped by its owner when training starts: helpers
    # with another trainer do not take its chunks, so one run never mixes two models.
    op.add_column("training_sessions", sa.Column("trainer_name", sa.String(length=100), nullable=True))
    op.add_column("training_sessions", sa.Column("trainer_version", sa.String(length=100), nullable=True))
    op.add_column("training_sessions", sa.Column("model_digest", sa.String(length=64), nullable=True))
    op.add_column(
        "training_sessions", sa.Column("embedding_dimension", sa.Integer(), server_default="0", nullable=False)
    )
    # The trainer each worker runs, announced when it starts: the newest is "the configured trainer"
    # that GetSession counts stale images against.
    op.create_table(
        "worker_trainers",
        sa.Column("worker_id", sa.String(length=200), primary_key=True),
        sa.Column("trainer_name", sa.String(length=100), nullable=False),
        sa.Column("trainer_version", sa.String(length=100), nullable=False),
        sa.Column("model_digest", sa.String(length=64), nullable=False),
        sa.Column("embedding_dimension", sa.Integer(), nullable=False),
        sa.Column("announced_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("worker_trainers")
    for column in ("embedding_dimension", "model_digest", "trainer_version", "trainer_name"):
        op.drop_column("training_sessions", column)
    for column in ("embedding", "model_digest", "trainer_version", "trainer_name"):
        op.drop_column("image_assets", column)
