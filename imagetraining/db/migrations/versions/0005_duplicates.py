"""exact and near duplicates: a content digest per asset, the near duplicate a job resembles

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 03:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for assets hashed before: their stored hash no longer counts as valid (training.py asks
    # for a digest too), so each is read once more and gets one.
    op.add_column("image_assets", sa.Column("content_digest", sa.String(length=32), nullable=True))
    op.add_column("training_jobs", sa.Column("near_duplicate_of_asset_id", sa.BigInteger(), nullable=True))
    op.add_column("training_jobs", sa.Column("near_duplicate_distance", sa.SmallInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("training_jobs", "near_duplicate_distance")
    op.drop_column("training_jobs", "near_duplicate_of_asset_id")
    op.drop_column("image_assets", "content_digest")
