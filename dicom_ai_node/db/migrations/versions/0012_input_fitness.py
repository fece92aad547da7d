"""input fitness (issue 18): job.input_notes (the repairs the fitness check made before
inference), job.failed_step (where a failed job stopped: input, inference, encoding),
job.no_result_notice (its rule asks for a "no result" notice in the PACS) and
series.header_notes (what the index could not read or found missing in the first header)

Revision ID: 0012
Revises: 0011
"""
import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job") as batch_op:
        batch_op.add_column(sa.Column("input_notes", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("failed_step", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("no_result_notice", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
    with op.batch_alter_table("series") as batch_op:
        batch_op.add_column(sa.Column("header_notes", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch_op:
        batch_op.drop_column("header_notes")
    with op.batch_alter_table("job") as batch_op:
        batch_op.drop_column("no_result_notice")
        batch_op.drop_column("failed_step")
        batch_op.drop_column("input_notes")
