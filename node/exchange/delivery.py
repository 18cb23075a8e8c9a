"""Delivering the outbox: send each pending (message, recipient) until a valid receipt returns.

Retries back off exponentially (with jitter) up to a ceiling and go on for as
long as the peer is away; receivers are idempotent on the message id, so a
retry after a lost answer yields the original receipt, never a second copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import BinaryIO, Protocol

import structlog
from google.protobuf.message import DecodeError
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
from node.exchange.errors import MAX_SHOWN, ExchangeError, Reason, bounded, shown
from node.exchange.inbound import MAX_BATCH
from node.exchange.messages import time_of
from node.federation import Member, Registry
from node.store.models import DELIVERIES, DeliveryRecord, MessageRecord
from node.store.writer import Batch, BatchWriter

log = structlog.get_logger(__name__)
POLL_SECONDS = 0.5


class TransportError(Exception):
    """The peer could not be reached or refused the call; the message says why."""


class AnswerRefused(Exception):
    """The peer answered, and this node cannot accept the answer: a receipt or proof that
    does not hold, an upload offset beyond the file. Not a delivery: the attempt fails, is
    retried later, and the refusal is written to the audit log."""


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
    ) -> tuple[int, bool]:
        """The peer's answer to QueryAttachment: (bytes it says it holds, complete)."""
        ...

    async def upload(
        self,
        member: Member,
        envelope: envelope_pb2.Envelope,
        sha256: bytes,
        offset: int,
        source: BinaryIO,
    ) -> bool:
        """Send the bytes of `source` from `offset` to its end; True when the peer says the
        file is complete."""
        ...


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


# One attempt's result for one item: delivered, the peer's answer refused, or why it failed.
Outcome = Confirmation | AnswerRefused | str


def verify_receipt(
    registry: Registry,
    recipient: str,
    receipt: envelope_pb2.Envelope,
    message_id: str,
    digest: bytes,
    *,
    sender: str,
    now: datetime,
    clock_skew_seconds: float,
) -> envelope_pb2.Receipt:
    """Check a receipt as protocol.md section 6.1 says: signed by a key of the recipient that
    was valid at its `received_at` (which is set, and not ahead of `now` by more than the clock
    skew), naming exactly what was sent: this message, this envelope, `sender` (this node) and
    the recipient. ExchangeError saying every way it falls short; peer strings are bounded."""
    try:
        key_id = verify_envelope(receipt, RECEIPT_PAYLOAD_TYPE, registry.public_keys(recipient))
    except EnvelopeError as error:
        raise ExchangeError(
            Reason.UNAUTHENTICATED, f"receipt from {recipient}: {bounded(str(error), MAX_SHOWN)}"
        ) from None
    body = envelope_pb2.Receipt()
    try:
        body.ParseFromString(receipt.payload)
    except DecodeError:
        raise ExchangeError(
            Reason.INVALID,
            f"receipt from {recipient} for {message_id}: its payload is not a liandong.v1.Receipt",
        ) from None
    problems = []
    if body.message_id != message_id:
        problems.append(f"it names message {shown(body.message_id)}")
    if body.envelope_sha256 != digest:
        problems.append(
            f"its envelope digest {shown(body.envelope_sha256.hex())} differs from "
            f"{digest.hex()}, the digest of what was sent"
        )
    if body.sender != sender:
        problems.append(f"it names sender {shown(body.sender)}, not this node ({sender})")
    if body.receiver != recipient:
        problems.append(f"it is signed as receiver {shown(body.receiver)}")
    reason = Reason.INVALID
    stamp = body.received_at
    received = time_of(stamp)
    if not body.HasField("received_at"):
        problems.append("it has no received_at")
    elif received is None:
        problems.append(f"its received_at ({stamp.seconds} s, {stamp.nanos} ns) is no valid time")
    else:
        if received - now > timedelta(seconds=clock_skew_seconds):
            problems.append(
                f"its received_at {received.isoformat()} is more than {clock_skew_seconds:g} s "
                f"ahead of this node's clock ({now.isoformat()})"
            )
        elif not registry.key_valid_at(recipient, key_id, received):
            reason = Reason.UNAUTHENTICATED
            problems.append(
                f"the key '{key_id}' that signed it was not valid at its received_at "
                f"{received.isoformat()} (registry serial {registry.serial})"
            )
    if problems:
        raise ExchangeError(
            reason,
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
    """The receiver's proof (or b"" when it sent none: a repeat, or just after it restarted)
    once it shows its log holds this message's "received" entry at the index the receipt
    names, under a checkpoint it signed. A proof that does not hold is ExchangeError: the
    answer as a whole is refused (a receiver that sends one must send a true one)."""
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
        raise ExchangeError(
            Reason.INVALID,
            f"the proof {recipient} sent with its receipt for {item.message_id} does not "
            f"hold: {bounded(str(error), MAX_SHOWN)}",
        ) from None
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
        outcomes: list[Outcome] = []
        receipts: list[envelope_pb2.Envelope | None] = []
        try:
            outcomes, receipts = await self._attempt(recipient, batch)
        except Exception as error:  # a bug or a storage fault: log it, back off, go on
            log.exception("delivery attempt failed unexpectedly", recipient=recipient)
            outcomes = [f"internal error: {error.__class__.__name__}: {error}"] * len(batch)
            receipts = [None] * len(batch)
        units: list[Callable[[Batch], None]] = []
        confirmed: list[Confirmation] = []
        # By what went wrong, and whether it was the peer's answer this node refused.
        failures: dict[tuple[str, bool], list[Due]] = {}
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
                # Transport errors carry the peer's own texts too: bounded, as refusals are.
                problem = bounded(str(outcome))
                refused = isinstance(outcome, AnswerRefused)
                failures.setdefault((problem, refused), []).append(item)
        for (problem, refused), items in failures.items():
            delays = [self._backoff(item) for item in items]
            # A refused answer is a broken or dishonest peer, not a network fault: a warning.
            (log.warning if refused else log.info)(
                "answer refused; will retry" if refused else "delivery failed; will retry",
                recipient=recipient,
                messages=len(items),
                message_ids=[item.message_id for item in items[:5]],
                attempt=min(item.attempts for item in items) + 1,
                retry_in_seconds=round(min(delays), 2),
                error=problem,
            )
            units.extend(
                partial(self._mark_failed, item, problem, delay, refused)
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
    ) -> tuple[list[Outcome], list[envelope_pb2.Envelope | None]]:
        """Send `batch`; per item, a verified confirmation and its receipt, or why not."""
        outcomes: list[Outcome] = [""] * len(batch)
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
            except AnswerRefused as refused:
                outcomes[position] = refused
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
        outcomes: list[Outcome],
        receipts: list[envelope_pb2.Envelope | None],
    ) -> None:
        """Fill in `outcomes` and `receipts` for the items sent: verified, or why not. An
        answer whose receipt or proof does not hold is refused whole (AnswerRefused)."""
        delivered_at = datetime.now(UTC)
        skew = self.context.limits.clock_skew_seconds
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
                    sender=self.context.agency,
                    now=delivered_at,
                    clock_skew_seconds=skew,
                )
                proof = check_receiver_proof(
                    registry, recipient, answer.proof, body.log_index, item, checkpoints
                )
            except ExchangeError as error:
                outcomes[position] = AnswerRefused(str(error))
                continue
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
        """Upload each attachment the peer does not hold yet, from the byte it says it holds
        up to (protocol.md section 7). A peer that claims more bytes than the file has is
        refused (AnswerRefused): nothing is sent, and the next attempt asks again."""
        message = envelope_pb2.Message.FromString(envelope.payload)
        for ref in message.attachments:
            held, complete = await self.transport.attachment_held(member, envelope, ref.sha256)
            if complete:
                continue  # the peer's word; its check 11 holds it to it
            with self.blobs.open(ref.sha256.hex()) as source:
                size = min(ref.size, os.fstat(source.fileno()).st_size)
                if held > size:
                    raise AnswerRefused(
                        f"{member.agency_id} answered that it holds {held} bytes of attachment "
                        f"'{ref.file_name}' ({ref.sha256.hex()[:16]}…), which has {size}: an "
                        "upload cannot resume beyond the end; the peer must discard its partial "
                        "copy or answer how many bytes it truly holds"
                    )
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

    def _mark_failed(
        self, item: Due, error: str, delay: float, refused: bool, batch: Batch
    ) -> None:
        """One failed attempt; an answer this node refused is also written to the audit log."""
        now = datetime.now(UTC)
        batch.update(
            DELIVERIES,
            {"message_id": item.message_id, "recipient": item.recipient},
            {
                "attempts": item.attempts + 1,
                "last_error": error[:2000],
                "next_attempt_at": now + timedelta(seconds=delay),
            },
        )
        if refused:
            audit.append(
                batch,
                AuditEvent.ANSWER_REFUSED,
                node=self.context.agency,
                at=now,
                message_id=item.message_id,
                envelope_sha256=item.envelope_sha256,
                peer=item.recipient,
                detail=error,
            )
