"""audit tree: Merkle nodes (every 4th level), leaf hashes and signed checkpoints

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import node.store.db

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("leaf_hash", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("receiver_proof", sa.LargeBinary(), nullable=True))
    op.create_table(
        "merkle_nodes",
        sa.Column("level", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("level", "idx", name=op.f("pk_merkle_nodes")),
    )
    op.create_table(
        "checkpoints",
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root", sa.LargeBinary(), nullable=False),
        sa.Column("note", sa.LargeBinary(), nullable=False),
        sa.Column("signed_at", node.store.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("size", name=op.f("pk_checkpoints")),
    )
    op.create_table(
        "cosignatures",
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("witness", sa.String(length=64), nullable=False),
        sa.Column("line", sa.LargeBinary(), nullable=False),
        sa.Column("received_at", node.store.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("size", "witness", name=op.f("pk_cosignatures")),
    )
    op.create_table(
        "witnessed",
        sa.Column("peer", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("root", sa.LargeBinary(), nullable=False),
        sa.Column("note", sa.LargeBinary(), nullable=False),
        sa.Column("seen_at", node.store.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("peer", name=op.f("pk_witnessed")),
    )


def downgrade() -> None:
    op.drop_table("witnessed")
    op.drop_table("cosignatures")
    op.drop_table("checkpoints")
    op.drop_table("merkle_nodes")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("receiver_proof")
    with op.batch_alter_table("audit_entries", schema=None) as batch_op:
        batch_op.drop_column("leaf_hash")
