"""training chunks leased to any worker: a lease per running job, wall-clock training time

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A job in state 'running' belongs to the chunk whose token it holds until the lease expires.
    op.add_column("training_jobs", sa.Column("lease_token", sa.String(length=36), nullable=True))
    op.add_column("training_jobs", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    # The worker whose chunk wrote the job's outcome (any worker may train any running session).
    op.add_column("training_jobs", sa.Column("trained_by", sa.String(length=200), nullable=True))
    # When the session's training time was last advanced: each chunk commit, by any worker, adds the
    # wall-clock time since then, so two workers training at once do not count the same second twice.
    op.add_column("training_sessions", sa.Column("training_mark", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("training_sessions", "training_mark")
    op.drop_column("training_jobs", "trained_by")
    op.drop_column("training_jobs", "lease_expires_at")
    op.drop_column("training_jobs", "lease_token")
