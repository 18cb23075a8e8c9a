"""Witnessing: every node checks that each peer shows it one consistent history, and cosigns.

Every `witness_interval_seconds` the node fetches each peer's latest checkpoint, checks the
peer's signature, and checks it is consistent with the last checkpoint it saw from that peer
(an RFC 9162 consistency proof the peer must supply). If so it remembers the new one and
returns a C2SP tlog-cosignature/v1 for it, which the peer stores and serves with its
checkpoint. A peer that shows two checkpoints that cannot both be true — two roots for one
size, or a newer tree that does not extend the older — has shown a split view: the node
writes an audit entry with both signed checkpoints as evidence, logs an error, and its
health service ``liandong.v1.Witness`` reports NOT_SERVING until an operator has looked.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.audit import log as audit
from node.audit.checkpoint import Checkpoint, log_origin, open_checkpoint
from node.audit.log import AuditEvent
from node.audit.merkle import ProofError, verify_consistency
from node.audit.note import NoteError, split_note
from node.envelope import cosign_checkpoint
from node.exchange.context import NodeContext
from node.exchange.delivery import TransportError
from node.federation import Member
from node.store.models import NODE_STATE, WITNESSED
from node.store.writer import Batch, BatchWriter

log = structlog.get_logger(__name__)
SPLIT_VIEW_KEY = "split_view/"  # node_state key prefix: one row per peer caught


class PeerAudit(Protocol):
    """The peer's Audit service, as the witness needs it (node.peers implements it)."""

    async def fetch_checkpoint(self, member: Member) -> bytes:
        """The peer's latest signed checkpoint note (with any cosignatures)."""
        ...

    async def fetch_consistency(
        self, member: Member, old_size: int, new_size: int
    ) -> list[bytes]: ...

    async def send_cosignature(self, member: Member, size: int, line: bytes) -> None: ...


@dataclass(frozen=True)
class Seen:
    size: int
    root: bytes
    note: bytes


class Witness:
    def __init__(
        self,
        context: NodeContext,
        sessions: sessionmaker[Session],
        writer: BatchWriter,
        transport: PeerAudit,
        interval: float,
        on_split_view: Callable[[str], None] = lambda _peer: None,
    ) -> None:
        self.context = context
        self.sessions = sessions
        self.writer = writer
        self.transport = transport
        self.interval = interval
        self.on_split_view = on_split_view
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """A round every `interval` seconds, the first one interval after start-up (peers
        started together need a moment)."""
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self.interval)
                return
            except TimeoutError:
                pass
            registry = self.context.registry
            peers = [m for m in registry.members if m.agency_id != self.context.agency]
            await asyncio.gather(*(self._round(member) for member in peers))

    async def _round(self, member: Member) -> None:
        try:
            await self.witness(member)
        except (TransportError, WitnessRefusal) as problem:
            log.info("peer not witnessed this round", peer=member.agency_id, error=str(problem))

    async def witness(self, member: Member) -> Seen | None:
        """One round for one peer: check its latest checkpoint, cosign it if consistent.

        Returns what is now the latest seen from the peer, or None after a split view.
        """
        peer = member.agency_id
        note = await self.transport.fetch_checkpoint(member)
        checkpoint = self._verified(member, note)
        last = await asyncio.to_thread(self._last_seen, peer)
        if last is not None and checkpoint.size < last.size:
            # An older checkpoint (a lagging replica, a stale cache): it must still be part of
            # the same history, but it is not cosigned and does not replace the newer one.
            await self._check_consistent(member, checkpoint.size, checkpoint.root, last, note)
            return last
        if last is not None and checkpoint.size == last.size:
            if checkpoint.root != last.root:
                await self._split_view(
                    peer, f"two roots for size {checkpoint.size}", last.note, note
                )
                return None
        elif last is not None:
            proof = await self.transport.fetch_consistency(member, last.size, checkpoint.size)
            try:
                verify_consistency(last.size, checkpoint.size, last.root, checkpoint.root, proof)
            except ProofError as error:
                await self._split_view(
                    peer,
                    f"size {checkpoint.size} does not extend size {last.size}: {error}",
                    last.note,
                    note,
                )
                return None
        seen = Seen(checkpoint.size, checkpoint.root, _own_part(note, checkpoint.origin))
        await self.writer.run(lambda batch: self._remember(peer, seen, batch))
        body = checkpoint.body()
        name = log_origin(self.context.registry.federation, self.context.agency)
        line = cosign_checkpoint(
            body, name, self.context.signing_key, int(datetime.now(UTC).timestamp())
        )
        await self.transport.send_cosignature(member, checkpoint.size, line)
        return seen

    def _verified(self, member: Member, note: bytes) -> Checkpoint:
        try:
            return open_checkpoint(note, self.context.registry.log_verifiers(member.agency_id))
        except NoteError as error:
            raise WitnessRefusal(f"checkpoint from {member.agency_id}: {error}") from None

    async def _check_consistent(
        self, member: Member, size: int, root: bytes, last: Seen, note: bytes
    ) -> None:
        proof = await self.transport.fetch_consistency(member, size, last.size)
        try:
            verify_consistency(size, last.size, root, last.root, proof)
        except ProofError as error:
            await self._split_view(
                member.agency_id,
                f"size {size} is not a prefix of size {last.size} seen before: {error}",
                last.note,
                note,
            )

    async def _split_view(self, peer: str, reason: str, earlier: bytes, later: bytes) -> None:
        """Record the evidence: both checkpoints, as the peer signed them."""
        evidence = (
            f"split view by {peer}: {reason}; earlier checkpoint (base64 note): "
            f"{base64.b64encode(earlier).decode()}; later: {base64.b64encode(later).decode()}"
        )
        log.error("split view: a peer showed two inconsistent histories", peer=peer, reason=reason)

        def write(batch: Batch) -> None:
            audit.append(
                batch, AuditEvent.SPLIT_VIEW, node=self.context.agency, peer=peer, detail=evidence
            )
            key = SPLIT_VIEW_KEY + peer
            held = batch.session.scalar(select(NODE_STATE.c.key).where(NODE_STATE.c.key == key))
            if held is None:
                batch.insert(NODE_STATE, {"key": key, "value": reason})

        await self.writer.run(write)
        self.on_split_view(peer)

    def _last_seen(self, peer: str) -> Seen | None:
        with self.sessions() as session:
            row = session.execute(
                select(WITNESSED.c.size, WITNESSED.c.root, WITNESSED.c.note).where(
                    WITNESSED.c.peer == peer
                )
            ).first()
        return None if row is None else Seen(int(row.size), bytes(row.root), bytes(row.note))

    def _remember(self, peer: str, seen: Seen, batch: Batch) -> None:
        values = {"size": seen.size, "root": seen.root, "note": seen.note, "seen_at": _now()}
        held = batch.session.scalar(select(WITNESSED.c.peer).where(WITNESSED.c.peer == peer))
        if held is None:
            batch.insert(WITNESSED, {"peer": peer, **values})
        else:
            batch.update(WITNESSED, {"peer": peer}, values)


class WitnessRefusal(Exception):
    """The peer's answer cannot be witnessed (not signed by it, another log's)."""


def split_views(sessions: sessionmaker[Session]) -> Sequence[str]:
    """Peers this node caught showing a split view (kept until an operator clears them)."""
    with sessions() as session:
        keys = session.scalars(
            select(NODE_STATE.c.key).where(NODE_STATE.c.key.startswith(SPLIT_VIEW_KEY))
        ).all()
    return [key[len(SPLIT_VIEW_KEY) :] for key in keys]


def _own_part(note: bytes, origin: str) -> bytes:
    """The note with only the log's own signature: the cosignatures other witnesses added are
    not evidence of what the peer itself claimed."""
    text, signatures = split_note(note)
    own = [s.line() for s in signatures if s.name == origin and len(s.signature) == 64]
    return text + b"\n" + b"".join(own)


def _now() -> datetime:
    return datetime.now(UTC)
