"""retired_count (issue 13): what retention deleted of the rows /metrics counts, so its
counters (instances received, bytes, studies completed, QC checks, delivery failures) never
go down when old studies are deleted

Revision ID: 0011
Revises: 0010
"""
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retired_count",
        sa.Column("name", sa.String(length=64), primary_key=True),
        sa.Column("labels", sa.String(length=200), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("retired_count")
