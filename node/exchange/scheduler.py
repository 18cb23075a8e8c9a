"""The deadline scheduler: a loop in the node, not a page view, that moves clocks on time.

Each pass reads only the clocks whose next step has come (an indexed range on
``clocks.next_action_at``), marks them due soon, overdue or escalated, and sends what the
step calls for — a signed reminder (催办) to the responsible agency, a signed escalation
notice to the supervising agency — through the outbox like any other message. The notice is
submitted first, with an idempotency key naming the clock and the step, and the step recorded
after: a node killed in between sends the same notice again on its next pass, which the
outbox answers with the first message id, so nothing is sent twice and nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from functools import partial
from typing import Any

import structlog
from sqlalchemy.orm import Session, sessionmaker

from node.exchange.cases import Reminder
from node.exchange.context import NodeContext
from node.exchange.errors import ExchangeError
from node.exchange.outbox import Outbox, Submission
from node.exchange.sharing import last_finished_quarter
from node.store.writer import BatchWriter

log = structlog.get_logger(__name__)
PASS_LIMIT = 500


class DeadlineScheduler:
    def __init__(
        self,
        context: NodeContext,
        sessions: sessionmaker[Session],
        writer: BatchWriter,
        outbox: Outbox,
        interval: float,
    ) -> None:
        self.context = context
        self.sessions = sessions
        self.writer = writer
        self.outbox = outbox
        self.interval = interval
        self._stopping = asyncio.Event()
        self._awaiting: set[tuple[str, str]] = set()  # (agency, quarter) opened or found

    def stop(self) -> None:
        """Finish the pass under way, then return from run()."""
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            moved = await self.run_pass()
            if moved < PASS_LIMIT:  # caught up: wait for the next interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.interval)

    async def run_pass(self, now: datetime | None = None) -> int:
        """One pass: every clock due by `now`, up to PASS_LIMIT; returns how many moved."""
        now = now or datetime.now(UTC)
        cases = self.context.cases
        await self._await_sharing(now)
        due = await asyncio.to_thread(self._due, now)
        for clock in due:
            values, notice = cases.step(clock, now)
            sent = None
            if notice is not None:
                sent = await self._send(notice, clock, values["state"])
            await self.writer.run(
                partial(cases.record_step, clock=clock, values=values, at=now, sent=sent)
            )
            if values["state"] in ("overdue", "escalated"):
                log.warning(
                    "deadline_" + values["state"],
                    case=clock["case_id"],
                    rule=clock["rule"],
                    responsible=clock["responsible"],
                    notice_to=notice.to if notice else None,
                )
        return len(due)

    async def _await_sharing(self, now: datetime) -> None:
        """Open the quarterly sharing case of each agency that owes this node its data, once
        the quarter is over (``[deadlines] sharing_from``); once per quarter and agency."""
        quarter = last_finished_quarter(now)
        for sharer in self.context.cases.deadlines.sharing_from:
            if (sharer, quarter) in self._awaiting:
                continue
            await self.writer.run(
                partial(self.context.cases.await_sharing, sharer=sharer, quarter=quarter, now=now)
            )
            self._awaiting.add((sharer, quarter))

    def _due(self, now: datetime) -> list[dict[str, Any]]:
        with self.sessions() as session:
            return self.context.cases.due_clocks(session, now, PASS_LIMIT)

    async def _send(self, notice: Reminder, clock: dict[str, Any], step: str) -> str | None:
        kind = "KIND_REMINDER" if notice.kind == "reminder" else "KIND_ESCALATION"
        submission = Submission(
            family="notice",
            recipients=[notice.to],
            body={"kind": kind, "title": notice.title, "text": notice.text},
            case_ref=notice.case_id,
            confidentiality=notice.confidentiality,
            client_key=f"deadline:{clock['case_id']}:{clock['peer']}:{clock['rule']}:{step}",
        )
        try:
            return await self.outbox.submit(submission)
        except ExchangeError as error:
            # E.g. the supervisor is not in the registry: the step is still recorded (and
            # audited), the operator sees why in the log.
            log.error("deadline notice not sent", to=notice.to, error=error.message)
            return None
