"""The node's tables. Envelopes are stored as the exact bytes that were signed."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import BigInteger, Index, LargeBinary, String, Table, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from node.store.db import Base


class MessageRecord(Base):
    """A message this node sent (direction "out") or received (direction "in")."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("message_id", "direction"),
        Index("ix_messages_direction_stored_at", "direction", "stored_at"),
        Index("ix_messages_client_key", "client_key", unique=True),
        Index("ix_messages_pending_handoff", "direction", "handed_off"),
        Index("ix_messages_version_of", "version_of"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[str] = mapped_column(String(36))
    direction: Mapped[str] = mapped_column(String(3))
    sender: Mapped[str] = mapped_column(String(64))
    recipients: Mapped[str] = mapped_column(Text)  # JSON list
    family: Mapped[str] = mapped_column(String(32))
    body_type: Mapped[str] = mapped_column(String(32))
    case_ref: Mapped[str] = mapped_column(String(128), default="")
    in_reply_to: Mapped[str] = mapped_column(String(36), default="")
    confidentiality: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    stored_at: Mapped[datetime]
    envelope: Mapped[bytes] = mapped_column(LargeBinary)
    envelope_sha256: Mapped[str] = mapped_column(String(64))
    # Outbound: the local submitter's idempotency key (drop-folder path, client key).
    client_key: Mapped[str | None] = mapped_column(String(512), default=None)
    # Inbound: the receipt we issued, returned verbatim to a retried delivery.
    receipt: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    log_index: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # Inbound: the local system's reference once a plugin has taken the message.
    handed_off: Mapped[str | None] = mapped_column(String(1024), default=None)
    # A version redacted for some recipients: the first version's id (Message.version_of).
    version_of: Mapped[str | None] = mapped_column(String(36), default=None)
    # Inbound: failed attempts to hand it to the local system, the last one's error and when
    # the next is due (node.exchange.handoff); no next once handed off or failed for good.
    handoff_attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    handoff_error: Mapped[str] = mapped_column(Text, default="", server_default="")
    handoff_retry_at: Mapped[datetime | None] = mapped_column(default=None)

    deliveries: Mapped[list[DeliveryRecord]] = relationship(
        primaryjoin="and_(MessageRecord.message_id == foreign(DeliveryRecord.message_id), "
        "MessageRecord.direction == 'out')",
        order_by="DeliveryRecord.recipient",
        viewonly=True,
    )


class DeliveryRecord(Base):
    """One recipient of an outbound message: the transactional outbox row."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("message_id", "recipient"),
        Index("ix_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # The outbound message's id (messages.message_id with direction "out"); a client-made id,
    # so a whole batch of messages and their deliveries is written without reading ids back.
    message_id: Mapped[str] = mapped_column(String(36))
    recipient: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime]
    last_error: Mapped[str] = mapped_column(Text, default="")
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    receipt: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    receipt_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    receiver_log_index: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # The receiver's tlog-proof of its "received" entry, checked on arrival (empty: none came).
    receiver_proof: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)


class AttachmentRecord(Base):
    """A verified file in the content-addressed blob store (blobs/<sha256>)."""

    __tablename__ = "attachments"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    stored_at: Mapped[datetime]


class AttachmentUploadRecord(Base):
    """A sender that uploaded a verified file itself: what it may cite, query and resume.

    The blob store is shared (content-addressed); this is what keeps one member from
    learning, or citing, a file another agency uploaded (docs/protocol.md section 7).
    """

    __tablename__ = "attachment_uploads"

    sender: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    stored_at: Mapped[datetime]


class AuditEntryRecord(Base):
    """One audit-log entry: a self-contained, deterministic byte string (node.audit.log)."""

    __tablename__ = "audit_entries"

    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    event: Mapped[str] = mapped_column(String(32))
    message_id: Mapped[str | None] = mapped_column(String(36), index=True, default=None)
    envelope_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    recorded_at: Mapped[datetime]
    entry: Mapped[bytes] = mapped_column(LargeBinary)
    # SHA-256(0x00 || entry), the Merkle leaf, as written: the entry's own fingerprint, so a
    # check can name the very entry that was changed afterwards (the signed checkpoints are
    # what proves it; this only points at it). Empty in logs written before the tree.
    leaf_hash: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)


class MerkleNodeRecord(Base):
    """A perfect subtree of the audit log's Merkle tree, at a level that is a multiple of 4.

    The hash of the 2**level entries from index idx * 2**level (node.audit.tree): the levels
    between are recomputed from these or from the entries' leaf hashes, 16 hashes at most.
    """

    __tablename__ = "merkle_nodes"

    level: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary)


class CheckpointRecord(Base):
    """A checkpoint this node signed over its audit log (C2SP tlog-checkpoint, signed note)."""

    __tablename__ = "checkpoints"

    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root: Mapped[bytes] = mapped_column(LargeBinary)
    note: Mapped[bytes] = mapped_column(LargeBinary)  # the whole signed note
    signed_at: Mapped[datetime]


class CosignatureRecord(Base):
    """A witness's tlog-cosignature/v1 of one of this node's checkpoints."""

    __tablename__ = "cosignatures"

    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    witness: Mapped[str] = mapped_column(String(64), primary_key=True)
    line: Mapped[bytes] = mapped_column(LargeBinary)  # the signature line, as the witness sent it
    received_at: Mapped[datetime]


class WitnessedRecord(Base):
    """The latest checkpoint of a peer's log this node saw, verified and consistent."""

    __tablename__ = "witnessed"

    peer: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    root: Mapped[bytes] = mapped_column(LargeBinary)
    note: Mapped[bytes] = mapped_column(LargeBinary)
    seen_at: Mapped[datetime]


class NodeStateRecord(Base):
    """Small durable facts, e.g. the highest registry serial accepted (rollback guard)."""

    __tablename__ = "node_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class RegistryRecord(Base):
    """Every federation registry this node ran on, as the operator signed it: audit bundles
    carry them all, so a signature made under a key a later registry dropped still checks."""

    __tablename__ = "registries"

    serial: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    accepted_at: Mapped[datetime]


class CaseRecord(Base):
    """One case as this node sees it: an opening message between this node and one peer
    (node.exchange.cases), with its lifecycle state."""

    __tablename__ = "cases"
    __table_args__ = (Index("ix_cases_state", "state"),)

    case_id: Mapped[str] = mapped_column(String(36), primary_key=True)  # the opening message
    peer: Mapped[str] = mapped_column(String(64), primary_key=True)
    family: Mapped[str] = mapped_column(String(32))
    role: Mapped[str] = mapped_column(String(16))  # this node's: "opener" or "addressee"
    state: Mapped[str] = mapped_column(String(32))
    title: Mapped[str] = mapped_column(String(256), default="")
    confidentiality: Mapped[str] = mapped_column(String(16), default="internal")
    attrs: Mapped[str] = mapped_column(Text, default="{}")  # JSON: urgent, deadline, ...
    opened_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class CaseEventRecord(Base):
    """One transition of a case: what caused it (a message or a local decision), and why."""

    __tablename__ = "case_events"
    __table_args__ = (
        Index("ix_case_events_case", "case_id", "peer"),
        Index("ix_case_events_message_id", "message_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[str] = mapped_column(String(36))
    peer: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str | None] = mapped_column(String(36), default=None)
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime]


class ClockRecord(Base):
    """A legal deadline running on a case (node.exchange.deadlines)."""

    __tablename__ = "clocks"
    __table_args__ = (Index("ix_clocks_next_action_at", "next_action_at"),)

    case_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    peer: Mapped[str] = mapped_column(String(64), primary_key=True)
    rule: Mapped[str] = mapped_column(String(64), primary_key=True)
    responsible: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime]
    due_at: Mapped[datetime]
    warn_at: Mapped[datetime]
    escalate_at: Mapped[datetime | None] = mapped_column(default=None)
    # open -> due_soon -> overdue -> escalated, or met / met_late when the case moves on.
    state: Mapped[str] = mapped_column(String(16))
    # When the scheduler must look at it next; NULL once nothing more can happen. Indexed,
    # so a pass reads only what is due, whatever the number of open clocks.
    next_action_at: Mapped[datetime | None] = mapped_column(default=None)
    closed_at: Mapped[datetime | None] = mapped_column(default=None)


# Typed handles on the tables, for the writer's Core statements.
MESSAGES = cast(Table, MessageRecord.__table__)
DELIVERIES = cast(Table, DeliveryRecord.__table__)
ATTACHMENTS = cast(Table, AttachmentRecord.__table__)
ATTACHMENT_UPLOADS = cast(Table, AttachmentUploadRecord.__table__)
AUDIT_ENTRIES = cast(Table, AuditEntryRecord.__table__)
NODE_STATE = cast(Table, NodeStateRecord.__table__)
MERKLE_NODES = cast(Table, MerkleNodeRecord.__table__)
CHECKPOINTS = cast(Table, CheckpointRecord.__table__)
COSIGNATURES = cast(Table, CosignatureRecord.__table__)
WITNESSED = cast(Table, WitnessedRecord.__table__)
REGISTRIES = cast(Table, RegistryRecord.__table__)
CASES = cast(Table, CaseRecord.__table__)
CASE_EVENTS = cast(Table, CaseEventRecord.__table__)
CLOCKS = cast(Table, ClockRecord.__table__)


def message_row(**fields: Any) -> dict[str, Any]:
    """A full `messages` row: every batch insert into a table must have the same keys."""
    row: dict[str, Any] = {
        "case_ref": "",
        "in_reply_to": "",
        "client_key": None,
        "receipt": None,
        "log_index": None,
        "handed_off": None,
        "version_of": None,
    }
    row.update(fields)
    return row
