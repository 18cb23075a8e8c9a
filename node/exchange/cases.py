"""Cases: each opening message's lifecycle between this node and each peer, and its clocks.

Everything here runs inside the writer's units of work (node.store.writer), in the same
transaction as the message, receipt or decision that causes it: a case never moves without
its cause being stored, and a cause is never stored without the case moving. Transitions
caused by the opening message and the receipt are recorded by those messages' own audit
entries ("sent", "received", "receipt_received"); every other transition writes a
"case_transition" entry naming the case, the peer, the states and the cause.

Rules of the lifecycles are node.exchange.lifecycles; deadlines are node.exchange.deadlines.
A transition this node makes (a reply it sends, a decision) that its lifecycle does not allow
is refused with Reason.PRECONDITION naming the current state. A peer's signed message moves
this side's copy of the case to the state it names, whatever state this side last saw: the
peer's node checked the move against its own record, which is the authority on its own
decisions (some are recorded there without a message). Only an event its lifecycle does not
know, or one the peer's role may not make, is recorded as "case_mismatch" instead (the
message itself is valid and kept).

Only the parties of a case move it: the peer it is held with, and, on a copy (抄送: the
procuratorate's copy of a crime transfer, COPY_HOLDERS), the addressee proper — a recipient of
the opening message that holds no copy itself. A reply that names a case of this node (by its
id, or by the first version's id for a redacted version) from anyone else is recorded as
"case_mismatch" and moves nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from node._pb.liandong.v1 import envelope_pb2
from node.audit import log as audit
from node.audit.log import AuditEvent, format_time
from node.exchange.deadlines import Anchor, DeadlineRule, Deadlines
from node.exchange.errors import ExchangeError, Reason, shown
from node.exchange.lifecycles import LIFECYCLES, RECEIVED, SENT, Role, Transition
from node.exchange.lifecycles.data_sharing import AWAITED
from node.exchange.review import COPY_HOLDERS
from node.exchange.sharing import QUARTER, last_finished_quarter, quarter_end
from node.identity import agency_kind
from node.plugin_api import most_restricted
from node.store.models import CASE_EVENTS, CASES, CLOCKS, MESSAGES, NODE_STATE
from node.store.writer import Batch

log = structlog.get_logger(__name__)

OPEN_CLOCK_STATES = ("open", "due_soon", "overdue", "escalated")  # not yet met
# Reply body types that are an event of the case they answer, without a status.
FEEDBACK = "feedback"


@dataclass(frozen=True)
class CaseView:
    case_id: str
    peer: str
    family: str
    role: str
    state: str
    title: str
    confidentiality: str
    opened_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ClockView:
    case_id: str
    peer: str
    family: str
    title: str
    rule: str
    responsible: str
    due_at: datetime
    state: str
    confidentiality: str


@dataclass(frozen=True)
class Reminder:
    """A signed notice the scheduler must send: a reminder (催办) or an escalation."""

    kind: str  # "reminder" or "escalation"
    to: str
    case_id: str
    peer: str
    rule: str
    title: str
    text: str
    # The case's marking, at least internal: the notice names the case and quotes its title.
    confidentiality: str = "internal"


def case_attrs(message: envelope_pb2.Message) -> dict[str, Any]:
    """What the deadline rules read from an opening message."""
    attrs: dict[str, Any] = {}
    body = message.WhichOneof("body")
    if body == "recommendation" and message.recommendation.urgent:
        attrs["urgent"] = True
    if message.HasField("deadline"):
        attrs["deadline"] = format_time(message.deadline.ToDatetime(UTC))
    if body == "crime_transfer" and message.crime_transfer.HasField("approved_at"):
        attrs["approved_at"] = format_time(message.crime_transfer.approved_at.ToDatetime(UTC))
    return attrs


def _title(message: envelope_pb2.Message) -> str:
    """The case's title; none when the title is marked above the message: reminders and
    escalations (催办, 督办) quote the case title, and they carry no field markings for a
    redactor to act on."""
    if any(marked.field == "title" for marked in message.field_markings):
        return ""
    body = message.WhichOneof("body")
    title = getattr(getattr(message, body), "title", "") if body else ""
    return str(title)[:256]


def sharing_case_id(quarter: str) -> str:
    """The case that awaits an agency's data of ``quarter`` (one per sharing agency)."""
    return f"sharing-{quarter}"


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class CaseBook:
    def __init__(
        self,
        agency: str,
        deadlines: Deadlines,
        supervisor_of: Callable[[str], str] = lambda _agency: "",
    ) -> None:
        self.agency = agency
        self.deadlines = deadlines
        # The federation registry's supervisor of an agency (node.federation), if it names one.
        self.supervisor_of = supervisor_of

    def supervisor_for(self, responsible: str) -> str:
        """Where escalations about ``responsible`` go: the registry's supervisor of that
        agency, else this node's ``[deadlines] supervisor``; "" for nowhere (and never this
        node itself, which cannot escalate to itself)."""
        supervisor = self.supervisor_of(responsible) or self.deadlines.supervisor
        return "" if supervisor == self.agency else supervisor

    # -- opening -------------------------------------------------------------------------

    def open_sent(
        self,
        batch: Batch,
        message: envelope_pb2.Message,
        family: str,
        confidentiality: str,
        at: datetime,
    ) -> None:
        """The opener stored an opening message: one case per recipient, state "sent"."""
        if family not in LIFECYCLES:
            return
        attrs = case_attrs(message)
        for recipient in message.recipients:
            case = self._new_case(
                message, recipient, family, Role.OPENER, SENT, confidentiality, attrs, at
            )
            batch.insert(CASES, case)
            batch.remember(("case", message.message_id, recipient), case)
            batch.remember(("clocks", message.message_id, recipient), {})  # a new case has none
            approved = attrs.get("approved_at")
            for rule in self.deadlines.for_family(family):
                if rule.anchor is Anchor.APPROVED and approved and rule.applies(attrs, recipient):
                    # Checked once, now: was the file sent within the time after approval?
                    start = _parse_time(str(approved))
                    due = self.deadlines.due(rule, start)
                    clock = self._clock_row(case, rule, start, due)
                    clock.update(
                        state="met" if at <= due else "met_late", next_action_at=None, closed_at=at
                    )
                    batch.insert(CLOCKS, clock)

    def open_received(
        self,
        batch: Batch,
        message: envelope_pb2.Message,
        family: str,
        confidentiality: str,
        at: datetime,
    ) -> None:
        """The addressee stored an opening message: its case, state "received", clocks on."""
        if family not in LIFECYCLES:
            return
        if batch.isolated and self._load(batch, message.message_id, message.sender) is not None:
            # The id of a case this node opened with the sender (message ids are the sender's
            # choice): refused like any other message id already used, not a failed store.
            # Only alone: a shared batch finds the clash by the primary key, then runs alone.
            raise ExchangeError(
                Reason.INVALID,
                f"message id {message.message_id} is already a case between this node and "
                f"{message.sender}; a new message needs a new id",
            )
        case = self._new_case(
            message,
            message.sender,
            family,
            Role.ADDRESSEE,
            RECEIVED,
            confidentiality,
            case_attrs(message),
            at,
        )
        batch.insert(CASES, case)
        batch.remember(("case", case["case_id"], case["peer"]), case)
        batch.remember(("clocks", case["case_id"], case["peer"]), {})  # a new case has none
        self._start_clocks(batch, case, {}, at)
        if (
            family == "notice"
            and message.notice.kind == envelope_pb2.Notice.KIND_DATA_SHARING
            and message.sender in self.deadlines.sharing_from
        ):
            self._sharing_received(batch, message, at)

    # -- quarterly data sharing (001 §七) -------------------------------------------------

    def await_sharing(self, batch: Batch, sharer: str, quarter: str, now: datetime) -> bool:
        """Open the case for ``sharer``'s data of ``quarter``, awaited since the quarter
        ended, with its clock; False when it is open already (or the data came first).

        The clock starts when the quarter ended, but never before this node first waited
        for the agency: a node just configured does not remind an agency at once of a
        quarter it may have shared before (or by other means)."""
        case_id = sharing_case_id(quarter)
        if self._load(batch, case_id, sharer) is not None:
            return False
        since_key = f"sharing_since:{sharer}"[:64]
        since = batch.recall(("node_state", since_key)) or batch.session.scalar(
            select(NODE_STATE.c.value).where(NODE_STATE.c.key == since_key)
        )
        if since is None:
            since = format_time(now)
            batch.insert(NODE_STATE, {"key": since_key, "value": since})
            batch.remember(("node_state", since_key), since)
        ended = quarter_end(quarter)
        start = max(ended, _parse_time(str(since)))
        case = {
            "case_id": case_id,
            "peer": sharer,
            "family": "data_sharing",
            "role": Role.ADDRESSEE.value,
            "state": AWAITED,
            "title": f"{quarter} 行政处罚信息和监测数据",
            "confidentiality": "internal",
            "attrs": json.dumps({"quarter": quarter}),
            "opened_at": ended,
            "updated_at": now,
        }
        batch.insert(CASES, case)
        batch.remember(("case", case_id, sharer), case)
        batch.remember(("clocks", case_id, sharer), {})
        audit.append(
            batch,
            AuditEvent.CASE_TRANSITION,
            node=self.agency,
            at=now,
            peer=sharer,
            family="data_sharing",
            detail=f"case {case_id} (data_sharing): opened, {AWAITED}; {quarter} ended "
            f"{format_time(ended)}",
        )
        self._start_clocks(batch, case, {}, start)
        return True

    def _sharing_received(self, batch: Batch, message: envelope_pb2.Message, at: datetime) -> None:
        """A data-sharing notice closes its quarter's case: the quarter in ``case_ref``, else
        the latest one over when the notice was written. An addendum changes nothing, nor
        does a quarter not yet over (it would open, and close, a case no clock awaits)."""
        if QUARTER.match(message.case_ref):
            quarter = message.case_ref
            if quarter_end(quarter) > at:
                return
        else:
            quarter = last_finished_quarter(message.created_at.ToDatetime(UTC))
        self.await_sharing(batch, message.sender, quarter, at)  # the data may come first
        case = self._load(batch, sharing_case_id(quarter), message.sender)
        if case is None or case["state"] != AWAITED:
            return
        shared = LIFECYCLES["data_sharing"].find("shared")[0]
        self._move(batch, case, shared, message.sender, at, message.message_id, "", None)

    def preload(self, batch: Batch, keys: tuple[tuple[str, str], ...]) -> None:
        """Read the cases (case id, peer) and their clocks that the batch's units will move,
        in two queries instead of two per unit (receipts come by the dozen)."""
        marker = ("preloaded", keys)
        if batch.recall(marker) is not None:
            return
        batch.remember(marker, True)
        wanted = [k for k in keys if batch.recall(("case", *k)) is None]
        if not wanted:
            return
        ids = sorted({case_id for case_id, _peer in wanted})
        found = {
            (row["case_id"], row["peer"]): dict(row)
            for row in batch.session.execute(select(CASES).where(CASES.c.case_id.in_(ids)))
            .mappings()
            .all()
        }
        clocks: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for row in batch.session.execute(
            select(CLOCKS).where(CLOCKS.c.case_id.in_(ids))
        ).mappings():
            clocks.setdefault((row["case_id"], row["peer"]), {})[row["rule"]] = dict(row)
        for key in wanted:
            batch.remember(("case", *key), found.get(key, False))  # False: known to be none
            if key in found:
                batch.remember(("clocks", *key), clocks.get(key, {}))

    def receipt_stored(self, batch: Batch, message_id: str, recipient: str, at: datetime) -> None:
        """The opener stored the addressee's signed receipt: "sent" -> "received"."""
        case = self._load(batch, message_id, recipient)
        if case is None or case["state"] != SENT:
            return  # not an opening message, or the case already moved on
        self._move(
            batch, case, LIFECYCLES[case["family"]].find(RECEIVED)[0], recipient, at, None, "", None
        )

    # -- replies and decisions -----------------------------------------------------------

    def reply_sent(self, batch: Batch, message: envelope_pb2.Message, at: datetime) -> None:
        """This node sends a reply: each case it moves must allow it (else PRECONDITION)."""
        for recipient in message.recipients:
            found = self._reply_case(batch, message, recipient)
            if found is None:
                continue
            case, event, reason, date = found
            transition = self._allowed(case, event, self.agency, reason, date)
            self._move(batch, case, transition, self.agency, at, message.message_id, reason, date)

    def reply_received(self, batch: Batch, message: envelope_pb2.Message, at: datetime) -> None:
        """A peer's signed reply: applied when its lifecycle allows, else recorded."""
        found = self._reply_case(batch, message, message.sender)
        co_addressee = False
        if found is None and message.in_reply_to:
            found = self._copy_case(batch, message, at)
            co_addressee = found is not None
        if found is None:
            return
        case, event, reason, date = found
        try:
            # The peer's node checked the move against its own record of the case, which
            # is the authority on its decisions (some of them are recorded there without a
            # message, e.g. "accepted"): this side follows, whatever state it last saw.
            transition = self._allowed(
                case,
                event,
                message.sender,
                reason,
                date,
                follow=True,
                as_role=Role.ADDRESSEE if co_addressee else None,
            )
        except ExchangeError as error:
            log.warning(
                "case_mismatch", case=case["case_id"], peer=message.sender, error=error.message
            )
            audit.append(
                batch,
                AuditEvent.CASE_MISMATCH,
                node=self.agency,
                at=at,
                message_id=message.message_id,
                peer=message.sender,
                family=case["family"],
                detail=f"case {case['case_id']}: {error.message}",
            )
            return
        self._move(batch, case, transition, message.sender, at, message.message_id, reason, date)

    def decide(
        self,
        batch: Batch,
        case_id: str,
        peer: str,
        event: str,
        reason: str,
        date: datetime | None,
        at: datetime,
    ) -> CaseView:
        """A decision recorded on this node (`liandong case decide`)."""
        case = self._load(batch, case_id, peer)
        if case is None:
            raise ExchangeError(Reason.NOT_FOUND, f"no case {case_id} with {peer} on this node")
        transition = self._allowed(case, event, self.agency, reason, date)
        return _case_view(self._move(batch, case, transition, self.agency, at, None, reason, date))

    def _reply_case(
        self, batch: Batch, message: envelope_pb2.Message, peer: str
    ) -> tuple[dict[str, Any], str, str, datetime | None] | None:
        if not message.in_reply_to:
            return None
        case = self._load(batch, message.in_reply_to, peer)
        if case is None:
            # It answers a reply: the case is the one that reply moved.
            case_id = batch.session.scalar(
                select(CASE_EVENTS.c.case_id)
                .where(CASE_EVENTS.c.message_id == message.in_reply_to)
                .limit(1)
            )
            case = None if case_id is None else self._load(batch, case_id, peer)
        if case is None:
            return None  # a reply outside any case this node tracks
        return self._with_event(case, message)

    def _copy_case(
        self, batch: Batch, message: envelope_pb2.Message, at: datetime
    ) -> tuple[dict[str, Any], str, str, datetime | None] | None:
        """This node's copy of a case a co-recipient answers: the procuratorate's copy (抄送)
        of a crime transfer follows the police's filing decisions, sent to both.

        The reply names a case of this node that the sender does not hold with it: either
        this node's copy, and the sender is the addressee proper (a recipient of the opening
        message that holds no copy itself), or the sender is no party of it and the reply is
        recorded as a case mismatch that moves nothing. When the opener sent this node a
        version of its own (redacted, Message.version_of), the reply names the first version,
        which this node never saw: it is followed when the reply also goes to the opener, who
        would see a false one, and the sender is among the version's ``all_recipients``
        (a version without them, from an older sender, cannot tell: not followed).
        """
        refused = False
        for case, co_recipients, by_version in self._named_cases(batch, message):
            if case["peer"] == message.sender:
                continue  # its own case with this node, which it answered without an event
            why = self._not_a_party(case, co_recipients, by_version, message.sender)
            if not why:
                return self._with_event(case, message)
            if not refused:
                refused = True
                # The entry names the sender as its peer, so the sender may read it (Audit
                # service): it says what the sender already knows, nothing of the case.
                log.warning("case_mismatch", peer=message.sender, case=case["case_id"], error=why)
                audit.append(
                    batch,
                    AuditEvent.CASE_MISMATCH,
                    node=self.agency,
                    at=at,
                    message_id=message.message_id,
                    peer=message.sender,
                    detail=f"reply to {message.in_reply_to}: {message.sender} is no party of "
                    "the case it names; nothing moved",
                )
        return None

    def _named_cases(
        self, batch: Batch, message: envelope_pb2.Message
    ) -> list[tuple[dict[str, Any], frozenset[str], bool]]:
        """The cases of this node that ``message.in_reply_to`` names — by their id, or as the
        first version of the message that opened them — each with the agencies the opening
        message went to (all its versions' where known), and whether found by version."""
        named = message.in_reply_to
        found: list[tuple[dict[str, Any], frozenset[str], bool]] = []
        rows = batch.session.execute(
            select(CASES.c.case_id, CASES.c.peer, MESSAGES.c.envelope)
            .outerjoin(
                MESSAGES,
                and_(MESSAGES.c.message_id == CASES.c.case_id, MESSAGES.c.direction == "in"),
            )
            .where(CASES.c.case_id == named)
            .limit(64)
        ).all()
        by_version = not rows
        if by_version:
            # In the query, not after it: versions other peers claim for the same id must not
            # hide the real one. Only versions from an opener the reply also goes to.
            rows = batch.session.execute(
                select(CASES.c.case_id, CASES.c.peer, MESSAGES.c.envelope)
                .join(MESSAGES, MESSAGES.c.message_id == CASES.c.case_id)
                .where(
                    MESSAGES.c.version_of == named,
                    MESSAGES.c.direction == "in",
                    CASES.c.role == Role.ADDRESSEE.value,
                    CASES.c.peer.in_(list(message.recipients)),
                    CASES.c.peer != message.sender,
                )
                .limit(32)
            ).all()
        for row in rows:
            case = self._load(batch, row.case_id, row.peer)
            if case is None:
                continue
            co_recipients: frozenset[str] = frozenset()
            if row.envelope is not None:
                opening = envelope_pb2.Message.FromString(
                    envelope_pb2.Envelope.FromString(row.envelope).payload
                )
                listed = list(opening.all_recipients)
                if not by_version:
                    listed += opening.recipients
                co_recipients = frozenset(listed)
            found.append((case, co_recipients, by_version))
        return found

    def _not_a_party(
        self, case: dict[str, Any], co_recipients: frozenset[str], by_version: bool, sender: str
    ) -> str:
        """Why ``sender`` may not move this node's ``case`` on a copy's terms ("" if it may)."""
        if Role(case["role"]) is Role.OPENER:
            return f"this node opened it with {case['peer']}, who alone answers it"
        holder = COPY_HOLDERS.get(case["family"])
        if holder is None or agency_kind(self.agency) != holder:
            return f"this node is its addressee; only {case['peer']} moves it with this node"
        if agency_kind(sender) == holder:
            return f"a {holder} holds a copy too; the addressee proper decides"
        if sender not in co_recipients:
            if by_version and not co_recipients:
                return (
                    "the version this node got does not list all recipients (all_recipients), "
                    "so no reply to the first version can be followed"
                )
            return "not a recipient of the opening message"
        return ""

    def _with_event(
        self, case: dict[str, Any], message: envelope_pb2.Message
    ) -> tuple[dict[str, Any], str, str, datetime | None] | None:
        body = message.WhichOneof("body") or ""
        if body == FEEDBACK:
            event = message.feedback.status
            reason = message.feedback.text
            date = (
                message.feedback.due.ToDatetime(UTC) if message.feedback.HasField("due") else None
            )
        else:
            event = LIFECYCLES[case["family"]].body_events.get(body, "")
            reason, date = "", None
        if not event:
            return None
        return case, event, reason, date

    def _allowed(
        self,
        case: dict[str, Any],
        event: str,
        actor: str,
        reason: str,
        date: datetime | None,
        *,
        follow: bool = False,
        as_role: Role | None = None,
    ) -> Transition:
        lifecycle = LIFECYCLES[case["family"]]
        role = Role(case["role"]) if actor == self.agency else Role(case["role"]).other
        role = as_role or role
        candidates = lifecycle.find(event)
        what = f"the {lifecycle.title} {case['case_id']} with {case['peer']}"
        if not candidates:
            raise ExchangeError(
                Reason.INVALID,
                f"{shown(event, 64)} is not an event of a {lifecycle.title}; its events are: "
                + ", ".join(lifecycle.events),
            )
        for transition in candidates:
            if case["state"] not in transition.sources and not follow:
                continue
            if transition.by is not role:
                raise ExchangeError(
                    Reason.PERMISSION_DENIED,
                    f"'{event}' on {what} is for the {transition.by.value} to record; "
                    f"{actor} is the {role.value}",
                )
            if transition.needs_reason and not reason.strip():
                raise ExchangeError(Reason.INVALID, f"'{event}' on {what} needs a reason")
            if transition.needs_date and date is None:
                raise ExchangeError(Reason.INVALID, f"'{event}' on {what} needs the new date")
            return transition
        allowed = sorted({s for t in candidates for s in t.sources})
        raise ExchangeError(
            Reason.PRECONDITION,
            f"{what} is '{case['state']}'; '{event}' needs it to be "
            + " or ".join(f"'{s}'" for s in allowed),
        )

    # -- moving a case -------------------------------------------------------------------

    def _move(
        self,
        batch: Batch,
        case: dict[str, Any],
        transition: Transition,
        actor: str,
        at: datetime,
        message_id: str | None,
        reason: str,
        date: datetime | None,
    ) -> dict[str, Any]:
        before = case["state"]
        attrs = json.loads(case["attrs"])
        if date is not None:
            attrs["due"] = format_time(date)
        moved = dict(case, state=transition.target, updated_at=at, attrs=json.dumps(attrs))
        key = {"case_id": case["case_id"], "peer": case["peer"]}
        batch.update(
            CASES, key, {"state": moved["state"], "updated_at": at, "attrs": moved["attrs"]}
        )
        batch.remember(("case", case["case_id"], case["peer"]), moved)
        batch.insert(
            CASE_EVENTS,
            {
                **key,
                "event": transition.event,
                "from_state": before,
                "to_state": transition.target,
                "actor": actor,
                "message_id": message_id,
                "reason": reason,
                "at": at,
            },
        )
        if transition.event != RECEIVED:  # the receipt's own entry records that one
            detail = (
                f"case {case['case_id']} ({case['family']}): {before} -> {transition.target} "
                f"by {transition.event}"
            )
            if reason:
                detail += f"; reason: {reason}"
            if date is not None:
                detail += f"; new date {format_time(date)}"
            audit.append(
                batch,
                AuditEvent.CASE_TRANSITION,
                node=self.agency,
                at=at,
                message_id=message_id,
                peer=case["peer"],
                family=case["family"],
                detail=detail,
            )
        self._start_clocks(batch, moved, self._clocks(batch, moved), at, closing=True)
        if (
            transition.escalate
            and Role(moved["role"]) is Role.OPENER
            and self.supervisor_for(moved["peer"])
        ):
            # Worth the supervisor's attention at once (e.g. a refused evidence request):
            # a clock already due, which the scheduler escalates on its next pass.
            rule = DeadlineRule(
                f"{case['family']}.{transition.event}",
                case["family"],
                frozenset(),
                0,
                self.deadlines.rules[0].unit,
                transition.by,
            )
            clock = self._clock_row(moved, rule, at, at)
            clock.update(state="overdue", escalate_at=at, next_action_at=at)
            self._put_clock(batch, moved, clock)
        return moved

    def _start_clocks(
        self,
        batch: Batch,
        case: dict[str, Any],
        clocks: dict[str, dict[str, Any]],
        at: datetime,
        *,
        closing: bool = False,
    ) -> None:
        """Close the clocks the new state ends; open the ones it starts."""
        state = case["state"]
        rules = {r.name: r for r in self.deadlines.for_family(case["family"])}
        if closing:
            for name, clock in clocks.items():
                rule = rules.get(name)
                if (
                    clock["state"] not in OPEN_CLOCK_STATES
                    or rule is None
                    or state in rule.while_in
                ):
                    continue
                met = "met" if at <= clock["due_at"] else "met_late"
                self._put_clock(
                    batch, case, dict(clock, state=met, next_action_at=None, closed_at=at)
                )
        attrs = json.loads(case["attrs"])
        for rule in rules.values():
            addressee = self.agency if case["role"] == Role.ADDRESSEE else case["peer"]
            if state not in rule.while_in or not rule.applies(attrs, addressee):
                continue
            existing = clocks.get(rule.name)
            if existing is not None and existing["state"] in OPEN_CLOCK_STATES:
                if "due" in attrs and rule.anchor is Anchor.MESSAGE_DEADLINE:
                    # A delay notice moved the date: the clock starts over toward it.
                    due = self.deadlines.scaled(at, _parse_time(attrs["due"]))
                    self._put_clock(
                        batch, case, self._clock_row(case, rule, existing["started_at"], due)
                    )
                continue
            due = self._due(rule, attrs, at)
            self._put_clock(batch, case, self._clock_row(case, rule, at, due))

    def _due(self, rule: DeadlineRule, attrs: dict[str, Any], at: datetime) -> datetime:
        if rule.anchor is Anchor.MESSAGE_DEADLINE:
            given = attrs.get("due") or attrs.get("deadline")
            if given:
                return self.deadlines.scaled(at, _parse_time(str(given)))
        return self.deadlines.due(rule, at)

    def _clock_row(
        self, case: dict[str, Any], rule: DeadlineRule, start: datetime, due: datetime
    ) -> dict[str, Any]:
        responsible = self.agency if Role(case["role"]) is rule.responsible else case["peer"]
        warn = self.deadlines.warn_at(rule, due)
        return {
            "case_id": case["case_id"],
            "peer": case["peer"],
            "rule": rule.name,
            "responsible": responsible,
            "started_at": start,
            "due_at": due,
            "warn_at": warn,
            # Whether anyone is told is decided when it comes (step): a registry published
            # meanwhile may name a supervisor.
            "escalate_at": self.deadlines.escalate_at(due),
            "state": "open",
            "next_action_at": min(warn, due),
            "closed_at": None,
        }

    def _put_clock(self, batch: Batch, case: dict[str, Any], clock: dict[str, Any]) -> None:
        clocks = self._clocks(batch, case)
        key = {"case_id": clock["case_id"], "peer": clock["peer"], "rule": clock["rule"]}
        if clock["rule"] in clocks:
            values = {k: v for k, v in clock.items() if k not in key}
            batch.update(CLOCKS, key, values)
        else:
            batch.insert(CLOCKS, clock)
        batch.remember(("clocks", case["case_id"], case["peer"]), {**clocks, clock["rule"]: clock})

    def _clocks(self, batch: Batch, case: dict[str, Any]) -> dict[str, dict[str, Any]]:
        key = ("clocks", case["case_id"], case["peer"])
        known = batch.recall(key)
        if known is None:
            rows = batch.session.execute(
                select(CLOCKS).where(
                    CLOCKS.c.case_id == case["case_id"], CLOCKS.c.peer == case["peer"]
                )
            ).mappings()
            known = {row["rule"]: dict(row) for row in rows}
            batch.remember(key, known)
        return dict(known)

    def _load(self, batch: Batch, case_id: str, peer: str) -> dict[str, Any] | None:
        known = batch.recall(("case", case_id, peer))
        if known is False:
            return None
        if known is not None:
            return dict(known)
        row = (
            batch.session.execute(
                select(CASES).where(CASES.c.case_id == case_id, CASES.c.peer == peer)
            )
            .mappings()
            .first()
        )
        return None if row is None else dict(row)

    def _new_case(
        self,
        message: envelope_pb2.Message,
        peer: str,
        family: str,
        role: Role,
        state: str,
        confidentiality: str,
        attrs: dict[str, Any],
        at: datetime,
    ) -> dict[str, Any]:
        return {
            "case_id": message.message_id,
            "peer": peer,
            "family": family,
            "role": role.value,
            "state": state,
            "title": _title(message),
            "confidentiality": confidentiality,
            "attrs": json.dumps(attrs),
            "opened_at": at,
            "updated_at": at,
        }

    # -- the scheduler -------------------------------------------------------------------

    def due_clocks(self, session: Session, now: datetime, limit: int = 500) -> list[dict[str, Any]]:
        """The clocks whose next step is due: one indexed range read, however many are open."""
        rows = session.execute(
            select(CLOCKS, CASES.c.family, CASES.c.title, CASES.c.confidentiality)
            .join(CASES, and_(CASES.c.case_id == CLOCKS.c.case_id, CASES.c.peer == CLOCKS.c.peer))
            .where(CLOCKS.c.next_action_at <= now)
            .order_by(CLOCKS.c.next_action_at)
            .limit(limit)
        ).mappings()
        return [dict(row) for row in rows]

    def step(self, clock: dict[str, Any], now: datetime) -> tuple[dict[str, Any], Reminder | None]:
        """What the scheduler does with a due clock: its new values, and the notice to send."""
        rule_name = clock["rule"]
        rule = self.deadlines.rule(rule_name)
        basis = rule.basis if rule else ""
        what = f"{clock['title'] or clock['family']} ({clock['family']} {clock['case_id']})"
        marking = most_restricted(clock["confidentiality"], "internal")
        if clock["state"] == "open" and now < clock["due_at"]:
            return {"state": "due_soon", "next_action_at": clock["due_at"]}, None
        if clock["state"] in ("open", "due_soon"):
            # Only the waiting party reminds and escalates; on the responsible agency's own
            # node the clock just shows as overdue to its liaison officer.
            mine = clock["responsible"] == self.agency
            escalate = None if mine else clock["escalate_at"]
            values = {"state": "overdue", "next_action_at": escalate}
            reminder = None
            if not mine:
                reminder = Reminder(
                    "reminder",
                    clock["responsible"],
                    clock["case_id"],
                    clock["peer"],
                    rule_name,
                    f"催办 reminder: {what}",
                    f"The deadline '{rule_name}' passed at {format_time(clock['due_at'])}. {basis}",
                    marking,
                )
            return values, reminder
        # Looked up now, not when the clock started: a registry published since then names
        # the supervisor in force.
        supervisor = self.supervisor_for(clock["responsible"])
        if not supervisor:  # nobody to escalate to: it stays overdue
            return {"state": "overdue", "next_action_at": None}, None
        values = {"state": "escalated", "next_action_at": None}
        return values, Reminder(
            "escalation",
            supervisor,
            clock["case_id"],
            clock["peer"],
            rule_name,
            f"督办 escalation: {what}",
            f"{clock['responsible']} did not act on '{rule_name}' by "
            f"{format_time(clock['due_at'])} and was reminded; the grace period has ended. {basis}",
            marking,
        )

    def record_step(
        self,
        batch: Batch,
        clock: dict[str, Any],
        values: dict[str, Any],
        at: datetime,
        sent: str | None,
    ) -> None:
        # Only if no other unit moved it meanwhile (a reply that closed it wins), as this
        # batch sees it: an earlier unit's writes are only queued, not in the session yet.
        current = self._clocks(batch, clock).get(clock["rule"])
        if current is None or current["state"] != clock["state"]:
            return
        self._put_clock(batch, clock, {**current, **values})
        if values["state"] != clock["state"] and values["state"] in ("overdue", "escalated"):
            event = (
                AuditEvent.DEADLINE_OVERDUE
                if values["state"] == "overdue"
                else AuditEvent.DEADLINE_ESCALATED
            )
            detail = (
                f"case {clock['case_id']} ({clock['family']}), rule {clock['rule']}, "
                f"responsible {clock['responsible']}, due {format_time(clock['due_at'])}"
            )
            audit.append(
                batch,
                event,
                node=self.agency,
                at=at,
                message_id=sent,
                peer=clock["peer"],
                family=clock["family"],
                detail=detail,
            )

    # -- reading -------------------------------------------------------------------------

    def cases(
        self, session: Session, *, case_id: str = "", state: str = "", limit: int = 200
    ) -> list[CaseView]:
        query = select(CASES).order_by(CASES.c.updated_at.desc()).limit(limit)
        if case_id:
            query = query.where(CASES.c.case_id == case_id)
        if state:
            query = query.where(CASES.c.state == state)
        return [_case_view(dict(row)) for row in session.execute(query).mappings()]

    def history(self, session: Session, case_id: str) -> list[dict[str, Any]]:
        rows = session.execute(
            select(CASE_EVENTS).where(CASE_EVENTS.c.case_id == case_id).order_by(CASE_EVENTS.c.id)
        ).mappings()
        return [dict(row) for row in rows]

    def open_clocks(
        self, session: Session, *, overdue_only: bool = False, agency: str = "", limit: int = 500
    ) -> list[ClockView]:
        """Open clocks, most urgent (earliest due) first."""
        states: Sequence[str] = ("overdue", "escalated") if overdue_only else OPEN_CLOCK_STATES
        query = (
            select(CLOCKS, CASES.c.family, CASES.c.title, CASES.c.confidentiality)
            .join(CASES, and_(CASES.c.case_id == CLOCKS.c.case_id, CASES.c.peer == CLOCKS.c.peer))
            .where(CLOCKS.c.state.in_(states))
            .order_by(CLOCKS.c.due_at)
            .limit(limit)
        )
        if agency:
            query = query.where(CLOCKS.c.responsible == agency)
        return [
            ClockView(
                row["case_id"],
                row["peer"],
                row["family"],
                row["title"],
                row["rule"],
                row["responsible"],
                row["due_at"],
                row["state"],
                row["confidentiality"],
            )
            for row in session.execute(query).mappings()
        ]


def _case_view(row: dict[str, Any]) -> CaseView:
    return CaseView(
        row["case_id"],
        row["peer"],
        row["family"],
        row["role"],
        row["state"],
        row["title"],
        row["confidentiality"],
        row["opened_at"],
        row["updated_at"],
    )
