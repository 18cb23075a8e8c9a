"""Handing stored inbound messages to the agency's local system, exactly once per message.

A message is offered to the plugins only after it is durably stored and its
receipt signed. The plugin's hook must be idempotent: after a crash between the
plugin's write and our record of it, the same message is offered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import cast

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node._pb.liandong.v1 import envelope_pb2
from node.audit import log as audit
from node.audit.log import AuditEvent
from node.exchange.attachments import BlobStore
from node.exchange.messages import (
    body_dict,
    body_type_of,
    confidentiality_label,
    family_of,
    field_markings_of,
)
from node.plugin_api import AttachmentFile, Confidentiality, HandOffWithheld, InboundItem
from node.store.models import MESSAGES, MessageRecord
from node.store.writer import Batch, BatchWriter

log = structlog.get_logger(__name__)

NOT_TAKEN = ""  # handed_off value when no plugin took the message
HANDED_OFF_MAX = 1024  # the handed_off column's length


class HandOffDeclined(Exception):
    """Raised by the node's hand-off when it declined the item on arrival
    (``liandong_review_inbound``): ``str(exc)`` says how and why, and names the answer sent."""


@dataclass(frozen=True)
class NotHandedOff:
    """The item must never reach the local system: recorded, audited, not offered again —
    withheld by a plugin (HandOffWithheld), or declined on arrival (HandOffDeclined)."""

    reason: str
    declined: bool = False

    @property
    def recorded(self) -> str:
        """What the messages table (and ``liandong inbox``) shows, cut to fit the column."""
        label = "declined" if self.declined else "withheld"
        return f"{label}: {self.reason}"[:HANDED_OFF_MAX]

    @property
    def event(self) -> AuditEvent:
        return AuditEvent.INBOUND_DECLINED if self.declined else AuditEvent.HAND_OFF_WITHHELD


HAND_OFF_GROUP = 100  # messages handed to the plugins in one thread hop and one commit


def inbound_item(record: MessageRecord, blobs: BlobStore) -> InboundItem:
    """The item for a stored inbound message."""
    envelope = envelope_pb2.Envelope.FromString(record.envelope)
    message = envelope_pb2.Message.FromString(envelope.payload)
    return item_for(message, record.envelope_sha256, record.stored_at, blobs)


def item_for(
    message: envelope_pb2.Message, envelope_sha256: str, received_at: datetime, blobs: BlobStore
) -> InboundItem:
    """The item for a verified inbound message, as the plugins see it."""
    attachments = tuple(
        AttachmentFile(
            file_name=ref.file_name,
            sha256=ref.sha256.hex(),
            size=ref.size,
            media_type=ref.media_type
            or mimetypes.guess_type(ref.file_name)[0]
            or "application/octet-stream",
            path=blobs.path_for(ref.sha256.hex()),
        )
        for ref in message.attachments
    )
    return InboundItem(
        message_id=message.message_id,
        family=family_of(message),
        body_type=body_type_of(message),
        sender=message.sender,
        recipients=tuple(message.recipients),
        created_at=datetime.fromtimestamp(message.created_at.seconds, UTC).replace(
            microsecond=message.created_at.nanos // 1000
        ),
        received_at=received_at,
        case_ref=message.case_ref,
        in_reply_to=message.in_reply_to,
        confidentiality=cast(Confidentiality, confidentiality_label(message)),
        body=body_dict(message),
        attachments=attachments,
        envelope_sha256=envelope_sha256,
        field_markings=cast(dict[str, Confidentiality], field_markings_of(message)),
        version_of=message.version_of,
    )


class HandOffWorker:
    """Hands each stored inbound message to the plugins and records the outcome.

    Messages just stored are offered in memory (``offer``), so the common path reads nothing
    back from the database. A poll of the messages table, at start-up and every
    ``retry_seconds``, finds what a crash left behind and retries failed hand-offs.
    """

    def __init__(
        self,
        agency: str,
        writer: BatchWriter,
        sessions: sessionmaker[Session],
        blobs: BlobStore,
        hand_off: Callable[[InboundItem], str | None],
        retry_seconds: float = 5.0,
    ) -> None:
        self.agency = agency
        self.writer = writer
        self.sessions = sessions
        self.blobs = blobs
        self.hand_off = hand_off
        self.retry_seconds = retry_seconds
        self._offered: dict[str, InboundItem] = {}
        self._wake = asyncio.Event()
        self._stopping = False

    def offer(self, items: list[InboundItem]) -> None:
        """Hand over messages that were just stored (committed)."""
        for item in items:
            self._offered[item.message_id] = item
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        failed: set[str] = set()
        next_poll = loop.time()  # at once: whatever a crash left behind
        while not self._stopping:
            self._wake.clear()
            if self._offered:
                items = list(self._offered.values())[:HAND_OFF_GROUP]
                for item in items:
                    del self._offered[item.message_id]
            elif loop.time() >= next_poll:
                polled = await asyncio.to_thread(self._pending, set(failed))
                # A message stored while the poll ran may be in both: keep the offered one.
                items = [item for item in polled if item.message_id not in self._offered]
                if len(polled) < HAND_OFF_GROUP:  # caught up: wait for the next round
                    next_poll = loop.time() + self.retry_seconds
                    failed.clear()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), timeout=max(0.0, next_poll - loop.time())
                    )
                continue
            if not items:
                continue
            # One thread hop for the whole group: the plugins' file writes are the slow part.
            outcomes = await asyncio.to_thread(self._hand_off_all, items)
            done = [(item, reference) for item, reference, error in outcomes if error is None]
            for item, _reference, error in outcomes:
                if error is not None:
                    log.error(
                        "hand-off failed; will retry", message_id=item.message_id, error=error
                    )
                    failed.add(item.message_id)
            if done:
                await self.writer.run(partial(self._record_all, done))

    def _hand_off_all(
        self, items: list[InboundItem]
    ) -> list[tuple[InboundItem, str | NotHandedOff | None, str | None]]:
        outcomes: list[tuple[InboundItem, str | NotHandedOff | None, str | None]] = []
        for item in items:
            if self._stopping:
                break
            try:
                outcomes.append((item, self.hand_off(item), None))
            except HandOffWithheld as refusal:
                # Final, not a failure: recorded and audited, never offered again.
                outcomes.append((item, NotHandedOff(str(refusal) or "no reason given"), None))
            except HandOffDeclined as declined:
                outcomes.append((item, NotHandedOff(str(declined), declined=True), None))
            except Exception as error:  # a plugin's failure must not stop the node
                outcomes.append((item, None, str(error)))
        return outcomes

    def _pending(self, failed: set[str]) -> list[InboundItem]:
        # Messages whose hand-off just failed are left out in SQL, so a hundred failing
        # ones cannot starve the messages behind them.
        with self.sessions() as session:
            records = session.scalars(
                select(MessageRecord)
                .where(
                    MessageRecord.direction == "in",
                    MessageRecord.handed_off.is_(None),
                    MessageRecord.message_id.not_in(failed),
                )
                .order_by(MessageRecord.id)
                .limit(HAND_OFF_GROUP)
            ).all()
            return [inbound_item(record, self.blobs) for record in records]

    def _record_all(
        self, done: list[tuple[InboundItem, str | NotHandedOff | None]], batch: Batch
    ) -> None:
        for item, reference in done:
            self._record(item, reference, batch)

    def _record(
        self, item: InboundItem, reference: str | NotHandedOff | None, batch: Batch
    ) -> None:
        if isinstance(reference, NotHandedOff):
            shown = reference.recorded
        else:
            # A plugin's reference longer than the column would fail the unit on PostgreSQL
            # and the hand-off would be retried for ever; the audit entry keeps it whole.
            shown = reference[:HANDED_OFF_MAX] if reference is not None else NOT_TAKEN
        batch.update(
            MESSAGES, {"message_id": item.message_id, "direction": "in"}, {"handed_off": shown}
        )
        if isinstance(reference, NotHandedOff):
            log.warning("not handed off", message_id=item.message_id, outcome=reference.recorded)
            audit.append(
                batch,
                reference.event,
                node=self.agency,
                at=datetime.now(UTC),
                message_id=item.message_id,
                envelope_sha256=item.envelope_sha256,
                detail=reference.reason,
            )
        elif reference is not None:
            audit.append(
                batch,
                AuditEvent.HANDED_OFF,
                node=self.agency,
                at=datetime.now(UTC),
                message_id=item.message_id,
                envelope_sha256=item.envelope_sha256,
                detail=reference,
            )
