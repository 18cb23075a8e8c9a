"""Filing supervision (立案监督, 002 §五(二)): transfers the police have not decided on in time
(应立未立), and those they declined to file, with the reasons.

The procuratorate gets a copy (抄送) of every crime transfer and, when the police send their
decisions to it too, follows the case (node.exchange.cases). The report reads those cases
and their histories; the filing deadline of each comes from the rules in force on this node.

Penalty records that should have been transferred but were not (应移未移) come from the
penalty data the agencies share quarterly (node.exchange.sharing): each shared record that
meets a crime threshold in force on this node (``[supervision.thresholds]``) and has no crime
transfer from the same agency with the record's number as its ``case_ref`` is reported. A
shared file that cannot be read is reported too, rather than silently leaving its records
out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from node._pb.liandong.v1 import envelope_pb2
from node.exchange.cases import CaseBook
from node.exchange.lifecycles import Role
from node.exchange.sharing import SharedDataError, read_penalty_document
from node.exchange.thresholds import LEGAL_THRESHOLDS, Threshold, classify
from node.identity import agency_kind
from node.store.models import CASE_EVENTS, CASES, MessageRecord

UNDECIDED = ("received", "checking", "major_complex", "supplemented")
DECLINED = ("not_filed", "reconsideration_requested", "not_filed_upheld")
SHOULD_BE_FILED = "should_be_filed"  # 应立未立: no filing decision past the deadline
NOT_FILED = "not_filed"  # 不予立案, with the police's reasons
SHOULD_BE_TRANSFERRED = "should_be_transferred"  # 应移未移: a shared record over a threshold
SHARED_DATA_ERROR = "shared_data_error"  # a shared data file or record that cannot be read
MAX_SHARED_FILE = 64 << 20  # a quarter's penalty records are a few MB at most


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


def supervision_report(
    session: Session,
    book: CaseBook,
    now: datetime,
    read_attachment: Callable[[str], bytes] | None = None,
    thresholds: Sequence[Threshold] = LEGAL_THRESHOLDS,
) -> list[Finding]:
    """Every crime transfer this node holds whose filing is overdue (most overdue first) or
    was declined, then — given ``read_attachment`` (hex digest -> bytes) — the shared penalty
    records that should have been transferred, oldest decision first."""
    findings = filing_findings(session, book, now)
    if read_attachment is not None:
        findings += untransferred(session, read_attachment, thresholds, now)
    return findings


def filing_findings(session: Session, book: CaseBook, now: datetime) -> list[Finding]:
    """应立未立 and 不予立案: the crime transfers whose filing is overdue or was declined."""
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


def _shared_files(
    session: Session, read_attachment: Callable[[str], bytes]
) -> list[tuple[str, datetime, str, bytes | None]]:
    """(sender, received at, file name, content or None if unreadable) of every attachment
    of every data-sharing notice this node received, oldest first."""
    notices = session.scalars(
        select(MessageRecord)
        .where(MessageRecord.direction == "in", MessageRecord.body_type == "notice")
        .order_by(MessageRecord.id)
    )
    files: list[tuple[str, datetime, str, bytes | None]] = []
    for record in notices:
        envelope = envelope_pb2.Envelope.FromString(record.envelope)
        message = envelope_pb2.Message.FromString(envelope.payload)
        if message.notice.kind != envelope_pb2.Notice.KIND_DATA_SHARING:
            continue
        for ref in message.attachments:
            if not ref.file_name.lower().endswith(".json"):
                continue  # a cover letter, a spreadsheet: not the shared records
            if ref.size > MAX_SHARED_FILE:
                # Read whole on every report: an agency's 1 GiB attachment must not be.
                files.append((record.sender, record.stored_at, ref.file_name, None))
                continue
            try:
                content: bytes | None = read_attachment(ref.sha256.hex())
            except OSError:
                content = None
            files.append((record.sender, record.stored_at, ref.file_name, content))
    return files


def untransferred(
    session: Session,
    read_attachment: Callable[[str], bytes],
    thresholds: Sequence[Threshold],
    now: datetime,
) -> list[Finding]:
    """应移未移: shared penalty records over a crime threshold with no crime transfer."""
    transferred = {
        (row.peer, row.case_ref)
        for row in session.execute(
            select(CASES.c.peer, MessageRecord.case_ref)
            .join(MessageRecord, MessageRecord.message_id == CASES.c.case_id)
            .where(CASES.c.family == "crime_transfer", MessageRecord.direction == "in")
        )
    }
    latest: dict[tuple[str, str], tuple[datetime, dict[str, object]]] = {}
    problems: list[Finding] = []
    for sender, received_at, name, content in _shared_files(session, read_attachment):
        try:
            if content is None:
                raise SharedDataError(
                    f"the file is not on this node, or over {MAX_SHARED_FILE >> 20} MiB"
                )
            document = read_penalty_document(content)
        except Exception as error:  # another agency's file must never break the report
            problems.append(_problem(sender, received_at, name, str(error)[:300]))
            continue
        if document is None:
            continue
        for record in document[1]:
            # A later sharing (an addendum, a correction) replaces what an earlier one said.
            latest[(sender, str(record["record_id"]))] = (received_at, record)
    findings: list[Finding] = []
    for (sender, record_id), (received_at, record) in latest.items():
        try:
            crimes = [m for m in classify(record, thresholds) if m.action == "crime_transfer"]
        except Exception as error:  # ThresholdError, or anything a hostile record causes
            problems.append(_problem(sender, received_at, f"record {record_id}", str(error)))
            continue
        if not crimes or (sender, record_id) in transferred:
            continue
        decided = _decided_on(record.get("decided_on"))
        findings.append(
            Finding(
                SHOULD_BE_TRANSFERRED,
                record_id,
                sender,
                str(record.get("party") or ""),
                "",
                received_at,
                decided,
                round((now - decided).total_seconds() / 86400, 1) if decided else 0.0,
                "；".join(m.describe() for m in crimes),
                "",
            )
        )
    findings.sort(key=lambda f: -f.overdue_days)  # the longest untransferred first
    return findings + problems


def _decided_on(value: object) -> datetime | None:
    try:
        day = date.fromisoformat(str(value)[:10])
    except ValueError:
        return None
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _problem(sender: str, received_at: datetime, where: str, error: str) -> Finding:
    return Finding(SHARED_DATA_ERROR, where, sender, "", "", received_at, None, 0.0, error, "")
