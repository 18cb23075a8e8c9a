"""case lifecycles: cases, their transitions and deadline clocks; the registries run on

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import node.store.db

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registries",
        sa.Column("serial", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("accepted_at", node.store.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("serial", name=op.f("pk_registries")),
    )
    op.create_table(
        "case_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("case_id", sa.String(length=36), nullable=False),
        sa.Column("peer", sa.String(length=64), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("from_state", sa.String(length=32), nullable=False),
        sa.Column("to_state", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.String(length=36), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", node.store.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_case_events")),
    )
    with op.batch_alter_table("case_events", schema=None) as batch_op:
        batch_op.create_index("ix_case_events_case", ["case_id", "peer"], unique=False)
        batch_op.create_index("ix_case_events_message_id", ["message_id"], unique=False)

    op.create_table(
        "cases",
        sa.Column("case_id", sa.String(length=36), nullable=False),
        sa.Column("peer", sa.String(length=64), nullable=False),
        sa.Column("family", sa.String(length=32), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("title", sa.String(length=256), nullable=False),
        sa.Column("confidentiality", sa.String(length=16), nullable=False),
        sa.Column("attrs", sa.Text(), nullable=False),
        sa.Column("opened_at", node.store.db.UTCDateTime(), nullable=False),
        sa.Column("updated_at", node.store.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("case_id", "peer", name=op.f("pk_cases")),
    )
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.create_index("ix_cases_state", ["state"], unique=False)

    op.create_table(
        "clocks",
        sa.Column("case_id", sa.String(length=36), nullable=False),
        sa.Column("peer", sa.String(length=64), nullable=False),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("responsible", sa.String(length=64), nullable=False),
        sa.Column("started_at", node.store.db.UTCDateTime(), nullable=False),
        sa.Column("due_at", node.store.db.UTCDateTime(), nullable=False),
        sa.Column("warn_at", node.store.db.UTCDateTime(), nullable=False),
        sa.Column("escalate_at", node.store.db.UTCDateTime(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("next_action_at", node.store.db.UTCDateTime(), nullable=True),
        sa.Column("closed_at", node.store.db.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("case_id", "peer", "rule", name=op.f("pk_clocks")),
    )
    with op.batch_alter_table("clocks", schema=None) as batch_op:
        batch_op.create_index("ix_clocks_next_action_at", ["next_action_at"], unique=False)


def downgrade() -> None:
    op.drop_table("registries")
    with op.batch_alter_table("clocks", schema=None) as batch_op:
        batch_op.drop_index("ix_clocks_next_action_at")

    op.drop_table("clocks")
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_index("ix_cases_state")

    op.drop_table("cases")
    with op.batch_alter_table("case_events", schema=None) as batch_op:
        batch_op.drop_index("ix_case_events_message_id")
        batch_op.drop_index("ix_case_events_case")

    op.drop_table("case_events")
