"""Delivering the outbox: send each pending (message, recipient) until a valid receipt returns.

Retries back off exponentially (with jitter) up to a ceiling and go on for as
long as the peer is away; receivers are idempotent on the message id, so a
retry after a lost answer yields the original receipt, never a second copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import BinaryIO, Protocol

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node._pb.liandong.v1 import envelope_pb2
from node.audit import log as audit
from node.audit.log import AuditEvent
from node.config import Delivery
from node.envelope import RECEIPT_PAYLOAD_TYPE, EnvelopeError, envelope_digest, verify_envelope
from node.exchange.attachments import BlobStore
from node.exchange.context import NodeContext
from node.exchange.errors import ExchangeError, Reason
from node.federation import Member, Registry
from node.store.models import DELIVERIES, DeliveryRecord, MessageRecord
from node.store.writer import Batch, BatchWriter

log = structlog.get_logger(__name__)
POLL_SECONDS = 0.5


class TransportError(Exception):
    """The peer could not be reached or refused the call; the message says why."""


class PeerTransport(Protocol):
    async def deliver(
        self, member: Member, family: str, envelope: envelope_pb2.Envelope
    ) -> envelope_pb2.Envelope: ...

    async def attachment_held(
        self, member: Member, envelope: envelope_pb2.Envelope, sha256: bytes
    ) -> tuple[int, bool]: ...

    async def upload(
        self,
        member: Member,
        envelope: envelope_pb2.Envelope,
        sha256: bytes,
        offset: int,
        source: BinaryIO,
    ) -> bool: ...


@dataclass(frozen=True)
class Confirmation:
    message_id: str
    recipient: str
    delivered_at: datetime
    receipt_sha256: str
    receiver_log_index: int


@dataclass(frozen=True)
class Due:
    """One (message, recipient) to deliver: what the worker needs, without a query."""

    recipient: str
    message_id: str
    family: str
    envelope: bytes
    envelope_sha256: str
    attempts: int

    @property
    def key(self) -> tuple[str, str]:
        return self.message_id, self.recipient


def verify_receipt(
    registry: Registry,
    recipient: str,
    receipt: envelope_pb2.Envelope,
    message_id: str,
    digest: bytes,
) -> envelope_pb2.Receipt:
    """Check a receipt is signed by the recipient and names exactly what was sent."""
    try:
        verify_envelope(receipt, RECEIPT_PAYLOAD_TYPE, registry.public_keys(recipient))
    except EnvelopeError as error:
        raise ExchangeError(Reason.UNAUTHENTICATED, f"receipt from {recipient}: {error}") from None
    body = envelope_pb2.Receipt()
    body.ParseFromString(receipt.payload)
    problems = []
    if body.message_id != message_id:
        problems.append(f"it names message {body.message_id}")
    if body.envelope_sha256 != digest:
        problems.append("its envelope digest differs from what was sent")
    if body.receiver != recipient:
        problems.append(f"it is signed as receiver '{body.receiver}'")
    if problems:
        raise ExchangeError(
            Reason.INVALID,
            f"receipt from {recipient} for {message_id} is wrong: " + "; ".join(problems),
        )
    return body


class DeliveryWorker:
    def __init__(
        self,
        context: NodeContext,
        writer: BatchWriter,
        sessions: sessionmaker[Session],
        blobs: BlobStore,
        transport: PeerTransport,
        settings: Delivery,
        on_confirmed: Callable[[Confirmation], Awaitable[None]] | None = None,
    ) -> None:
        self.context = context
        self.writer = writer
        self.sessions = sessions
        self.blobs = blobs
        self.transport = transport
        self.settings = settings
        self.on_confirmed = on_confirmed
        self._wake = asyncio.Event()
        self._stopping = False
        self._ready: deque[Due] = deque()
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        # Deliveries finished while a database poll was running: its snapshot may predate them.
        self._finished_during_poll: set[tuple[str, str]] = set()
        self.delivered = 0

    def enqueue(self, items: list[Due]) -> None:
        """Hand over deliveries that were just committed (no database poll needed)."""
        for item in items:
            if item.key not in self._inflight:
                self._ready.append(item)
        self._wake.set()

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._inflight:
            await asyncio.wait(list(self._inflight.values()), timeout=timeout)
        for task in self._inflight.values():
            task.cancel()

    async def run(self) -> None:
        """Deliver what is handed over at once; poll the outbox for retries and leftovers.

        The poll also finds, after a restart, everything that was pending at the crash.
        """
        loop = asyncio.get_running_loop()
        last_poll = -POLL_SECONDS
        while not self._stopping:
            self._wake.clear()
            if loop.time() - last_poll >= POLL_SECONDS:
                last_poll = loop.time()
                self._finished_during_poll.clear()
                polled = await asyncio.to_thread(self._due, self.settings.concurrency * 4)
                waiting = {item.key for item in self._ready} | set(self._inflight)
                waiting |= self._finished_during_poll
                self._ready.extend(item for item in polled if item.key not in waiting)
            while (
                self._ready
                and len(self._inflight) < self.settings.concurrency
                and not self._stopping
            ):
                item = self._ready.popleft()
                if item.key in self._inflight:
                    continue
                task = asyncio.create_task(self._deliver(item))
                self._inflight[item.key] = task
                task.add_done_callback(partial(self._finished, item.key))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=POLL_SECONDS)

    def _finished(self, key: tuple[str, str], _task: asyncio.Task[None]) -> None:
        self._inflight.pop(key, None)
        self._finished_during_poll.add(key)
        self._wake.set()

    def _due(self, limit: int) -> list[Due]:
        now = datetime.now(UTC)
        query = (
            select(
                DeliveryRecord.recipient,
                DeliveryRecord.attempts,
                MessageRecord.message_id,
                MessageRecord.family,
                MessageRecord.envelope,
                MessageRecord.envelope_sha256,
            )
            .join(
                MessageRecord,
                (DeliveryRecord.message_id == MessageRecord.message_id)
                & (MessageRecord.direction == "out"),
            )
            .where(DeliveryRecord.state == "pending", DeliveryRecord.next_attempt_at <= now)
            .order_by(DeliveryRecord.next_attempt_at)
            .limit(limit)
        )
        with self.sessions() as session:
            rows = session.execute(query).all()
        return [
            Due(
                row.recipient,
                row.message_id,
                row.family,
                row.envelope,
                row.envelope_sha256,
                row.attempts,
            )
            for row in rows
        ]

    async def _deliver(self, item: Due) -> None:
        envelope = envelope_pb2.Envelope.FromString(item.envelope)
        try:
            registry = self.context.usable_registry(datetime.now(UTC))
            member = registry.member(item.recipient)
            if member is None:
                raise ExchangeError(
                    Reason.PRECONDITION,
                    f"'{item.recipient}' is not in registry serial {registry.serial}",
                )
            await self._upload_attachments(member, envelope)
            receipt = await self.transport.deliver(member, item.family, envelope)
            body = verify_receipt(
                registry, item.recipient, receipt, item.message_id, envelope_digest(envelope)
            )
        except (TransportError, ExchangeError) as error:
            await self._failed(item, str(error))
            return
        except Exception as error:  # a bug or a storage fault: log it, back off, go on
            log.exception("delivery attempt failed unexpectedly", message_id=item.message_id)
            await self._failed(item, f"internal error: {error.__class__.__name__}: {error}")
            return
        confirmation = Confirmation(
            message_id=item.message_id,
            recipient=item.recipient,
            delivered_at=datetime.now(UTC),
            receipt_sha256=envelope_digest(receipt).hex(),
            receiver_log_index=body.log_index,
        )
        await self.writer.run(partial(self._mark_delivered, item, receipt, confirmation))
        self.delivered += 1
        if self.on_confirmed is not None:
            await self.on_confirmed(confirmation)

    async def _upload_attachments(self, member: Member, envelope: envelope_pb2.Envelope) -> None:
        message = envelope_pb2.Message.FromString(envelope.payload)
        for ref in message.attachments:
            held, complete = await self.transport.attachment_held(member, envelope, ref.sha256)
            if complete:
                continue
            with self.blobs.open(ref.sha256.hex()) as source:
                source.seek(held)
                if not await self.transport.upload(member, envelope, ref.sha256, held, source):
                    raise TransportError(
                        f"upload of '{ref.file_name}' to {member.agency_id} incomplete"
                    )

    def _mark_delivered(
        self,
        item: Due,
        receipt: envelope_pb2.Envelope,
        confirmation: Confirmation,
        batch: Batch,
    ) -> None:
        batch.update(
            DELIVERIES,
            {"message_id": item.message_id, "recipient": item.recipient, "state": "pending"},
            {
                "state": "delivered",
                "attempts": item.attempts + 1,
                "delivered_at": confirmation.delivered_at,
                "receipt": receipt.SerializeToString(deterministic=True),
                "receipt_sha256": confirmation.receipt_sha256,
                "receiver_log_index": confirmation.receiver_log_index,
                "last_error": "",
            },
        )
        audit.append(
            batch,
            AuditEvent.RECEIPT_RECEIVED,
            node=self.context.agency,
            at=confirmation.delivered_at,
            message_id=item.message_id,
            envelope_sha256=item.envelope_sha256,
            peer=item.recipient,
            detail=f"receipt_sha256={confirmation.receipt_sha256} "
            f"receiver_log_index={confirmation.receiver_log_index}",
        )

    async def _failed(self, item: Due, error: str) -> None:
        delay = min(
            self.settings.initial_backoff_seconds * (2 ** min(item.attempts, 30)),
            self.settings.max_backoff_seconds,
        ) * random.uniform(0.8, 1.2)  # noqa: S311 (jitter, not security)
        log.info(
            "delivery failed; will retry",
            message_id=item.message_id,
            recipient=item.recipient,
            attempt=item.attempts + 1,
            retry_in_seconds=round(delay, 2),
            error=error,
        )

        def write(batch: Batch) -> None:
            batch.update(
                DELIVERIES,
                {"message_id": item.message_id, "recipient": item.recipient},
                {
                    "attempts": item.attempts + 1,
                    "last_error": error[:2000],
                    "next_attempt_at": datetime.now(UTC) + timedelta(seconds=delay),
                },
            )

        await self.writer.run(write)
