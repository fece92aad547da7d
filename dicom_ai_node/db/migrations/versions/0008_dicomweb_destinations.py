"""DICOMweb (STOW-RS) destinations (issue 12 §2)

Placeholder in the chain so parallel work has fixed revision numbers; the owner fills it in.

Revision ID: 0008
Revises: 0007
"""

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
