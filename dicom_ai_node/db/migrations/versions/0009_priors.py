"""prior studies fetched for a job (issue 12 §3): the prior_fetch table

Revision ID: 0009
Revises: 0008
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "prior_fetch",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("criteria", sa.JSON(), nullable=False),
        sa.Column("prior_study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("prior_series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("prior_study_date", sa.String(length=8), nullable=True),
        sa.Column("expected_instances", sa.Integer(), nullable=True),
        sa.Column("received_instances", sa.Integer(), nullable=True),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_prior_fetch_job_id", "prior_fetch", ["job_id"], unique=True)
    op.create_index("ix_prior_fetch_study_instance_uid", "prior_fetch", ["study_instance_uid"])
    op.create_index("ix_prior_fetch_state", "prior_fetch", ["state"])
    op.create_index("ix_prior_fetch_prior_study_instance_uid", "prior_fetch", ["prior_study_instance_uid"])


def downgrade() -> None:
    op.drop_table("prior_fetch")
