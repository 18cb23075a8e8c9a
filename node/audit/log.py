"""Audit entries: what happened, as self-contained deterministic bytes, the Merkle tree's leaves.

An entry is canonical JSON (UTF-8, keys sorted, no insignificant white space,
absent fields omitted, no floats) so that anyone can re-encode the fields and
get the same bytes. The entry does not contain its own index: its position in
the log is the index, as for the leaves of an RFC 6962 Merkle tree.

Indices are assigned only by the BatchWriter (the sequencer), so they are dense
and follow commit order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.audit.merkle import leaf_hash
from node.store.models import AUDIT_ENTRIES, AuditEntryRecord
from node.store.writer import Batch

ENTRY_VERSION = 1


class AuditEvent(StrEnum):
    SENT = "sent"
    RECEIPT_RECEIVED = "receipt_received"
    # A peer's answer to a delivery refused: a receipt or receiver's proof that does not hold,
    # an upload offset beyond the file (node.exchange.delivery); the delivery stays pending.
    ANSWER_REFUSED = "answer_refused"
    RECEIVED = "received"
    REJECTED = "rejected"
    ATTACHMENT_STORED = "attachment_stored"
    HANDED_OFF = "handed_off"
    HAND_OFF_WITHHELD = "hand_off_withheld"  # a plugin refused the item (e.g. not cleared)
    HAND_OFF_FAILED = "hand_off_failed"  # every attempt failed: no more until re-offered
    INBOUND_DECLINED = "inbound_declined"  # declined on arrival, not handed off
    REGISTRY_ACCEPTED = "registry_accepted"
    AUDIT_QUERY = "audit_query"  # a member read this log (Audit service), or was refused
    SPLIT_VIEW = "split_view"  # a peer showed this node two inconsistent checkpoints
    CASE_TRANSITION = "case_transition"  # a case moved (node.exchange.cases)
    CASE_MISMATCH = "case_mismatch"  # a peer's reply its case's lifecycle does not allow
    DEADLINE_OVERDUE = "deadline_overdue"  # a legal deadline passed (reminder sent, if any)
    DEADLINE_ESCALATED = "deadline_escalated"  # ... and was escalated to the supervisor


@dataclass(frozen=True)
class AuditEntry:
    index: int
    event: str
    fields: dict[str, str | int]
    raw: bytes


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds, e.g. 2026-11-23T10:00:00.000000Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_entry(fields: dict[str, str | int]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def append(
    batch: Batch,
    event: AuditEvent,
    *,
    node: str,
    at: datetime | None = None,
    message_id: str | None = None,
    envelope_sha256: str | None = None,
    peer: str | None = None,
    family: str | None = None,
    detail: str | None = None,
) -> int:
    """Queue one entry in the writer's batch; return the index it will have."""
    moment = at or datetime.now(UTC)
    fields: dict[str, str | int] = {"v": ENTRY_VERSION, "event": str(event), "node": node}
    fields["time"] = format_time(moment)
    optional = {
        "message_id": message_id,
        "envelope_sha256": envelope_sha256,
        "peer": peer,
        "family": family,
        "detail": detail,
    }
    fields.update({key: value for key, value in optional.items() if value})
    index = batch.take_audit_index()
    entry = encode_entry(fields)
    batch.insert(
        AUDIT_ENTRIES,
        {
            "idx": index,
            "event": str(event),
            "message_id": message_id,
            "envelope_sha256": envelope_sha256,
            "recorded_at": moment,
            "entry": entry,
            "leaf_hash": leaf_hash(entry),
        },
    )
    return index


def entries(session: Session, *, start: int = 0, limit: int = 1000) -> list[AuditEntry]:
    rows = session.scalars(
        select(AuditEntryRecord)
        .where(AuditEntryRecord.idx >= start)
        .order_by(AuditEntryRecord.idx)
        .limit(limit)
    )
    return [AuditEntry(r.idx, r.event, json.loads(r.entry), r.entry) for r in rows]


def size(session: Session) -> int:
    last = session.scalar(select(func.max(AuditEntryRecord.idx)))
    return 0 if last is None else last + 1
