"""Read models for the local admin API: what was sent, what came in, what happened."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from node._pb.liandong.v1 import envelope_pb2
from node.exchange.errors import ExchangeError, Reason
from node.exchange.messages import UUID_RE, body_json, field_markings_of
from node.store.models import DeliveryRecord, MessageRecord


@dataclass(frozen=True)
class DeliveryView:
    recipient: str
    state: str
    attempts: int
    last_error: str
    delivered_at: datetime | None
    receipt_sha256: str
    receiver_log_index: int | None


@dataclass(frozen=True)
class ItemView:
    message_id: str
    direction: str
    family: str
    body_type: str
    sender: str
    recipients: list[str]
    created_at: datetime
    stored_at: datetime
    case_ref: str
    in_reply_to: str
    confidentiality: str
    body_json: str
    envelope_sha256: str
    attachments: list[envelope_pb2.AttachmentRef]
    deliveries: list[DeliveryView]
    handed_off: str | None
    field_markings: dict[str, str]
    version_of: str
    # Inbound: failed hand-off attempts, the last one's error, the next attempt (if any).
    handoff_attempts: int = 0
    handoff_error: str = ""
    handoff_retry_at: datetime | None = None


def _view(record: MessageRecord) -> ItemView:
    envelope = envelope_pb2.Envelope.FromString(record.envelope)
    message = envelope_pb2.Message.FromString(envelope.payload)
    return ItemView(
        message_id=record.message_id,
        direction="inbox" if record.direction == "in" else "outbox",
        family=record.family,
        body_type=record.body_type,
        sender=record.sender,
        recipients=json.loads(record.recipients),
        created_at=record.created_at,
        stored_at=record.stored_at,
        case_ref=record.case_ref,
        in_reply_to=record.in_reply_to,
        confidentiality=record.confidentiality,
        body_json=body_json(message),
        envelope_sha256=record.envelope_sha256,
        attachments=list(message.attachments),
        deliveries=[
            DeliveryView(
                d.recipient,
                d.state,
                d.attempts,
                d.last_error,
                d.delivered_at,
                d.receipt_sha256 or "",
                d.receiver_log_index,
            )
            for d in record.deliveries
        ],
        handed_off=record.handed_off,
        field_markings=field_markings_of(message),
        version_of=message.version_of,
        handoff_attempts=record.handoff_attempts,
        handoff_error=record.handoff_error,
        handoff_retry_at=record.handoff_retry_at,
    )


def list_items(session: Session, direction: str, limit: int) -> list[ItemView]:
    records = session.scalars(
        select(MessageRecord)
        .where(MessageRecord.direction == direction)
        .options(selectinload(MessageRecord.deliveries))
        .order_by(MessageRecord.id.desc())
        .limit(limit)
    ).all()
    return [_view(record) for record in records]


def get_item(session: Session, message_id: str) -> ItemView:
    if not UUID_RE.match(message_id):
        raise ExchangeError(Reason.INVALID, f"'{message_id}' is not a message id (a UUID)")
    record = session.scalar(
        select(MessageRecord)
        .where(MessageRecord.message_id == message_id)
        .options(selectinload(MessageRecord.deliveries))
        .order_by(MessageRecord.direction)
        .limit(1)
    )
    if record is None:
        raise ExchangeError(Reason.NOT_FOUND, f"no message {message_id} on this node")
    return _view(record)


def pending_deliveries(session: Session) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(DeliveryRecord)
            .where(DeliveryRecord.state == "pending")
        )
        or 0
    )
