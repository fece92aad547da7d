"""retraction of delivered results (issue 13 §4): a `retraction` row per retraction (who, when,
why, the rejection KOS it sent) and result_object.retracted_at / retraction_id on each result
it took back; disabled_model.recalled_version (a model version disabled as recalled)

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retraction",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("job.id"), nullable=False, index=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kos_sop_instance_uid", sa.String(length=64), nullable=True),
    )
    with op.batch_alter_table("result_object") as batch_op:
        batch_op.add_column(sa.Column("retracted_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("retraction_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key("fk_result_object_retraction", "retraction", ["retraction_id"], ["id"])
        batch_op.create_index("ix_result_object_retraction_id", ["retraction_id"])
    with op.batch_alter_table("disabled_model") as batch_op:
        batch_op.add_column(sa.Column("recalled_version", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("disabled_model") as batch_op:
        batch_op.drop_column("recalled_version")
    with op.batch_alter_table("result_object") as batch_op:
        batch_op.drop_index("ix_result_object_retraction_id")
        batch_op.drop_constraint("fk_result_object_retraction", type_="foreignkey")
        batch_op.drop_column("retraction_id")
        batch_op.drop_column("retracted_at")
    op.drop_table("retraction")
