"""Reporting case state changes to the plugins (``liandong_cases_changed``), at least once.

The changes are the ``case_events`` rows the case book writes in the same transaction as
their cause, so reading them back in id order after the commit reports every change exactly
as it was recorded, whichever path made it (a receipt, a peer's feedback, an answer, a
decision). How far each plugin has been told is a row of ``node_state``, written after it
returns: a crash in between tells it the last group again, never skips one, and a plugin that
fails is offered the same group again without holding back the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal, cast

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node._pb.liandong.v1 import envelope_pb2
from node.exchange.messages import confidentiality_label, field_markings_of
from node.plugin_api import CaseChange, Confidentiality, cleared, most_restricted
from node.store.models import CASE_EVENTS, CASES, MESSAGES, NODE_STATE
from node.store.writer import Batch, BatchWriter

log = structlog.get_logger(__name__)
GROUP = 500  # changes per hook call


def reported_key(plugin: str) -> str:
    """The ``node_state`` row holding the last case_events id ``plugin`` was told of."""
    return f"cases_changed:{plugin}"[:64]


class CaseChangeFeed:
    """Reads new case changes and hands them to each watching plugin in groups, oldest first.

    Each plugin has its own cursor: one whose local system is down is offered its group
    again at the next poll, while the others move on.
    """

    def __init__(
        self,
        writer: BatchWriter,
        sessions: sessionmaker[Session],
        watchers: Sequence[str],
        notify: Callable[[str, Sequence[CaseChange]], None],
        poll_seconds: float = 1.0,
    ) -> None:
        self.writer = writer
        self.sessions = sessions
        self.watchers = list(watchers)
        self.notify = notify
        self.poll_seconds = poll_seconds
        self._wake = asyncio.Event()
        self._stopping = False

    def stop(self) -> None:
        """Stop after the group in hand; what is left is reported after the next start."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        reported: dict[str, int] | None = None
        while not self._stopping:
            self._wake.clear()
            if reported is None:  # here, not before the loop: a restart must see stop()
                reported = await self.writer.run(self._start)
            told, more = await asyncio.to_thread(self.offer, reported)
            if told:
                reported.update(told)
                await self.writer.run(partial(self._remember, told))
            if more:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_seconds)

    def offer(self, reported: dict[str, int]) -> tuple[dict[str, int], bool]:
        """Offer each plugin the group after its cursor. Returns the new cursors of those
        that took theirs, and whether a full group went out (so more may be waiting)."""
        told: dict[str, int] = {}
        more = False
        for cursor in sorted(set(reported.values())):  # usually one: plugins keep pace
            changes = self.changes_after(cursor)
            if not changes:
                continue
            for plugin in (name for name in self.watchers if reported[name] == cursor):
                try:
                    self.notify(plugin, changes)
                except Exception:
                    # Kept where it was: offered again at the next poll, not lost.
                    log.exception(
                        "plugin hook failed; its case changes are offered again",
                        plugin=plugin,
                        hook="liandong_cases_changed",
                        first_sequence=changes[0].sequence,
                    )
                    continue
                told[plugin] = changes[-1].sequence
                more = more or len(changes) == GROUP
        return told, more

    def _start(self, batch: Batch) -> dict[str, int]:
        """Each plugin's last change reported; for a plugin never seen before, the newest
        change so far: what happened before it asked to hear of it is not news to it."""
        keys = {reported_key(name): name for name in self.watchers}
        held = {
            keys[key]: int(value)
            for key, value in batch.session.execute(
                select(NODE_STATE.c.key, NODE_STATE.c.value).where(NODE_STATE.c.key.in_(keys))
            )
        }
        newest = int(batch.session.scalar(select(func.max(CASE_EVENTS.c.id))) or 0)
        for name in self.watchers:
            if name not in held:
                batch.insert(NODE_STATE, {"key": reported_key(name), "value": str(newest)})
                held[name] = newest
        return held

    @staticmethod
    def _remember(told: dict[str, int], batch: Batch) -> None:
        for name, sequence in told.items():
            batch.update(NODE_STATE, {"key": reported_key(name)}, {"value": str(sequence)})

    def changes_after(self, reported: int) -> list[CaseChange]:
        """Up to GROUP changes recorded after ``reported``, oldest first."""
        query = (
            select(
                CASE_EVENTS,
                CASES.c.family,
                CASES.c.role,
                CASES.c.title,
                CASES.c.confidentiality,
            )
            .join(
                CASES,
                (CASES.c.case_id == CASE_EVENTS.c.case_id) & (CASES.c.peer == CASE_EVENTS.c.peer),
            )
            .where(CASE_EVENTS.c.id > reported)
            .order_by(CASE_EVENTS.c.id)
            .limit(GROUP)
        )
        with self.sessions() as session:
            rows = session.execute(query).mappings().all()
            reasons = _reason_markings(
                session, {row["message_id"] for row in rows if row["reason"] and row["message_id"]}
            )
        return [
            CaseChange(
                sequence=row["id"],
                case_id=row["case_id"],
                peer=row["peer"],
                family=row["family"],
                role=cast(Literal["opener", "addressee"], row["role"]),
                event=row["event"],
                from_state=row["from_state"],
                to_state=row["to_state"],
                actor=row["actor"],
                message_id=row["message_id"] or "",
                # Like the title: a reason marked above the case is not the case's to give
                # (a confidential answer on an internal case goes to systems cleared for it).
                reason=row["reason"]
                if cleared(reasons.get(row["message_id"], "public"), row["confidentiality"])
                else "",
                at=row["at"],
                title=row["title"],
                confidentiality=cast(Confidentiality, row["confidentiality"]),
            )
            for row in rows
        ]


def _reason_markings(session: Session, message_ids: set[str]) -> dict[str, str]:
    """The marking of the reason (feedback text) each message gives: the message's own, or
    its ``text`` field's. Read from the stored envelopes, for the few changes with a reason."""
    if not message_ids:
        return {}
    markings = {}
    for message_id, stored in session.execute(
        select(MESSAGES.c.message_id, MESSAGES.c.envelope).where(
            MESSAGES.c.message_id.in_(message_ids)
        )
    ):
        message = envelope_pb2.Message.FromString(envelope_pb2.Envelope.FromString(stored).payload)
        markings[message_id] = most_restricted(
            confidentiality_label(message), field_markings_of(message).get("text", "public")
        )
    return markings
