"""leader leases and job ownership for the scaled-out form (issue 11)

Placeholder in the chain so parallel work has fixed revision numbers; the owner fills it in.

Revision ID: 0010
Revises: 0009
"""

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
