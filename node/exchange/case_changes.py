"""Reporting case state changes to the plugins (``liandong_cases_changed``), at least once.

The changes are the ``case_events`` rows the case book writes in the same transaction as
their cause, so reading them back in id order after the commit reports every change exactly
as it was recorded, whichever path made it (a receipt, a peer's feedback, an answer, a
decision). How far the plugins have been told is a row of ``node_state``, written after
they return: a crash in between tells them the last group again, never skips one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal, cast

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.plugin_api import CaseChange, Confidentiality
from node.store.models import CASE_EVENTS, CASES, NODE_STATE
from node.store.writer import Batch, BatchWriter

REPORTED_KEY = "cases_changed_reported"  # node_state: the last case_events id reported
GROUP = 500  # changes per hook call


class CaseChangeFeed:
    """Reads new case changes and hands them to ``notify`` in groups, oldest first."""

    def __init__(
        self,
        writer: BatchWriter,
        sessions: sessionmaker[Session],
        notify: Callable[[Sequence[CaseChange]], None],
        poll_seconds: float = 1.0,
    ) -> None:
        self.writer = writer
        self.sessions = sessions
        self.notify = notify
        self.poll_seconds = poll_seconds
        self._wake = asyncio.Event()
        self._stopping = False

    def stop(self) -> None:
        """Stop after the group in hand; what is left is reported after the next start."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        reported: int | None = None
        while not self._stopping:
            self._wake.clear()
            if reported is None:  # here, not before the loop: a restart must see stop()
                reported = await self.writer.run(self._start)
            changes = await asyncio.to_thread(self.changes_after, reported)
            if changes:
                await asyncio.to_thread(self.notify, changes)
                reported = changes[-1].sequence
                await self.writer.run(partial(self._remember, reported))
                if len(changes) == GROUP:
                    continue  # more are waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_seconds)

    def _start(self, batch: Batch) -> int:
        """The last change reported; on the first run, the newest change so far: what
        happened before a plugin asked to hear of it is not news to it."""
        held = batch.session.scalar(
            select(NODE_STATE.c.value).where(NODE_STATE.c.key == REPORTED_KEY)
        )
        if held is not None:
            return int(held)
        newest = int(batch.session.scalar(select(func.max(CASE_EVENTS.c.id))) or 0)
        batch.insert(NODE_STATE, {"key": REPORTED_KEY, "value": str(newest)})
        return newest

    @staticmethod
    def _remember(reported: int, batch: Batch) -> None:
        batch.update(NODE_STATE, {"key": REPORTED_KEY}, {"value": str(reported)})

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
                reason=row["reason"],
                at=row["at"],
                title=row["title"],
                confidentiality=cast(Confidentiality, row["confidentiality"]),
            )
            for row in rows
        ]
