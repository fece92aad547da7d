"""pause and dead letters: destination.paused_at / paused_by (a paused destination's deliveries
stay pending, not attempted) and delivery.failed_at (when a delivery gave up for good)

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("destination") as batch_op:
        batch_op.add_column(sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("paused_by", sa.String(length=64), nullable=True))
    with op.batch_alter_table("delivery") as batch_op:
        batch_op.add_column(sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("delivery") as batch_op:
        batch_op.drop_column("failed_at")
    with op.batch_alter_table("destination") as batch_op:
        batch_op.drop_column("paused_by")
        batch_op.drop_column("paused_at")
