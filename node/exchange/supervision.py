"""Filing supervision (立案监督, 002 §五(二)): transfers the police have not decided on in time
(应立未立), and those they declined to file, with the reasons.

The procuratorate gets a copy (抄送) of every crime transfer and, when the police send their
decisions to it too, follows the case (node.exchange.cases). The report reads those cases
and their histories; the filing deadline of each comes from the rules in force on this node.
Cases of penalty records that should have been transferred but were not (应移未移) need the
penalty data the agencies share quarterly, which is not built yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.exchange.cases import CaseBook
from node.exchange.lifecycles import Role
from node.identity import agency_kind
from node.store.models import CASE_EVENTS, CASES

UNDECIDED = ("received", "checking", "major_complex", "supplemented")
DECLINED = ("not_filed", "reconsideration_requested", "not_filed_upheld")
SHOULD_BE_FILED = "should_be_filed"  # 应立未立: no filing decision past the deadline
NOT_FILED = "not_filed"  # 不予立案, with the police's reasons


@dataclass(frozen=True)
class Finding:
    finding: str
    case_id: str
    transferred_by: str
    title: str
    state: str
    received_at: datetime
    due_at: datetime | None
    overdue_days: float  # 0 when not overdue
    reason: str
    decided_by: str


def supervision_report(session: Session, book: CaseBook, now: datetime) -> list[Finding]:
    """Every crime transfer this node holds whose filing is overdue or was declined, most
    overdue first, then the declined ones."""
    rows = session.execute(
        select(CASES).where(
            CASES.c.family == "crime_transfer", CASES.c.state.in_((*UNDECIDED, *DECLINED))
        )
    ).mappings()
    overdue: list[Finding] = []
    declined: list[Finding] = []
    for case in rows:
        opener = case["role"] == Role.OPENER.value
        if opener and agency_kind(case["peer"]) != "police":
            continue  # ecology's copy to the procuratorate: not a filing decision
        if not opener and agency_kind(book.agency) == "police":
            continue  # the police's own cases: they are the ones supervised
        transferred_by = book.agency if opener else case["peer"]
        history = (
            session.execute(
                select(CASE_EVENTS)
                .where(CASE_EVENTS.c.case_id == case["case_id"], CASE_EVENTS.c.peer == case["peer"])
                .order_by(CASE_EVENTS.c.id)
            )
            .mappings()
            .all()
        )
        received_at = next(
            (e["at"] for e in history if e["to_state"] == "received"), case["opened_at"]
        )
        if case["state"] in DECLINED:
            decision = next((e for e in reversed(history) if e["to_state"] in DECLINED), None)
            declined.append(
                Finding(
                    NOT_FILED,
                    case["case_id"],
                    transferred_by,
                    case["title"],
                    case["state"],
                    received_at,
                    None,
                    0.0,
                    decision["reason"] if decision else "",
                    decision["actor"] if decision else "",
                )
            )
            continue
        entered = next(
            (e["at"] for e in reversed(history) if e["to_state"] == case["state"]), received_at
        )
        anchor = received_at if case["state"] in ("checking", "major_complex") else entered
        rule = next(
            (
                r
                for r in book.deadlines.for_family("crime_transfer")
                if case["state"] in r.while_in and r.name.startswith("crime_transfer.filing")
            ),
            None,
        )
        if rule is None:
            continue
        due = book.deadlines.due(rule, anchor)
        if now <= due:
            continue
        late = (now - due).total_seconds() * book.deadlines.speed / 86400
        overdue.append(
            Finding(
                SHOULD_BE_FILED,
                case["case_id"],
                transferred_by,
                case["title"],
                case["state"],
                received_at,
                due,
                round(late, 1),
                "",
                "",
            )
        )
    overdue.sort(key=lambda f: -f.overdue_days)
    return overdue + declined
