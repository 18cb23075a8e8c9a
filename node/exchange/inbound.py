"""Receiving: verify every inbound envelope before anything else, store it, sign a receipt.

The order of checks is part of the protocol (docs/protocol.md): nothing of an
envelope is parsed before its signature has been verified with the keys of the
agency that the TLS peer certificate names. A refusal is written to the audit
log and leaves nothing else behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node._pb.liandong.v1 import envelope_pb2
from node.audit import log as audit
from node.audit.log import AuditEvent
from node.envelope import (
    MESSAGE_PAYLOAD_TYPE,
    RECEIPT_PAYLOAD_TYPE,
    EnvelopeError,
    TooManySignatures,
    check_signature_count,
    envelope_digest,
    serialize_envelope,
    sign_envelope,
    verify_envelope,
)
from node.exchange.attachments import CHUNK_SIZE, BlobStore
from node.exchange.context import NodeContext
from node.exchange.errors import ExchangeError, Reason, shown, shown_list
from node.exchange.handoff import item_for
from node.exchange.messages import (
    body_type_of,
    confidentiality_label,
    effective_marking,
    family_of,
    parse_message,
    set_timestamp,
)
from node.federation import Registry
from node.plugin_api import InboundItem
from node.store.models import ATTACHMENT_UPLOADS, ATTACHMENTS, MESSAGES, message_row
from node.store.writer import Batch, BatchWriter

# Messages one delivery batch may carry (DeliveryBatch in docs/protocol.md).
MAX_BATCH = 256
QUERY_SLICE = 1000  # values in one SQL IN (...) list
CHUNKS_PER_WRITE = 4  # upload chunks written (and hashed) in one worker-thread hop


def batch_too_large(count: int) -> ExchangeError:
    return ExchangeError(
        Reason.TOO_LARGE,
        f"a batch of {count} messages is over the limit of {MAX_BATCH}; "
        "send the rest in another batch",
    )


@dataclass(frozen=True)
class PeerIdentity:
    """Who the TLS layer says is calling: the agency in its certificate, and the cert digest."""

    agency_id: str
    certificate_sha256: str


@dataclass(frozen=True)
class Receipted:
    """A message accepted: the signed receipt, and this node's tlog-proof of its entry
    (empty when none could be made, e.g. for a repeat answered with its original receipt)."""

    receipt: envelope_pb2.Envelope
    proof: bytes = b""


@dataclass(frozen=True)
class _Stored:
    receipt: envelope_pb2.Envelope
    log_index: int
    stored_at: datetime | None  # None: a repeat, answered with the original receipt


@dataclass(frozen=True)
class VerifiedMessage:
    envelope: envelope_pb2.Envelope
    serialized: bytes  # the envelope's deterministic serialization: what is stored
    created_at: datetime
    message: envelope_pb2.Message
    digest: bytes
    family: str


class Receiver:
    def __init__(
        self,
        context: NodeContext,
        writer: BatchWriter,
        sessions: sessionmaker[Session],
        blobs: BlobStore,
        on_stored: Callable[[list[InboundItem]], None] = lambda _items: None,
        proof_for: Callable[[int], bytes] = lambda _index: b"",
    ) -> None:
        self.context = context
        self.writer = writer
        self.sessions = sessions
        self.blobs = blobs
        self.on_stored = on_stored
        self.proof_for = proof_for

    # -- verification -----------------------------------------------------------------

    def admit(self, peer: PeerIdentity) -> None:
        """Checks 2a and 2b, made when a call arrives, before its request is read."""
        self.authenticate_peer(peer, datetime.now(UTC))

    def is_member(self, peer: PeerIdentity) -> bool:
        member = self.context.registry.member(peer.agency_id)
        return member is not None and peer.certificate_sha256 in member.tls_fingerprints

    def authenticate_peer(self, peer: PeerIdentity, now: datetime) -> Registry:
        registry = self.context.usable_registry(now)
        member = registry.member(peer.agency_id)
        if member is None:
            raise ExchangeError(
                Reason.UNAUTHENTICATED,
                f"TLS peer '{peer.agency_id}' is not a member of federation registry "
                f"serial {registry.serial}",
            )
        if peer.certificate_sha256 not in member.tls_fingerprints:
            raise ExchangeError(
                Reason.UNAUTHENTICATED,
                f"TLS certificate {peer.certificate_sha256[:16]}… is not registered for "
                f"'{peer.agency_id}' in registry serial {registry.serial}",
            )
        return registry

    def verify(
        self,
        envelope: envelope_pb2.Envelope,
        peer: PeerIdentity,
        expected_family: str | None,
        now: datetime,
    ) -> VerifiedMessage:
        limits = self.context.limits
        serialized, digest = serialize_envelope(envelope)
        size = len(serialized)
        if size > limits.max_envelope_bytes:
            raise ExchangeError(
                Reason.TOO_LARGE,
                f"envelope of {size} bytes exceeds this node's limit of "
                f"{limits.max_envelope_bytes}; send large content as attachments",
            )
        try:
            check_signature_count(envelope)
        except TooManySignatures as error:
            raise ExchangeError(Reason.TOO_LARGE, str(error)) from None
        registry = self.authenticate_peer(peer, now)
        key_id = _verified_by(envelope, registry.public_keys(peer.agency_id))
        message = parse_message(envelope.payload)
        if message.sender != peer.agency_id:
            raise ExchangeError(
                Reason.UNAUTHENTICATED,
                f"message sender {shown(message.sender, 64)} is not the TLS peer "
                f"'{peer.agency_id}'",
            )
        created = datetime.fromtimestamp(message.created_at.seconds, UTC).replace(
            microsecond=message.created_at.nanos // 1000
        )
        if not registry.key_valid_at(peer.agency_id, key_id, created):
            raise ExchangeError(
                Reason.UNAUTHENTICATED,
                f"signing key '{key_id}' of '{peer.agency_id}' was not valid at "
                f"{created.isoformat()}",
            )
        if self.context.agency not in message.recipients:
            raise ExchangeError(
                Reason.PRECONDITION,
                f"this node is '{self.context.agency}', not a recipient of message "
                f"{message.message_id} (recipients: {shown_list(list(message.recipients))})",
            )
        if len(message.recipients) > limits.max_recipients:
            raise ExchangeError(Reason.TOO_LARGE, f"more than {limits.max_recipients} recipients")
        family = family_of(message)
        if not registry.is_permitted(family, peer.agency_id, self.context.agency):
            raise ExchangeError(
                Reason.PERMISSION_DENIED,
                f"registry serial {registry.serial} does not permit '{peer.agency_id}' to send "
                f"{family} to '{self.context.agency}'",
            )
        if created - now > timedelta(seconds=limits.clock_skew_seconds):
            raise ExchangeError(
                Reason.INVALID,
                f"created_at {created.isoformat()} is more than {limits.clock_skew_seconds:g} s "
                f"ahead of this node's clock ({now.isoformat()}); check the sender's clock (NTP)",
            )
        if now - created > timedelta(seconds=limits.max_message_age_seconds):
            raise ExchangeError(
                Reason.INVALID,
                f"created_at {created.isoformat()} is older than the "
                f"{limits.max_message_age_seconds:g} s this node accepts",
            )
        if expected_family is not None and family != expected_family:
            raise ExchangeError(
                Reason.INVALID,
                f"a {body_type_of(message)} body belongs on the {family} RPC, "
                f"not on the {expected_family} RPC",
            )
        for ref in message.attachments:
            if ref.size > limits.max_attachment_bytes:
                raise ExchangeError(
                    Reason.TOO_LARGE,
                    f"attachment {shown(ref.file_name, 64)} of {ref.size} bytes exceeds the "
                    f"limit of {limits.max_attachment_bytes}",
                )
        return VerifiedMessage(envelope, serialized, created, message, digest, family)

    def _verify_audited(
        self,
        envelope: envelope_pb2.Envelope,
        peer: PeerIdentity,
        expected_family: str | None,
        now: datetime,
    ) -> VerifiedMessage:
        """verify(), with any other failure on peer input turned into an (audited) refusal."""
        try:
            return self.verify(envelope, peer, expected_family, now)
        except ExchangeError:
            raise
        except Exception as error:
            raise ExchangeError(
                Reason.INVALID,
                f"malformed message ({error.__class__.__name__}: {shown(str(error))})",
            ) from None

    # -- receiving --------------------------------------------------------------------

    async def receive(
        self, envelope: envelope_pb2.Envelope, peer: PeerIdentity, expected_family: str | None
    ) -> Receipted:
        """Verify, store, audit and answer with a signed receipt (or raise ExchangeError)."""
        [outcome] = await self.receive_many([envelope], peer, expected_family)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def receive_many(
        self,
        envelopes: Sequence[envelope_pb2.Envelope],
        peer: PeerIdentity,
        expected_family: str | None = None,
    ) -> list[Receipted | Exception]:
        """receive() for each envelope, sharing one commit: a receipt or the error, in order.

        Each envelope is checked, stored or refused on its own; refusals are audited.
        """
        if len(envelopes) > MAX_BATCH:
            error = batch_too_large(len(envelopes))
            await self.record_rejections([(None, error)], peer)
            return [error] * len(envelopes)
        # Off the event loop: Ed25519 releases the GIL, so checking signatures overlaps
        # with the loop's own work instead of stalling every stream on this node.
        checked = await asyncio.to_thread(self._verify_all, envelopes, peer, expected_family)
        to_store = [(n, c) for n, c in enumerate(checked) if isinstance(c, VerifiedMessage)]
        stored = await self.writer.run_many([partial(self._store, v, peer) for _, v in to_store])
        results: dict[int, Receipted | Exception] = {}
        new_items: list[InboundItem] = []
        for (position, verified), result in zip(to_store, stored, strict=True):
            if isinstance(result, Exception):
                results[position] = result
            elif result.stored_at is None:  # a repeat: the original receipt, no new entry
                results[position] = Receipted(result.receipt)
            else:
                results[position] = Receipted(result.receipt, self.proof_for(result.log_index))
                new_items.append(
                    item_for(verified.message, verified.digest.hex(), result.stored_at, self.blobs)
                )
        outcomes: list[Receipted | Exception] = [
            check if isinstance(check, ExchangeError) else results[n]
            for n, check in enumerate(checked)
        ]
        if new_items:
            self.on_stored(new_items)
        refused = [
            (envelopes[position], outcome)
            for position, outcome in enumerate(outcomes)
            if isinstance(outcome, ExchangeError)
        ]
        if refused:
            await self.record_rejections(refused, peer)
        return outcomes

    def _verify_all(
        self,
        envelopes: Sequence[envelope_pb2.Envelope],
        peer: PeerIdentity,
        expected_family: str | None,
    ) -> list[VerifiedMessage | ExchangeError]:
        now = datetime.now(UTC)
        results: list[VerifiedMessage | ExchangeError] = []
        for envelope in envelopes:
            try:
                results.append(self._verify_audited(envelope, peer, expected_family, now))
            except ExchangeError as error:
                results.append(error)
        verified = [r for r in results if isinstance(r, VerifiedMessage)]
        if verified:
            ours = self._sent_ids({v.message.message_id for v in verified})
            for position, result in enumerate(results):
                if isinstance(result, VerifiedMessage) and result.message.message_id in ours:
                    results[position] = ExchangeError(
                        Reason.INVALID,
                        f"message id {result.message.message_id} is the id of a message this "
                        "node sent; a new message needs a new id",
                    )
        cited = {
            ref.sha256.hex()
            for result in results
            if isinstance(result, VerifiedMessage)
            for ref in result.message.attachments
        }
        if cited:
            owned = self._uploaded(peer.agency_id, cited)
            for position, result in enumerate(results):
                if isinstance(result, VerifiedMessage):
                    try:
                        self._check_attachments_held(result.message, peer.agency_id, owned)
                    except ExchangeError as error:
                        results[position] = error
        return results

    def _sent_ids(self, message_ids: set[str]) -> set[str]:
        """Which of `message_ids` this node used for its own messages (section 6.2: an id is
        new only if no one, this node included, has used it)."""
        with self.sessions() as session:
            found = session.scalars(
                select(MESSAGES.c.message_id).where(
                    MESSAGES.c.direction == "out", MESSAGES.c.message_id.in_(sorted(message_ids))
                )
            ).all()
        return set(found)

    def uploaded_by(self, sender: str, digests: set[str]) -> set[str]:
        """Which of `digests` (hex) `sender` itself uploaded and this node holds verified."""
        return {d for d in self._uploaded(sender, digests) if self.blobs.held_for(sender, d)}

    def _uploaded(self, sender: str, digests: set[str]) -> set[str]:
        """Which of `digests` (hex) `sender` itself uploaded (verified) at some time."""
        wanted = sorted(digests)
        found: list[str] = []
        with self.sessions() as session:
            # In slices: a batch may cite 256 x 1000 files, and PostgreSQL takes at most
            # 65,535 parameters a statement.
            for start in range(0, len(wanted), QUERY_SLICE):
                found += session.scalars(
                    select(ATTACHMENT_UPLOADS.c.sha256).where(
                        ATTACHMENT_UPLOADS.c.sender == sender,
                        ATTACHMENT_UPLOADS.c.sha256.in_(wanted[start : start + QUERY_SLICE]),
                    )
                ).all()
        return set(found)

    def _check_attachments_held(
        self, message: envelope_pb2.Message, sender: str, uploaded: set[str]
    ) -> None:
        """Check 11: the sender uploaded every file it cites, itself (a file another agency
        uploaded is not the sender's to cite, and this node does not say that it holds it).
        Each verified copy it cites becomes the store's here (adopted), so what it uploaded
        counts against its bound only until a message cites it."""
        for ref in message.attachments:
            digest = ref.sha256.hex()
            if digest not in uploaded or not self.blobs.adopt(sender, digest):
                raise ExchangeError(
                    Reason.PRECONDITION,
                    f"attachment {shown(ref.file_name, 64)} ({ref.sha256.hex()[:16]}…) has not "
                    "been uploaded by the sender; upload it with UploadAttachment before "
                    "delivering the message",
                )

    async def record_rejection(
        self, envelope: envelope_pb2.Envelope, peer: PeerIdentity, error: ExchangeError
    ) -> None:
        await self.record_rejections([(envelope, error)], peer)

    async def record_rejections(
        self,
        refused: Sequence[tuple[envelope_pb2.Envelope | None, ExchangeError]],
        peer: PeerIdentity,
    ) -> None:
        """An audit entry per refusal, naming the envelope's digest when there is one; past
        the caller's budget for that kind of refusal, counted for a summary entry instead
        (node.audit.refusals)."""

        def write(
            envelope: envelope_pb2.Envelope | None, error: ExchangeError, batch: Batch
        ) -> None:
            audit.append(
                batch,
                AuditEvent.REJECTED,
                node=self.context.agency,
                envelope_sha256=None if envelope is None else envelope_digest(envelope).hex(),
                peer=peer.agency_id,
                detail=f"{error.reason.value}: {error.message}",
            )

        budget = self.context.refusals
        outcomes = await self.writer.run_many(
            [
                partial(write, envelope, error)
                for envelope, error in refused
                if budget.spend(
                    AuditEvent.REJECTED,
                    peer.agency_id,
                    error.reason.value,
                    f"{error.reason.value}: {error.message}",
                )
            ]
        )
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        for _envelope, error in refused:
            error.audited = True

    def _store(self, verified: VerifiedMessage, peer: PeerIdentity, batch: Batch) -> _Stored:
        message = verified.message
        digest_hex = verified.digest.hex()
        # Repeats are rare (a retry after a lost answer), so in a shared batch the unique
        # constraint finds them; the writer then re-runs each unit alone, and the read below
        # answers the repeat with its original receipt.
        existing = (
            None
            if not batch.isolated
            else batch.session.execute(
                select(MESSAGES.c.sender, MESSAGES.c.envelope_sha256, MESSAGES.c.receipt).where(
                    MESSAGES.c.message_id == message.message_id, MESSAGES.c.direction == "in"
                )
            ).first()
        )
        if existing is not None:
            if existing.sender == message.sender and existing.envelope_sha256 == digest_hex:
                return _Stored(_parse_envelope(existing.receipt), -1, None)
            raise ExchangeError(
                Reason.INVALID,
                f"message id {message.message_id} was already received with other content or "
                "from another sender; a new message needs a new id",
            )
        now = datetime.now(UTC)
        index = audit.append(
            batch,
            AuditEvent.RECEIVED,
            node=self.context.agency,
            at=now,
            message_id=message.message_id,
            envelope_sha256=digest_hex,
            peer=peer.agency_id,
            family=verified.family,
        )
        receipt_body = envelope_pb2.Receipt(
            message_id=message.message_id,
            envelope_sha256=verified.digest,
            sender=message.sender,
            receiver=self.context.agency,
            log_index=index,
        )
        set_timestamp(receipt_body.received_at, now)
        receipt = sign_envelope(
            receipt_body.SerializeToString(deterministic=True),
            RECEIPT_PAYLOAD_TYPE,
            self.context.signing_key,
        )
        batch.insert(
            MESSAGES,
            message_row(
                message_id=message.message_id,
                direction="in",
                sender=message.sender,
                recipients=json.dumps(list(message.recipients)),
                family=verified.family,
                body_type=body_type_of(message),
                case_ref=message.case_ref,
                in_reply_to=message.in_reply_to,
                confidentiality=confidentiality_label(message),
                created_at=verified.created_at,
                stored_at=now,
                envelope=verified.serialized,
                envelope_sha256=digest_hex,
                receipt=receipt.SerializeToString(deterministic=True),
                log_index=index,
                version_of=message.version_of or None,
            ),
        )
        if verified.family == "reply":
            self.context.cases.reply_received(batch, message, now)
        else:
            self.context.cases.open_received(
                batch, message, verified.family, effective_marking(message), now
            )
        batch.proof_requests.append(index)
        return _Stored(receipt, index, now)

    # -- attachments ------------------------------------------------------------------
    # Every check runs in a worker thread: a signature check, or a flood of them, must
    # never hold the event loop (health checks and every other caller wait on it).

    def authorize_attachment(
        self, envelope: envelope_pb2.Envelope, sha256: bytes, peer: PeerIdentity, now: datetime
    ) -> envelope_pb2.AttachmentRef:
        """An upload is accepted only for a digest named in a message signed to this node."""
        verified = self._verify_audited(envelope, peer, None, now)
        for ref in verified.message.attachments:
            if ref.sha256 == sha256:
                return ref
        raise ExchangeError(
            Reason.INVALID,
            f"SHA-256 {sha256.hex()[:16]}… is not among the attachments of message "
            f"{verified.message.message_id}",
        )

    def _upload_state(
        self, envelope: envelope_pb2.Envelope, sha256: bytes, peer: PeerIdentity
    ) -> tuple[envelope_pb2.AttachmentRef, bool]:
        """(the signed reference, whether the peer has uploaded this file itself)."""
        ref = self.authorize_attachment(envelope, sha256, peer, datetime.now(UTC))
        return ref, bool(self.uploaded_by(peer.agency_id, {sha256.hex()}))

    async def attachment_status(
        self, envelope: envelope_pb2.Envelope, sha256: bytes, peer: PeerIdentity
    ) -> tuple[int, bool]:
        """Bytes of this file the peer has uploaded, and whether its upload is complete;
        never what another agency uploaded."""
        try:
            ref, owned = await asyncio.to_thread(self._upload_state, envelope, sha256, peer)
        except ExchangeError as error:
            await self.record_rejection(envelope, peer, error)
            raise
        if owned:
            return ref.size, True
        return self.blobs.held_by(peer.agency_id, sha256.hex()), False

    async def accept_upload(
        self,
        envelope: envelope_pb2.Envelope,
        sha256: bytes,
        offset: int,
        chunks: AsyncIterator[bytes],
        peer: PeerIdentity,
    ) -> tuple[int, bool]:
        """Store a (possibly resumed) upload; return (bytes held, verified and complete).

        A refusal at any point (not authorised, offset beyond what is held, more bytes than
        signed, chunk too large, digest mismatch, too many unfinished uploads) is audited and
        discards nothing already held except a file that failed its digest. The stream's
        reservation is released on every path, a caller's cancellation included.
        """
        try:
            ref, owned = await asyncio.to_thread(self._upload_state, envelope, sha256, peer)
            self.blobs.reserve(peer.agency_id, sha256.hex(), ref.size)
            upload = await _to_thread_to_the_end(
                partial(
                    self.blobs.begin_upload,
                    peer.agency_id,
                    sha256.hex(),
                    offset,
                    ref.size,
                    owned=owned,
                    max_pending_bytes=self.context.limits.max_pending_upload_bytes,
                ),
                on_cancel=lambda opened: opened.abort(),
            )
            try:
                # Writing and hashing happen in a worker thread, a few chunks a hop: a disk
                # that throttles writes must not stall the event loop.
                pending: list[bytes] = []
                async for data in chunks:
                    if len(data) > CHUNK_SIZE:
                        raise ExchangeError(
                            Reason.TOO_LARGE, f"upload chunks are at most {CHUNK_SIZE} bytes"
                        )
                    pending.append(data)
                    if len(pending) >= CHUNKS_PER_WRITE:
                        await _to_thread_to_the_end(partial(upload.write, pending))
                        pending = []
                await _to_thread_to_the_end(partial(upload.write, pending))
                complete = await _to_thread_to_the_end(upload.finish)
            finally:
                upload.abort()
        except ExchangeError as error:
            await self.record_rejection(envelope, peer, error)
            raise
        if complete and not owned:
            await self._record_attachment(ref, envelope, peer)
        return upload.size, complete

    async def authorize_download(
        self, envelope: envelope_pb2.Envelope, sha256: bytes, peer: PeerIdentity
    ) -> None:
        """A recipient may fetch what this node sent it: the envelope must be ours, to them."""
        try:
            await asyncio.to_thread(self._check_download, envelope, sha256, peer)
        except ExchangeError as error:
            await self.record_rejection(envelope, peer, error)
            raise

    def _check_download(
        self, envelope: envelope_pb2.Envelope, sha256: bytes, peer: PeerIdentity
    ) -> None:
        registry = self.authenticate_peer(peer, datetime.now(UTC))
        _verified_by(envelope, registry.public_keys(self.context.agency))
        message = parse_message(envelope.payload)
        if peer.agency_id not in message.recipients:
            raise ExchangeError(
                Reason.PERMISSION_DENIED,
                f"'{peer.agency_id}' is not a recipient of message {message.message_id}",
            )
        if all(ref.sha256 != sha256 for ref in message.attachments):
            raise ExchangeError(Reason.NOT_FOUND, "that digest is not attached to this message")
        if not self.blobs.has(sha256.hex()):
            raise ExchangeError(Reason.NOT_FOUND, f"attachment {sha256.hex()[:16]}… is not held")

    async def _record_attachment(
        self, ref: envelope_pb2.AttachmentRef, envelope: envelope_pb2.Envelope, peer: PeerIdentity
    ) -> None:
        """Record that `peer` uploaded this file (what it may now cite), audited once."""
        message = envelope_pb2.Message.FromString(envelope.payload)

        def write(batch: Batch) -> None:
            sha_hex = ref.sha256.hex()
            owner = {"sender": peer.agency_id, "sha256": sha_hex}
            if (
                batch.session.scalar(select(ATTACHMENT_UPLOADS.c.sha256).filter_by(**owner))
                is not None
            ):
                return
            now = datetime.now(UTC)
            batch.insert(ATTACHMENT_UPLOADS, {**owner, "size": ref.size, "stored_at": now})
            if (
                batch.session.scalar(
                    select(ATTACHMENTS.c.sha256).where(ATTACHMENTS.c.sha256 == sha_hex)
                )
                is None
            ):
                batch.insert(ATTACHMENTS, {"sha256": sha_hex, "size": ref.size, "stored_at": now})
            audit.append(
                batch,
                AuditEvent.ATTACHMENT_STORED,
                node=self.context.agency,
                at=now,
                message_id=message.message_id,
                envelope_sha256=envelope_digest(envelope).hex(),
                peer=peer.agency_id,
                detail=f"sha256={sha_hex} size={ref.size} name={shown(ref.file_name, 200)}",
            )

        await self.writer.run(write)


def _verified_by(envelope: envelope_pb2.Envelope, keys: Mapping[str, Ed25519PublicKey]) -> str:
    """The key id of the signature that verifies (section 4.4), as a refusal when none does."""
    try:
        return verify_envelope(envelope, MESSAGE_PAYLOAD_TYPE, keys)
    except TooManySignatures as error:
        raise ExchangeError(Reason.TOO_LARGE, str(error)) from None
    except EnvelopeError as error:
        raise ExchangeError(Reason.UNAUTHENTICATED, str(error)) from None


Opened = TypeVar("Opened")


async def _to_thread_to_the_end(
    work: Callable[[], Opened], on_cancel: Callable[[Opened], None] | None = None
) -> Opened:
    """`work` in a worker thread, which a cancelled caller still waits out.

    A caller's cancellation (its deadline, a closed stream) must not leave file work running
    behind it: the thread finishes, `on_cancel` undoes what it opened (releasing the upload's
    reservation), and only then does the cancellation go on.
    """
    task = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # The task itself is never cancelled (only shielded awaits of it are), so however
        # often the caller is cancelled again, the thread's result is waited for and undone.
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(task)
        if on_cancel is not None and task.exception() is None:
            on_cancel(task.result())
        raise


def _parse_envelope(data: bytes) -> envelope_pb2.Envelope:
    envelope = envelope_pb2.Envelope()
    envelope.ParseFromString(data)
    return envelope
