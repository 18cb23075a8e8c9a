"""attachment uploads per sender: a member may cite, query and resume only what it uploaded

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import json
import re

import sqlalchemy as sa
from alembic import op

import node.store.db

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_STORED = re.compile(r"sha256=([0-9a-f]{64}) size=(\d+)")


def upgrade() -> None:
    uploads = op.create_table(
        "attachment_uploads",
        sa.Column("sender", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("stored_at", node.store.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sender", "sha256", name=op.f("pk_attachment_uploads")),
    )
    # Who uploaded what so far is in the audit log: each `attachment_stored` entry names the
    # uploading peer and the file. Before this table a file was stored once, for its first
    # uploader; a later sender of the same file re-uploads it once (its own copy is checked).
    connection = op.get_bind()
    entries = sa.table(
        "audit_entries",
        sa.column("event", sa.String),
        sa.column("entry", sa.LargeBinary),
        sa.column("recorded_at", node.store.db.UTCDateTime()),
    )
    rows = connection.execute(
        sa.select(entries.c.entry, entries.c.recorded_at).where(
            entries.c.event == "attachment_stored"
        )
    )
    seen: dict[tuple[str, str], dict[str, object]] = {}
    for entry, recorded_at in rows:
        fields = json.loads(bytes(entry))
        found = _STORED.search(str(fields.get("detail", "")))
        peer = fields.get("peer")
        if found is None or not isinstance(peer, str):
            continue
        seen.setdefault(
            (peer, found.group(1)),
            {
                "sender": peer,
                "sha256": found.group(1),
                "size": int(found.group(2)),
                "stored_at": recorded_at,
            },
        )
    if seen:
        op.bulk_insert(uploads, list(seen.values()))


def downgrade() -> None:
    op.drop_table("attachment_uploads")
