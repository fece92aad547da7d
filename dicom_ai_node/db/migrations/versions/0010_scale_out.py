"""scale-out (issue 11): node_process (every serve/worker process and when it was last seen),
leader_lease (which process runs completion, routing, the outbox and the sweeps) and
job.claimed_by (the process running a job, so only a dead process's jobs are taken back)

Revision ID: 0010
Revises: 0009
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node_process",
        sa.Column("name", sa.String(length=200), primary_key=True),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=16), nullable=True),
        sa.Column("queues", sa.String(length=64), nullable=True),
        sa.Column("concurrency", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "leader_lease",
        sa.Column("name", sa.String(length=32), primary_key=True),
        sa.Column("holder", sa.String(length=200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("job") as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job") as batch_op:
        batch_op.drop_column("claimed_by")
    op.drop_table("leader_lease")
    op.drop_table("node_process")
