"""training_jobs without asset and subdirectory foreign keys

The two per-row FK checks (and the asset_id index that only served the asset FK's cascade) cost more
than the job insert itself in a discovery batch (benchmarks/profile_discovery_batch.py). Both ids are
written by the worker from rows it read or inserted in the same transaction; assets are never
deleted, and subdirectory rows go only with their session, whose FK (kept) cascades to its jobs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 00:55:11.606292
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index(op.f("ix_training_jobs_asset_id"), table_name="training_jobs")
    op.drop_constraint(
        op.f("fk_training_jobs_subdirectory_id_session_subdirectories"), "training_jobs", type_="foreignkey"
    )
    op.drop_constraint(op.f("fk_training_jobs_asset_id_image_assets"), "training_jobs", type_="foreignkey")


def downgrade() -> None:
    op.create_foreign_key(
        op.f("fk_training_jobs_asset_id_image_assets"),
        "training_jobs",
        "image_assets",
        ["asset_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.create_foreign_key(
        op.f("fk_training_jobs_subdirectory_id_session_subdirectories"),
        "training_jobs",
        "session_subdirectories",
        ["subdirectory_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.create_index(op.f("ix_training_jobs_asset_id"), "training_jobs", ["asset_id"], unique=False)
