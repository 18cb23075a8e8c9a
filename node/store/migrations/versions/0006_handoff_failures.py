"""hand-off failures: attempts, last error and next retry of an inbound message's hand-off

A hand-off that keeps failing (e.g. a file name the local folder cannot hold) is retried with
a growing delay and, after `[handoff] max_attempts`, recorded as failed for the officer to
see instead of being retried for ever (node.exchange.handoff).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import node.store.db

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(
            sa.Column("handoff_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("handoff_error", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("handoff_retry_at", node.store.db.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("handoff_retry_at")
        batch.drop_column("handoff_error")
        batch.drop_column("handoff_attempts")
