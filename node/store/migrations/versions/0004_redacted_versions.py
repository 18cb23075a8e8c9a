"""redacted versions: messages.version_of, so a version's recipient follows the first one's case

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("version_of", sa.String(length=36), nullable=True))
        batch.create_index("ix_messages_version_of", ["version_of"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_index("ix_messages_version_of")
        batch.drop_column("version_of")
