"""What the node answers about its own audit log: checkpoints, proofs, entries.

Served to federation members over mutual TLS (node.services.audit) and to the node's own
operators over the local admin API. Every answer is derived from the stored tree
(node.audit.tree) and the checkpoints the sequencer signed; nothing is recomputed from
scratch. Members' queries are themselves written to the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.audit import log as audit
from node.audit.log import AuditEvent
from node.audit.merkle import ProofError, consistency_proof, inclusion_proof, root_at
from node.audit.proof import LogProof
from node.audit.tree import NodeCache, StoredTree
from node.exchange.context import NodeContext
from node.exchange.errors import ExchangeError, Reason
from node.store.models import AUDIT_ENTRIES, CHECKPOINTS
from node.store.writer import Batch, BatchWriter

MAX_ENTRIES = 1000  # entries per GetEntries answer
FIRST_EVENT_OF_A_MESSAGE = (AuditEvent.RECEIVED, AuditEvent.SENT)


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
        with self.sessions() as session:
            return self._checkpoint(session, size)

    def prove_inclusion(
        self, *, index: int | None = None, message_id: str = "", size: int = 0
    ) -> LogProof:
        """A tlog-proof of one entry against a signed checkpoint (the latest by default).

        By message id, the entry is the first the node wrote about it: "received" on the
        receiving node, "sent" on the sender.
        """
        with self.sessions() as session:
            checkpoint = self._checkpoint(session, size)
            if message_id:
                index = self._index_of(session, message_id)
            if index is None:
                raise ExchangeError(Reason.INVALID, "give an entry index or a message id")
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
            return LogProof(index, tuple(hashes), checkpoint.note, bytes(entry or b""))

    def prove_consistency(self, old_size: int, new_size: int) -> list[bytes]:
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

    def entries(self, start: int, limit: int) -> list[bytes]:
        if start < 0:
            raise ExchangeError(Reason.INVALID, "start must not be negative")
        limit = min(max(limit, 1), MAX_ENTRIES)
        with self.sessions() as session:
            rows = session.scalars(
                select(AUDIT_ENTRIES.c.entry)
                .where(AUDIT_ENTRIES.c.idx >= start)
                .order_by(AUDIT_ENTRIES.c.idx)
                .limit(limit)
            )
            return [bytes(row) for row in rows]

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
        return SignedCheckpoint(int(row.size), bytes(row.root), bytes(row.note))

    def _check_root(self, checkpoint: SignedCheckpoint, tree: StoredTree) -> None:
        # A proof from a tree that no longer matches what was signed would mislead the asker.
        if root_at(checkpoint.size, tree) != checkpoint.root:
            raise ExchangeError(
                Reason.UNAVAILABLE,
                f"the stored log does not match the checkpoint of size {checkpoint.size}; "
                "the node's operator must check its database",
            )

    def _index_of(self, session: Session, message_id: str) -> int:
        index = session.scalar(
            select(AUDIT_ENTRIES.c.idx)
            .where(
                AUDIT_ENTRIES.c.message_id == message_id,
                AUDIT_ENTRIES.c.event.in_([str(e) for e in FIRST_EVENT_OF_A_MESSAGE]),
            )
            .order_by(AUDIT_ENTRIES.c.idx)
            .limit(1)
        )
        if index is None:
            raise ExchangeError(
                Reason.NOT_FOUND, f"no message {message_id} was sent or received by this node"
            )
        return int(index)

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

    async def record_query(self, peer: str, what: str) -> None:
        """Write a member's query (or a refused one) to the log itself."""

        def write(batch: Batch) -> None:
            audit.append(
                batch, AuditEvent.AUDIT_QUERY, node=self.context.agency, peer=peer, detail=what
            )

        await self.writer.run(write)
