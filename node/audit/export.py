"""Writing an audit bundle of this node's log (node.audit.bundle), for `liandong audit export`.

The bundle covers whole batches: it starts and ends at sizes the node signed a checkpoint for,
so every checkpoint in it can be recomputed from the entries it carries (and the left edge of
the tree at its start).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.audit.bundle import BundledMessage, BundleWriter, Manifest
from node.audit.log import AuditEvent, format_time
from node.audit.merkle import Frontier
from node.audit.tree import StoredTree
from node.exchange.errors import ExchangeError, Reason
from node.store.models import (
    AUDIT_ENTRIES,
    CHECKPOINTS,
    COSIGNATURES,
    DELIVERIES,
    MESSAGES,
    REGISTRIES,
)

CHUNK = 5000
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    first_index: int
    end_index: int
    checkpoints: int
    messages: int
    size_bytes: int


@dataclass(frozen=True)
class LogIdentity:
    agency: str
    origin: str
    federation: str
    registry: bytes  # as the operator signed it
    operator_key_pem: bytes


def export_bundle(
    sessions: sessionmaker[Session],
    out: Path,
    identity: LogIdentity,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: Progress = lambda _done, _total: None,
) -> ExportSummary:
    if not out.is_absolute():
        raise ExchangeError(Reason.INVALID, f"bundle path {out} must be absolute")
    if not out.parent.is_dir():
        raise ExchangeError(Reason.INVALID, f"folder {out.parent} does not exist")
    with sessions() as session:
        first, end = _covered_range(session, since, until)
        frontier = Frontier.load(first, StoredTree(session))
        partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
        writer = BundleWriter(partial)
        try:
            message_ids = _write_entries(session, writer, first, end, progress)
            cosignatures: dict[int, list[bytes]] = {}
            for size, line in session.execute(
                select(COSIGNATURES.c.size, COSIGNATURES.c.line)
                .where(COSIGNATURES.c.size >= max(first, 1), COSIGNATURES.c.size <= end)
                .order_by(COSIGNATURES.c.size, COSIGNATURES.c.witness)
            ):
                cosignatures.setdefault(int(size), []).append(bytes(line))
            # Each checkpoint as served: the node's signed note, then the witnesses' lines.
            checkpoints = [
                (int(size), bytes(note) + b"".join(cosignatures.get(int(size), [])))
                for size, note in session.execute(
                    select(CHECKPOINTS.c.size, CHECKPOINTS.c.note)
                    .where(CHECKPOINTS.c.size >= max(first, 1), CHECKPOINTS.c.size <= end)
                    .order_by(CHECKPOINTS.c.size)
                )
            ]
            messages = _messages(session, message_ids, identity.agency)
            # Every registry the node ran on: keys a later registry dropped still verify the
            # signatures made under them.
            earlier = [
                bytes(data)
                for (data,) in session.execute(
                    select(REGISTRIES.c.data).order_by(REGISTRIES.c.serial)
                )
                if bytes(data) != identity.registry
            ]
            manifest = Manifest(
                agency=identity.agency,
                origin=identity.origin,
                federation=identity.federation,
                created_at=format_time(datetime.now(UTC)),
                first_index=first,
                end_index=end,
                start_frontier=list(frontier.hashes),
                since=format_time(since) if since else "",
                until=format_time(until) if until else "",
                messages=len(messages),
            )
            writer.finish(
                manifest,
                registry=identity.registry,
                operator_key_pem=identity.operator_key_pem,
                checkpoints=checkpoints,
                messages=messages,
                earlier_registries=earlier,
            )
        except BaseException:
            writer.abort()
            raise
    os.replace(partial, out)
    return ExportSummary(out, first, end, len(checkpoints), len(messages), out.stat().st_size)


def _covered_range(
    session: Session, since: datetime | None, until: datetime | None
) -> tuple[int, int]:
    """[first, end) widened to checkpoint sizes, so the bundle's checkpoints all verify."""
    signed = session.scalar(select(func.max(CHECKPOINTS.c.size)))
    if not signed:
        raise ExchangeError(Reason.NOT_FOUND, "this node has not signed a checkpoint yet")
    index = AUDIT_ENTRIES.c.idx
    low = 0
    if since is not None:
        low = session.scalar(select(func.min(index)).where(AUDIT_ENTRIES.c.recorded_at >= since))
        if low is None:
            raise ExchangeError(Reason.NOT_FOUND, f"no audit entry since {format_time(since)}")
    high = signed
    if until is not None:
        last = session.scalar(select(func.max(index)).where(AUDIT_ENTRIES.c.recorded_at <= until))
        if last is None or last < low:
            raise ExchangeError(Reason.NOT_FOUND, "no audit entry in that period")
        high = min(last + 1, signed)
    first = session.scalar(select(func.max(CHECKPOINTS.c.size)).where(CHECKPOINTS.c.size <= low))
    end = session.scalar(select(func.min(CHECKPOINTS.c.size)).where(CHECKPOINTS.c.size >= high))
    return int(first or 0), int(end or signed)


def _write_entries(
    session: Session, writer: BundleWriter, first: int, end: int, progress: Progress
) -> list[str]:
    message_ids: dict[str, None] = {}
    position = first
    while position < end:
        rows = session.execute(
            select(AUDIT_ENTRIES.c.idx, AUDIT_ENTRIES.c.entry)
            .where(AUDIT_ENTRIES.c.idx >= position, AUDIT_ENTRIES.c.idx < end)
            .order_by(AUDIT_ENTRIES.c.idx)
            .limit(CHUNK)
        ).all()
        if not rows:
            raise ExchangeError(Reason.UNAVAILABLE, f"audit entry {position} is missing")
        for index, entry in rows:
            if index != position:
                raise ExchangeError(Reason.UNAVAILABLE, f"audit entry {position} is missing")
            raw = bytes(entry)
            writer.add_entry(raw)
            fields = json.loads(raw)
            if fields.get("event") in (AuditEvent.SENT, AuditEvent.RECEIVED):
                message_ids.setdefault(str(fields["message_id"]), None)
            position += 1
        progress(position - first, end - first)
    return list(message_ids)


def _messages(session: Session, message_ids: list[str], agency: str) -> list[BundledMessage]:
    found: list[BundledMessage] = []
    for start in range(0, len(message_ids), 500):
        chunk = message_ids[start : start + 500]
        receipts: dict[str, dict[str, bytes]] = {}
        proofs: dict[str, dict[str, bytes]] = {}
        for message_id, recipient, receipt, proof in session.execute(
            select(
                DELIVERIES.c.message_id,
                DELIVERIES.c.recipient,
                DELIVERIES.c.receipt,
                DELIVERIES.c.receiver_proof,
            ).where(DELIVERIES.c.message_id.in_(chunk), DELIVERIES.c.receipt.is_not(None))
        ):
            receipts.setdefault(message_id, {})[recipient] = bytes(receipt)
            if proof:
                proofs.setdefault(message_id, {})[recipient] = bytes(proof)
        for message_id, direction, envelope, receipt in session.execute(
            select(
                MESSAGES.c.message_id, MESSAGES.c.direction, MESSAGES.c.envelope, MESSAGES.c.receipt
            )
            .where(MESSAGES.c.message_id.in_(chunk))
            .order_by(MESSAGES.c.id)
        ):
            if direction == "out":
                signed = receipts.get(message_id, {})
            else:
                signed = {} if receipt is None else {agency: bytes(receipt)}
            found.append(
                BundledMessage(
                    message_id,
                    direction,
                    bytes(envelope),
                    signed,
                    proofs.get(message_id, {}) if direction == "out" else {},
                )
            )
    return found
