"""DICOMweb (STOW-RS) destinations (issue 12 §2): destination.kind ('dimse' for every existing
row), url, auth ('none' | 'basic' | 'bearer'), username, secret_file / secret_env (where the
password or token is read at each send: the secret itself is never stored), verify_tls, ca_file;
ae_title, host and port become nullable (a DICOMweb destination has none)

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("destination") as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="dimse"))
        batch_op.add_column(sa.Column("url", sa.String(length=2048), nullable=True))
        batch_op.add_column(sa.Column("auth", sa.String(length=8), nullable=False, server_default="none"))
        batch_op.add_column(sa.Column("username", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("secret_file", sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column("secret_env", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("verify_tls", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.add_column(sa.Column("ca_file", sa.String(length=1024), nullable=True))
        batch_op.alter_column("ae_title", existing_type=sa.String(length=16), nullable=True)
        batch_op.alter_column("host", existing_type=sa.String(length=255), nullable=True)
        batch_op.alter_column("port", existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    # the old schema cannot hold a DICOMweb destination: those rows go (their deliveries stay,
    # and fail as "not configured" like any destination removed)
    op.execute(sa.text("DELETE FROM destination WHERE kind <> 'dimse'"))
    with op.batch_alter_table("destination") as batch_op:
        batch_op.alter_column("port", existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column("host", existing_type=sa.String(length=255), nullable=False)
        batch_op.alter_column("ae_title", existing_type=sa.String(length=16), nullable=False)
        for column in ("ca_file", "verify_tls", "secret_env", "secret_file", "username", "auth", "url", "kind"):
            batch_op.drop_column(column)
