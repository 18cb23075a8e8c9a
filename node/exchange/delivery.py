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
from collections.abc import Awaitable, Callable, Iterable, Sequence
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
from node.audit.note import NoteError
from node.audit.proof import OpenedCheckpoints, check_receipt_proof
from node.config import Delivery
from node.envelope import RECEIPT_PAYLOAD_TYPE, EnvelopeError, envelope_digest, verify_envelope
from node.exchange.attachments import BlobStore
from node.exchange.context import NodeContext
from node.exchange.errors import ExchangeError, Reason
from node.exchange.inbound import MAX_BATCH
from node.federation import Member, Registry
from node.store.models import DELIVERIES, DeliveryRecord, MessageRecord
from node.store.writer import Batch, BatchWriter

log = structlog.get_logger(__name__)
POLL_SECONDS = 0.5


class TransportError(Exception):
    """The peer could not be reached or refused the call; the message says why."""


@dataclass(frozen=True)
class Answer:
    """A peer's acceptance: its signed receipt, and its tlog-proof of the entry (or b"")."""

    receipt: envelope_pb2.Envelope
    proof: bytes = b""


class PeerTransport(Protocol):
    async def deliver_many(
        self, member: Member, items: Sequence[tuple[str, envelope_pb2.Envelope]]
    ) -> list[Answer | TransportError]:
        """Deliver (family, envelope) pairs to one peer: each one's receipt or why not."""
        ...

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
    receiver_proof: bytes = b""  # the receiver's tlog-proof of its entry, checked (or b"")


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


def check_receiver_proof(
    registry: Registry,
    recipient: str,
    proof_text: bytes,
    log_index: int,
    item: Due,
    checkpoints: OpenedCheckpoints,
) -> bytes:
    """The receiver's proof if it shows its log holds this message's "received" entry at the
    index the receipt names, under a checkpoint it signed; else b"" (logged: the receipt
    itself is valid and the proof can be fetched again from the Audit service)."""
    if not proof_text:
        return b""
    try:
        check_receipt_proof(
            proof_text,
            registry.log_verifiers(recipient),
            log_index=log_index,
            message_id=item.message_id,
            envelope_sha256=item.envelope_sha256,
            opened=checkpoints,
        )
    except NoteError as error:
        log.warning(
            "receiver's proof refused; the receipt is kept",
            recipient=recipient,
            message_id=item.message_id,
            error=str(error),
        )
        return b""
    return proof_text


class DeliveryWorker:
    """Sends the outbox, in batches per peer, several batches in flight at once.

    New messages are handed over in memory (``enqueue``) right after they commit; a poll of
    the outbox finds retries that have come due and, after a restart, whatever was pending.
    """

    def __init__(
        self,
        context: NodeContext,
        writer: BatchWriter,
        sessions: sessionmaker[Session],
        blobs: BlobStore,
        transport: PeerTransport,
        settings: Delivery,
        on_confirmed: Callable[[list[Confirmation]], Awaitable[None]] | None = None,
    ) -> None:
        self.context = context
        self.writer = writer
        self.sessions = sessions
        self.blobs = blobs
        self.transport = transport
        self.settings = settings
        self.on_confirmed = on_confirmed
        self.batch_size = max(1, min(settings.batch_size, MAX_BATCH))
        self._wake = asyncio.Event()
        self._stopping = False
        self._ready: dict[str, deque[Due]] = {}  # by recipient
        self._waiting: set[tuple[str, str]] = set()  # keys in _ready
        self._inflight: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Deliveries finished while a database poll was running: its snapshot may predate them.
        self._finished_during_poll: set[tuple[str, str]] = set()
        self.delivered = 0

    def enqueue(self, items: Iterable[Due]) -> None:
        """Hand over deliveries that were just committed (no database poll needed)."""
        for item in items:
            key = item.key
            if key not in self._inflight and key not in self._waiting:
                self._waiting.add(key)
                self._ready.setdefault(item.recipient, deque()).append(item)
        self._wake.set()

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        for task in self._tasks:
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
                self.enqueue(item for item in polled if item.key not in self._finished_during_poll)
            self._dispatch()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=POLL_SECONDS)

    def _dispatch(self) -> None:
        """Start batches, one peer after another, while fewer than `concurrency` are in flight."""
        budget = self.context.limits.max_envelope_bytes
        while self._ready and len(self._inflight) < self.settings.concurrency:
            for recipient in list(self._ready):
                if self._stopping or len(self._inflight) >= self.settings.concurrency:
                    return
                queue = self._ready[recipient]
                batch: list[Due] = []
                size = 0
                while queue and len(batch) < self.batch_size:
                    if batch and size + len(queue[0].envelope) > budget:
                        break  # the receiver's gRPC message limit is twice the envelope limit
                    item = queue.popleft()
                    self._waiting.discard(item.key)
                    if item.key in self._inflight:
                        continue
                    batch.append(item)
                    size += len(item.envelope)
                if not queue:
                    del self._ready[recipient]
                if not batch:
                    continue
                self._inflight.update(item.key for item in batch)
                task = asyncio.create_task(self._deliver_batch(recipient, batch))
                self._tasks.add(task)
                task.add_done_callback(partial(self._finished, batch))

    def _finished(self, batch: list[Due], task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        for item in batch:
            self._inflight.discard(item.key)
            self._finished_during_poll.add(item.key)
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

    async def _deliver_batch(self, recipient: str, batch: list[Due]) -> None:
        """One attempt at each item of `batch` (all to `recipient`); record every outcome."""
        outcomes: list[Confirmation | str] = []
        receipts: list[envelope_pb2.Envelope | None] = []
        try:
            outcomes, receipts = await self._attempt(recipient, batch)
        except Exception as error:  # a bug or a storage fault: log it, back off, go on
            log.exception("delivery attempt failed unexpectedly", recipient=recipient)
            outcomes = [f"internal error: {error.__class__.__name__}: {error}"] * len(batch)
            receipts = [None] * len(batch)
        units: list[Callable[[Batch], None]] = []
        confirmed: list[Confirmation] = []
        failures: dict[str, list[Due]] = {}
        cases = tuple(
            (item.message_id, recipient)
            for item, outcome in zip(batch, outcomes, strict=True)
            if isinstance(outcome, Confirmation)
        )
        for item, outcome, receipt in zip(batch, outcomes, receipts, strict=True):
            if isinstance(outcome, Confirmation) and receipt is not None:
                units.append(partial(self._mark_delivered, item, receipt, outcome, cases))
                confirmed.append(outcome)
            else:
                failures.setdefault(str(outcome), []).append(item)
        for problem, items in failures.items():
            delays = [self._backoff(item) for item in items]
            log.info(
                "delivery failed; will retry",
                recipient=recipient,
                messages=len(items),
                message_ids=[item.message_id for item in items[:5]],
                attempt=min(item.attempts for item in items) + 1,
                retry_in_seconds=round(min(delays), 2),
                error=problem,
            )
            units.extend(
                partial(self._mark_failed, item, problem, delay)
                for item, delay in zip(items, delays, strict=True)
            )
        for result in await self.writer.run_many(units):
            if isinstance(result, Exception):
                log.error("recording a delivery outcome failed", error=str(result))
        self.delivered += len(confirmed)
        if confirmed and self.on_confirmed is not None:
            await self.on_confirmed(confirmed)

    async def _attempt(
        self, recipient: str, batch: list[Due]
    ) -> tuple[list[Confirmation | str], list[envelope_pb2.Envelope | None]]:
        """Send `batch`; per item, a verified confirmation and its receipt, or why not."""
        outcomes: list[Confirmation | str] = [""] * len(batch)
        receipts: list[envelope_pb2.Envelope | None] = [None] * len(batch)
        try:
            registry = self.context.usable_registry(datetime.now(UTC))
            member = registry.member(recipient)
            if member is None:
                raise ExchangeError(
                    Reason.PRECONDITION,
                    f"'{recipient}' is not in registry serial {registry.serial}",
                )
        except ExchangeError as error:
            return [str(error)] * len(batch), receipts
        envelopes = [envelope_pb2.Envelope.FromString(item.envelope) for item in batch]
        sending: list[int] = []
        for position, envelope in enumerate(envelopes):
            try:
                await self._upload_attachments(member, envelope)
                sending.append(position)
            except (TransportError, ExchangeError) as error:
                outcomes[position] = str(error)
        answers = await self.transport.deliver_many(
            member, [(batch[n].family, envelopes[n]) for n in sending]
        )
        # Off the event loop: Ed25519 releases the GIL.
        await asyncio.to_thread(
            self._check_receipts, registry, recipient, batch, sending, answers, outcomes, receipts
        )
        return outcomes, receipts

    def _check_receipts(
        self,
        registry: Registry,
        recipient: str,
        batch: list[Due],
        sending: list[int],
        answers: list[Answer | TransportError],
        outcomes: list[Confirmation | str],
        receipts: list[envelope_pb2.Envelope | None],
    ) -> None:
        """Fill in `outcomes` and `receipts` for the items sent: verified or why not."""
        delivered_at = datetime.now(UTC)
        checkpoints = OpenedCheckpoints()  # this recipient's: one signature check each
        for position, answer in zip(sending, answers, strict=True):
            item = batch[position]
            if isinstance(answer, TransportError):
                outcomes[position] = str(answer)
                continue
            try:
                body = verify_receipt(
                    registry,
                    recipient,
                    answer.receipt,
                    item.message_id,
                    bytes.fromhex(item.envelope_sha256),
                )
            except ExchangeError as error:
                outcomes[position] = str(error)
                continue
            proof = check_receiver_proof(
                registry, recipient, answer.proof, body.log_index, item, checkpoints
            )
            outcomes[position] = Confirmation(
                message_id=item.message_id,
                recipient=recipient,
                delivered_at=delivered_at,
                receipt_sha256=envelope_digest(answer.receipt).hex(),
                receiver_log_index=body.log_index,
                receiver_proof=proof,
            )
            receipts[position] = answer.receipt

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
        cases: tuple[tuple[str, str], ...],
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
                "receiver_proof": confirmation.receiver_proof or None,
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
        self.context.cases.preload(batch, cases)
        self.context.cases.receipt_stored(
            batch, item.message_id, item.recipient, confirmation.delivered_at
        )

    def _backoff(self, item: Due) -> float:
        ceiling: float = self.settings.max_backoff_seconds
        delay = min(self.settings.initial_backoff_seconds * 2.0 ** min(item.attempts, 30), ceiling)
        return delay * random.uniform(0.8, 1.2)  # noqa: S311 (jitter, not security)

    def _mark_failed(self, item: Due, error: str, delay: float, batch: Batch) -> None:
        batch.update(
            DELIVERIES,
            {"message_id": item.message_id, "recipient": item.recipient},
            {
                "attempts": item.attempts + 1,
                "last_error": error[:2000],
                "next_attempt_at": datetime.now(UTC) + timedelta(seconds=delay),
            },
        )
