"""trace context of the latest client transition, so a worker's run joins the caller's trace

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 10:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # W3C traceparent of the call that last moved the session (StartSession, RestartSession...), or
    # '' when that call was not traced: the claiming worker's `session.run` span is its child.
    op.add_column(
        "training_sessions", sa.Column("trace_context", sa.String(length=64), server_default="", nullable=False)
    )


def downgrade() -> None:
    op.drop_column("training_sessions", "trace_context")
