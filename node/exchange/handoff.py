"""Handing stored inbound messages to the agency's local system, exactly once per message.

A message is offered to the plugins only after it is durably stored and its
receipt signed. The plugin's hook must be idempotent: after a crash between the
plugin's write and our record of it, the same message is offered again.

A hand-off that fails is retried with a growing delay (``[handoff]``: retry_seconds, doubled
each time up to max_backoff_seconds), the attempts and the last error kept with the message;
after max_attempts it is recorded as failed ("failed: <error>" where the local system's
reference would be, audited as ``hand_off_failed``) and not tried again until the operator
re-offers it (``liandong handoff retry``, :func:`reoffer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import cast

import structlog
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from node._pb.liandong.v1 import envelope_pb2
from node.audit import log as audit
from node.audit.log import AuditEvent
from node.config import HandOff
from node.exchange.attachments import BlobStore
from node.exchange.errors import ExchangeError, Reason
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
FAILED = "failed: "  # handed_off of a message whose every attempt failed, before the error


def is_failed(handed_off: str | None, handoff_error: str) -> bool:
    """Whether a message's hand-off failed for good (rather than was taken or withheld)."""
    return handed_off is not None and handed_off.startswith(FAILED) and bool(handoff_error)


def _error_text(error: str) -> str:
    """An error as the messages table keeps it: no NUL (PostgreSQL stores none), bounded."""
    return (error.replace("\x00", "\\x00") or "no error text")[:HANDED_OFF_MAX]


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
    ``settings.retry_seconds``, finds what a crash left behind and the failed hand-offs whose
    next attempt is due.
    """

    def __init__(
        self,
        agency: str,
        writer: BatchWriter,
        sessions: sessionmaker[Session],
        blobs: BlobStore,
        hand_off: Callable[[InboundItem], str | None],
        settings: HandOff | None = None,
    ) -> None:
        self.agency = agency
        self.writer = writer
        self.sessions = sessions
        self.blobs = blobs
        self.hand_off = hand_off
        self.settings = settings or HandOff()
        self._offered: dict[str, InboundItem] = {}
        self._wake = asyncio.Event()
        self._poll_now = False
        self._stopping = False

    def offer(self, items: list[InboundItem]) -> None:
        """Hand over messages that were just stored (committed)."""
        for item in items:
            self._offered[item.message_id] = item
        self._wake.set()

    def poll(self) -> None:
        """Look for due messages now rather than at the next round (e.g. one re-offered)."""
        self._poll_now = True
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def delay(self, attempts: int) -> float:
        """Seconds before the next attempt after ``attempts`` failed ones."""
        settings = self.settings
        return float(
            min(settings.retry_seconds * 2 ** min(attempts - 1, 62), settings.max_backoff_seconds)
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_poll = loop.time()  # at once: whatever a crash left behind
        while not self._stopping:
            self._wake.clear()
            if self._offered:
                items = list(self._offered.values())[:HAND_OFF_GROUP]
                for item in items:
                    del self._offered[item.message_id]
            elif self._poll_now or loop.time() >= next_poll:
                self._poll_now = False
                polled = await asyncio.to_thread(self._pending, datetime.now(UTC))
                # A message stored while the poll ran may be in both: keep the offered one.
                items = [item for item in polled if item.message_id not in self._offered]
                if len(polled) < HAND_OFF_GROUP:  # caught up: wait for the next round
                    next_poll = loop.time() + self.settings.retry_seconds
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
            failed = [(item, error) for item, _reference, error in outcomes if error is not None]
            if done or failed:
                await self.writer.run(partial(self._record_all, done, failed))

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
                outcomes.append((item, None, f"{type(error).__name__}: {error}"))
        return outcomes

    def _pending(self, now: datetime) -> list[InboundItem]:
        # Messages whose hand-off failed wait in SQL until their next attempt is due, so a
        # hundred failing ones cannot starve the messages behind them.
        with self.sessions() as session:
            records = session.scalars(
                select(MessageRecord)
                .where(
                    MessageRecord.direction == "in",
                    MessageRecord.handed_off.is_(None),
                    or_(
                        MessageRecord.handoff_retry_at.is_(None),
                        MessageRecord.handoff_retry_at <= now,
                    ),
                )
                .order_by(MessageRecord.id)
                .limit(HAND_OFF_GROUP)
            ).all()
            return [inbound_item(record, self.blobs) for record in records]

    def _record_all(
        self,
        done: list[tuple[InboundItem, str | NotHandedOff | None]],
        failed: list[tuple[InboundItem, str]],
        batch: Batch,
    ) -> None:
        for item, reference in done:
            self._record(item, reference, batch)
        if failed:
            self._record_failures(failed, batch)

    def _record_failures(self, failed: list[tuple[InboundItem, str]], batch: Batch) -> None:
        """Count each failed attempt; schedule the next, or record the last as final."""
        now = datetime.now(UTC)
        rows = batch.session.execute(
            select(MESSAGES.c.message_id, MESSAGES.c.handoff_attempts).where(
                MESSAGES.c.message_id.in_([item.message_id for item, _ in failed]),
                MESSAGES.c.direction == "in",
                MESSAGES.c.handed_off.is_(None),
            )
        ).all()
        attempts_before = {row.message_id: row.handoff_attempts for row in rows}
        for item, error in failed:
            if item.message_id not in attempts_before:
                continue  # recorded meanwhile
            attempts = attempts_before[item.message_id] + 1
            text = _error_text(error)
            key = {"message_id": item.message_id, "direction": "in"}
            if attempts < self.settings.max_attempts:
                retry_at = now + timedelta(seconds=self.delay(attempts))
                log.error(
                    "hand-off failed; will retry",
                    message_id=item.message_id,
                    error=text,
                    attempt=attempts,
                    of=self.settings.max_attempts,
                    retry_at=retry_at.isoformat(),
                )
                batch.update(
                    MESSAGES,
                    key,
                    {
                        "handoff_attempts": attempts,
                        "handoff_error": text,
                        "handoff_retry_at": retry_at,
                    },
                )
                continue
            log.error(
                "hand-off failed for good; re-offer it once fixed: liandong handoff retry",
                message_id=item.message_id,
                error=text,
                attempts=attempts,
            )
            batch.update(
                MESSAGES,
                key,
                {
                    "handed_off": f"{FAILED}{text}"[:HANDED_OFF_MAX],
                    "handoff_attempts": attempts,
                    "handoff_error": text,
                    "handoff_retry_at": None,
                },
            )
            audit.append(
                batch,
                AuditEvent.HAND_OFF_FAILED,
                node=self.agency,
                at=now,
                message_id=item.message_id,
                envelope_sha256=item.envelope_sha256,
                detail=f"after {attempts} attempts: {text}",
            )

    def _record(
        self, item: InboundItem, reference: str | NotHandedOff | None, batch: Batch
    ) -> None:
        if isinstance(reference, NotHandedOff):
            shown = reference.recorded
        else:
            # A plugin's reference longer than the column would fail the unit on PostgreSQL
            # and the hand-off would be retried for ever; the audit entry keeps it whole.
            shown = reference[:HANDED_OFF_MAX] if reference is not None else NOT_TAKEN
        # Nor may a NUL in it (a plugin's text) fail it.
        shown = shown.replace("\x00", "\\x00")[:HANDED_OFF_MAX]
        batch.update(
            MESSAGES,
            {"message_id": item.message_id, "direction": "in"},
            {"handed_off": shown, "handoff_retry_at": None, "handoff_error": ""},
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


def reoffer(message_id: str, batch: Batch) -> None:
    """Offer an inbound message to the local system again (a unit of work for the writer):
    one that failed for good, or one waiting for its next attempt (at once). Its attempts
    count anew; the last error stays shown until a hand-off succeeds.

    :raises ExchangeError: NOT_FOUND for no such inbound message; PRECONDITION when it was
        handed off, withheld or declined (final outcomes, not failures).
    """
    row = batch.session.execute(
        select(MESSAGES.c.handed_off, MESSAGES.c.handoff_error).where(
            MESSAGES.c.message_id == message_id, MESSAGES.c.direction == "in"
        )
    ).first()
    if row is None:
        raise ExchangeError(Reason.NOT_FOUND, f"no inbound message {message_id} on this node")
    if row.handed_off is not None and not is_failed(row.handed_off, row.handoff_error):
        raise ExchangeError(
            Reason.PRECONDITION,
            f"message {message_id} did not fail its hand-off: the local system has "
            f"'{row.handed_off[:200] or 'nothing (no plugin took it)'}'",
        )
    batch.update(
        MESSAGES,
        {"message_id": message_id, "direction": "in"},
        {"handed_off": None, "handoff_attempts": 0, "handoff_retry_at": None},
    )
    log.info("hand-off re-offered", message_id=message_id)
