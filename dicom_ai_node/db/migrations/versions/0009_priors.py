"""prior studies fetched for a job (issue 12 §3)

Placeholder in the chain so parallel work has fixed revision numbers; the owner fills it in.

Revision ID: 0009
Revises: 0008
"""

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
