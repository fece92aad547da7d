"""retraction of delivered results (issue 13 §4)

Placeholder in the chain so parallel work has fixed revision numbers; the owner fills it in.

Revision ID: 0007
Revises: 0006
"""

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
