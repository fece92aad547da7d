"""quality gate: job.qc_policy and the quality_check table (job states held, rejected, dropped
need no change: job.state is a plain VARCHAR(16))

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job") as batch_op:
        batch_op.add_column(sa.Column("qc_policy", sa.String(length=16), nullable=True))
    op.create_table(
        "quality_check",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("low", sa.Float(), nullable=True),
        sa.Column("high", sa.Float(), nullable=True),
        sa.Column("unit", sa.String(length=32), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_quality_check_job_id", "quality_check", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_quality_check_job_id", table_name="quality_check")
    op.drop_table("quality_check")
    with op.batch_alter_table("job") as batch_op:
        batch_op.drop_column("qc_policy")
