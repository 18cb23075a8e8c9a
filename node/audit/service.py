"""What the node answers about its own audit log: checkpoints, proofs, entries.

Served to federation members over mutual TLS (node.services.audit) and to the node's own
operators over the local admin API. Every answer is derived from the stored tree
(node.audit.tree) and the checkpoints the sequencer signed; nothing is recomputed from
scratch. Members' queries are themselves written to the log.

Least exposure (docs/protocol.md section 12.2): checkpoints, consistency and inclusion
proofs are open to every member; an entry's bytes go to the node's own operator, to the
members the registry names auditors, and to a member that is a party to the entry, which
no other member is.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.audit import log as audit
from node.audit.checkpoint import MAX_SIZE
from node.audit.log import AuditEvent
from node.audit.merkle import ProofError, consistency_proof, inclusion_proof, root_at
from node.audit.note import (
    NoteError,
    parse_signature_line,
    split_note,
    verify_cosignature_by_any,
)
from node.audit.proof import LogProof
from node.audit.tree import NodeCache, StoredTree
from node.exchange.context import NodeContext
from node.exchange.errors import ExchangeError, Reason, shown
from node.exchange.messages import UUID_RE
from node.store.models import AUDIT_ENTRIES, CHECKPOINTS, COSIGNATURES
from node.store.writer import Batch, BatchWriter

MAX_ENTRIES = 1000  # entries per GetEntries answer
FIRST_EVENT_OF_A_MESSAGE = (AuditEvent.RECEIVED, AuditEvent.SENT)
# What the node did with a message in its own agency's system (the drop folder's file path,
# a plugin's reason for withholding or declining it, why the hand-off failed): not part of
# the exchange, so served to auditors only, not to the message's sender. (They name no peer
# either; this holds should one ever be added.)
LOCAL_EVENTS = frozenset(
    str(e)
    for e in (
        AuditEvent.HANDED_OFF,
        AuditEvent.HAND_OFF_WITHHELD,
        AuditEvent.HAND_OFF_FAILED,
        AuditEvent.INBOUND_DECLINED,
    )
)


def is_party(reader: str, entry: bytes) -> bool:
    """Whether the member `reader` is a party to an entry: the entry names it as its `peer`
    (a `sent` entry names every recipient there, comma-separated; agency ids hold no comma).

    Every entry about another agency names it so: the sender of what was received, refused or
    stored, the recipients of what was sent, the peer of a receipt, a case, a deadline, an
    audit query or a split view. An entry naming a message does not make each of the
    message's recipients a party: a co-recipient is no party to another recipient's receipt,
    case or deadline. Entries of the agency's own system (LOCAL_EVENTS) have no party.
    """
    try:
        fields = orjson.loads(entry)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(fields, dict) or fields.get("event") in LOCAL_EVENTS:
        return False
    peer = fields.get("peer")
    return isinstance(peer, str) and reader in peer.split(",")


def _in_range(value: int, field: str) -> None:
    """Sizes and indices come as uint64 from the wire; the log's fit in 63 bits."""
    if not 0 <= value <= MAX_SIZE:
        raise ExchangeError(Reason.INVALID, f"{field} {value} is beyond any log (at most 2^63-1)")


@dataclass(frozen=True)
class SignedCheckpoint:
    size: int
    root: bytes
    note: bytes


class AuditLog:
    def __init__(
        self, context: NodeContext, sessions: sessionmaker[Session], writer: BatchWriter
    ) -> None:
        self.context = context
        self.sessions = sessions
        self.writer = writer
        self.nodes = NodeCache()

    # -- reading (run these off the event loop) ----------------------------------------------

    def checkpoint(self, size: int = 0) -> SignedCheckpoint:
        """The latest signed checkpoint, or the one of exactly `size` entries."""
        _in_range(size, "size")
        with self.sessions() as session:
            return self._checkpoint(session, size)

    def prove_inclusion(
        self,
        *,
        reader: str | None,
        index: int | None = None,
        message_id: str = "",
        size: int = 0,
    ) -> LogProof:
        """A tlog-proof of one entry against a signed checkpoint: the one of `size`, or by
        default the latest that witnesses cosigned and covers the entry, else the latest.

        By message id, the entry is the first the node wrote about it: "received" on the
        receiving node, "sent" on the sender.

        `reader` is the member asking (None: the node's own operator). The proof is open to
        every member; the entry itself only to a reader that may see it (_sees_all,
        is_party), else the proof comes without it. A member that is not a party asking by
        message id is told there is no such message of its, exactly as for an unknown one:
        whether this node exchanged a message is itself not its business.
        """
        _in_range(size, "size")
        _in_range(index or 0, "index")
        sees_all = self._sees_all(reader)
        if message_id and not UUID_RE.match(message_id):
            raise ExchangeError(
                Reason.INVALID,
                f"message_id {shown(message_id, 64)} is not a message id (a lower-case UUID)",
            )
        with self.sessions() as session:
            if message_id:
                index = self._index_of(session, message_id, None if sees_all else reader)
            if index is None:
                raise ExchangeError(Reason.INVALID, "give an entry index or a message id")
            checkpoint = self._checkpoint(session, size or self._cosigned_size(session, index))
            if not 0 <= index < checkpoint.size:
                raise ExchangeError(
                    Reason.NOT_FOUND,
                    f"entry {index} is not in the checkpoint of size {checkpoint.size}; "
                    "ask again once a later checkpoint covers it",
                )
            tree = StoredTree(session, self.nodes)
            hashes = inclusion_proof(index, checkpoint.size, tree)
            entry = session.scalar(
                select(AUDIT_ENTRIES.c.entry).where(AUDIT_ENTRIES.c.idx == index)
            )
            self._check_root(checkpoint, tree)
            revealed = bytes(entry or b"")
            if not sees_all and not is_party(str(reader), revealed):
                return LogProof(index, tuple(hashes), checkpoint.note, None)
            return LogProof(index, tuple(hashes), checkpoint.note, revealed)

    def prove_consistency(self, old_size: int, new_size: int) -> list[bytes]:
        _in_range(old_size, "old_size")
        _in_range(new_size, "new_size")
        with self.sessions() as session:
            latest = self._checkpoint(session, 0)
            if new_size > latest.size:
                raise ExchangeError(
                    Reason.INVALID,
                    f"size {new_size} is beyond the latest checkpoint ({latest.size} entries)",
                )
            try:
                return consistency_proof(old_size, new_size, StoredTree(session, self.nodes))
            except ProofError as error:
                raise ExchangeError(Reason.INVALID, str(error)) from None

    def entries(self, start: int, limit: int, *, reader: str | None) -> list[bytes]:
        """The entries from `start` in index order, at most `limit` (at most MAX_ENTRIES).

        `reader` is the member asking (None: the node's own operator). At each position where
        it may not see the entry (_sees_all, is_party) it gets empty bytes, which no entry is: the
        answer's positions stay the log's indices.
        """
        _in_range(start, "start")
        limit = min(max(limit, 1), MAX_ENTRIES)
        sees_all = self._sees_all(reader)
        with self.sessions() as session:
            rows = session.scalars(
                select(AUDIT_ENTRIES.c.entry)
                .where(AUDIT_ENTRIES.c.idx >= start)
                .order_by(AUDIT_ENTRIES.c.idx)
                .limit(limit)
            )
            entries = [bytes(row) for row in rows]
        if sees_all:
            return entries
        return [entry if is_party(str(reader), entry) else b"" for entry in entries]

    def _sees_all(self, reader: str | None) -> bool:
        """The node's own operator (None) and the registry's auditors see every entry; any
        other member only those it is a party to (is_party)."""
        if reader is None:
            return True
        return self.context.usable_registry(datetime.now(UTC)).is_auditor(reader)

    def _cosigned_size(self, session: Session, index: int) -> int:
        """The latest cosigned checkpoint covering entry `index`, or 0 (then: the latest)."""
        size = session.scalar(
            select(func.max(COSIGNATURES.c.size)).where(COSIGNATURES.c.size > index)
        )
        return int(size or 0)

    def _checkpoint(self, session: Session, size: int) -> SignedCheckpoint:
        query = select(CHECKPOINTS.c.size, CHECKPOINTS.c.root, CHECKPOINTS.c.note)
        if size:
            query = query.where(CHECKPOINTS.c.size == size)
        else:
            query = query.order_by(CHECKPOINTS.c.size.desc()).limit(1)
        row = session.execute(query).first()
        if row is None:
            if size:
                raise ExchangeError(
                    Reason.NOT_FOUND, f"this node signed no checkpoint of size {size}"
                )
            raise ExchangeError(Reason.NOT_FOUND, "this node has not signed a checkpoint yet")
        lines = session.scalars(
            select(COSIGNATURES.c.line)
            .where(COSIGNATURES.c.size == row.size)
            .order_by(COSIGNATURES.c.witness)
        ).all()
        # A note's signature lines follow one another: the witnesses' after the log's own.
        note = bytes(row.note) + b"".join(bytes(line) for line in lines)
        return SignedCheckpoint(int(row.size), bytes(row.root), note)

    def _check_root(self, checkpoint: SignedCheckpoint, tree: StoredTree) -> None:
        # A proof from a tree that no longer matches what was signed would mislead the asker.
        if root_at(checkpoint.size, tree) != checkpoint.root:
            raise ExchangeError(
                Reason.UNAVAILABLE,
                f"the stored log does not match the checkpoint of size {checkpoint.size}; "
                "the node's operator must check its database",
            )

    def _index_of(self, session: Session, message_id: str, party: str | None) -> int:
        """The index of the first entry about a message; with `party`, only if that member
        is a party to it (else, as for an unknown message, NOT_FOUND)."""
        row = session.execute(
            select(AUDIT_ENTRIES.c.idx, AUDIT_ENTRIES.c.entry)
            .where(
                AUDIT_ENTRIES.c.message_id == message_id,
                AUDIT_ENTRIES.c.event.in_([str(e) for e in FIRST_EVENT_OF_A_MESSAGE]),
            )
            .order_by(AUDIT_ENTRIES.c.idx)
            .limit(1)
        ).first()
        if party is not None and (row is None or not is_party(party, bytes(row.entry))):
            raise ExchangeError(
                Reason.NOT_FOUND,
                f"no message {message_id} that {party} is a party to was sent or received by "
                "this node",
            )
        if row is None:
            raise ExchangeError(
                Reason.NOT_FOUND, f"no message {message_id} was sent or received by this node"
            )
        return int(row.idx)

    # -- members' calls ---------------------------------------------------------------------

    def authorize(self, agency: str, certificate_sha256: str) -> None:
        """Only federation members, with the certificate the registry lists, may ask."""
        registry = self.context.usable_registry(datetime.now(UTC))
        member = registry.member(agency)
        if member is None or certificate_sha256 not in member.tls_fingerprints:
            raise ExchangeError(
                Reason.PERMISSION_DENIED,
                f"'{agency}' with this TLS certificate is not a member of federation registry "
                f"serial {registry.serial}; only members may read this node's audit log",
            )

    def check_cosignature(self, witness: str, size: int, line: bytes) -> bytes:
        """A witness's tlog-cosignature/v1 line of this node's checkpoint of `size`, checked;
        the line to store. Run it off the event loop (it reads and verifies)."""
        _in_range(size, "size")
        now = datetime.now(UTC)
        registry = self.context.usable_registry(now)
        member = registry.member(witness)
        if member is None:
            raise ExchangeError(Reason.PERMISSION_DENIED, f"'{witness}' is not a member")
        try:
            signature = parse_signature_line(line)
        except NoteError as error:
            raise ExchangeError(Reason.INVALID, f"cosignature: {error}") from None
        with self.sessions() as session:
            checkpoint = self._checkpoint(session, size)
        body, _signatures = split_note(checkpoint.note)
        try:
            timestamp = verify_cosignature_by_any(
                body, signature, registry.cosigner_verifiers(witness)
            )
        except NoteError as error:
            raise ExchangeError(
                Reason.UNAUTHENTICATED, f"cosignature of size {size}: {error}"
            ) from None
        skew = self.context.limits.clock_skew_seconds
        if timestamp > now.timestamp() + skew:
            raise ExchangeError(
                Reason.INVALID,
                f"cosignature timestamp {timestamp} is more than {skew:g} s ahead of this "
                "node's clock; check the witness's clock (NTP)",
            )
        return line.rstrip(b"\n") + b"\n"

    async def store_cosignature(self, witness: str, size: int, line: bytes) -> None:
        """Keep a checked cosignature (the first one a witness gave for a size)."""
        now = datetime.now(UTC)

        def write(batch: Batch) -> None:
            held = batch.session.scalar(
                select(COSIGNATURES.c.size).where(
                    COSIGNATURES.c.size == size, COSIGNATURES.c.witness == witness
                )
            )
            if held is None:
                batch.insert(
                    COSIGNATURES,
                    {"size": size, "witness": witness, "line": line, "received_at": now},
                )

        await self.writer.run(write)

    async def record_refused_query(self, peer: str, what: str, error: ExchangeError) -> None:
        """Write a refused query, within the caller's budget (node.audit.refusals)."""
        detail = f"{what} refused: {error.message}"
        if self.context.refusals.spend(AuditEvent.AUDIT_QUERY, peer, error.reason.value, detail):
            await self.record_query(peer, detail)
        error.audited = True

    async def record_query(self, peer: str, what: str) -> None:
        """Write a member's query (or a refused one) to the log itself."""

        def write(batch: Batch) -> None:
            audit.append(
                batch, AuditEvent.AUDIT_QUERY, node=self.context.agency, peer=peer, detail=what
            )

        await self.writer.run(write)
