"""user management: web_user.disabled; api_token.prefix and api_token.expires_at (tokens that
exist already expire 90 days after this upgrade)

Revision ID: 0006
Revises: 0005
"""
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMN, no batch (table copy): on SQLite, re-creating web_user would cascade-delete
    # every session and token; expires_at stays nullable in the schema, the node always sets it
    op.add_column("web_user", sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("api_token", sa.Column("prefix", sa.String(length=16), nullable=True))
    op.add_column("api_token", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    expires = datetime.now(UTC) + timedelta(days=90)
    op.get_bind().execute(sa.text("UPDATE api_token SET expires_at = :expires WHERE expires_at IS NULL"),
                          {"expires": expires})


def downgrade() -> None:  # note: on SQLite the web_user copy drops its sessions and tokens
    with op.batch_alter_table("api_token") as batch_op:
        batch_op.drop_column("expires_at")
        batch_op.drop_column("prefix")
    with op.batch_alter_table("web_user") as batch_op:
        batch_op.drop_column("disabled")
