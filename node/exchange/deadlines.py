"""Deadlines are data: the rules table, the calendar, and when each clock is due.

A rule says: while a case of `family` is in one of the states `while_in`, the `responsible`
party must act within `amount` `unit`s of `anchor` (the time the case was received, or a date
the message carries). The legal defaults below come from the seeds; a node's config
(``[deadlines.rules."clue.feedback"]``) and plugins (hook ``liandong_deadline_rules``) override
them by name. A clock is opened when a case enters a rule's states and closed, met or met
late, when it leaves them; the scheduler (node.exchange.cases.CaseBook.scan) marks it due
soon, then overdue — sending a signed reminder (催办) to the responsible agency — and, after the
configured grace, sends a signed escalation notice to the supervising agency.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any

from node.exchange.lifecycles import Role
from node.identity import agency_kind


class Unit(StrEnum):
    HOURS = "hours"
    CALENDAR_DAYS = "calendar_days"
    WORKING_DAYS = "working_days"
    MONTHS = "months"


class Anchor(StrEnum):
    RECEIVED = "received"  # when the addressee received the opening message
    MESSAGE_DEADLINE = "message_deadline"  # the opening message's own deadline, else amount
    APPROVED = "approved"  # CrimeTransfer.approved_at: checked once, when it is sent


@dataclass(frozen=True)
class DeadlineRule:
    name: str
    family: str
    while_in: frozenset[str]
    amount: int
    unit: Unit
    responsible: Role
    anchor: Anchor = Anchor.RECEIVED
    warn_before: timedelta = timedelta(days=1)
    condition: str = ""  # "urgent": only when the case is urgent; "!urgent": only when not
    basis: str = ""  # where the rule comes from, for people
    # Only when the addressee is of this kind, e.g. "police" (not the procuratorate's copy).
    addressee_kind: str = ""

    def applies(self, attrs: Mapping[str, Any], addressee: str = "") -> bool:
        if self.addressee_kind and agency_kind(addressee) != self.addressee_kind:
            return False
        if not self.condition:
            return True
        negate = self.condition.startswith("!")
        flag = bool(attrs.get(self.condition.lstrip("!")))
        return flag != negate


def _rule(
    name: str,
    family: str,
    states: str,
    amount: int,
    unit: Unit,
    responsible: Role = Role.ADDRESSEE,
    **extra: Any,
) -> DeadlineRule:
    return DeadlineRule(name, family, frozenset(states.split()), amount, unit, responsible, **extra)


ADDRESSEE, OPENER = Role.ADDRESSEE, Role.OPENER
DAY = timedelta(days=1)

LEGAL_DEFAULTS: tuple[DeadlineRule, ...] = (
    _rule(
        "crime_transfer.filing",
        "crime_transfer",
        "received supplemented",
        3,
        Unit.CALENDAR_DAYS,
        addressee_kind="police",
        basis="环环监〔2017〕17号: the police decide on filing within 3 days of receipt",
    ),
    _rule(
        "crime_transfer.filing_checking",
        "crime_transfer",
        "checking",
        7,
        Unit.CALENDAR_DAYS,
        warn_before=2 * DAY,
        addressee_kind="police",
        basis="when the clue needs checking: 7 days",
    ),
    _rule(
        "crime_transfer.filing_major",
        "crime_transfer",
        "major_complex",
        30,
        Unit.CALENDAR_DAYS,
        warn_before=5 * DAY,
        addressee_kind="police",
        basis="a major, complex case: 30 days",
    ),
    _rule(
        "crime_transfer.transfer_after_approval",
        "crime_transfer",
        "",
        24,
        Unit.HOURS,
        responsible=OPENER,
        anchor=Anchor.APPROVED,
        warn_before=timedelta(hours=6),
        basis="State Council Order 310: the file goes to the police within 24 h of approval",
    ),
    _rule(
        "clue.feedback",
        "clue",
        "received accepted declined forwarded",
        1,
        Unit.MONTHS,
        warn_before=5 * DAY,
        basis="001 §三: the procuratorate reports its handling within one month",
    ),
    _rule(
        "recommendation.reply",
        "recommendation",
        "received rectifying",
        2,
        Unit.MONTHS,
        warn_before=10 * DAY,
        condition="!urgent",
        basis="000 §八: a written reply within two months",
    ),
    _rule(
        "recommendation.reply_urgent",
        "recommendation",
        "received rectifying",
        15,
        Unit.CALENDAR_DAYS,
        warn_before=3 * DAY,
        condition="urgent",
        basis="000 §八: 15 days when the harm is spreading",
    ),
    _rule(
        "evidence_request.results",
        "evidence_request",
        "received accepted in_progress delayed",
        30,
        Unit.CALENDAR_DAYS,
        anchor=Anchor.MESSAGE_DEADLINE,
        warn_before=3 * DAY,
        basis="001 §五: the deadline in the request (30 days when it gives none)",
    ),
    _rule(
        "data_sharing.quarterly",
        "data_sharing",
        "awaited",
        15,
        Unit.CALENDAR_DAYS,
        responsible=OPENER,
        warn_before=5 * DAY,
        basis="001 §七: penalty and monitoring data every quarter; 15 days after it ends",
    ),
)


@dataclass(frozen=True)
class WorkCalendar:
    """Working days: Monday to Friday, less public holidays, plus make-up working days (调休)."""

    holidays: frozenset[date] = frozenset()
    workdays: frozenset[date] = frozenset()

    def is_working_day(self, day: date) -> bool:
        if day in self.workdays:
            return True
        return day.weekday() < 5 and day not in self.holidays

    def add_working_days(self, start: datetime, days: int) -> datetime:
        """The same time of day, `days` working days later (the first day is not counted)."""
        moment = start
        left = days
        while left > 0:
            moment += DAY
            if self.is_working_day(moment.date()):
                left -= 1
        return moment


def add_months(moment: datetime, months: int) -> datetime:
    month = moment.month - 1 + months
    year = moment.year + month // 12
    month = month % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


@dataclass(frozen=True)
class Deadlines:
    """The rules in force on this node, and how time is counted."""

    rules: tuple[DeadlineRule, ...] = LEGAL_DEFAULTS
    calendar: WorkCalendar = field(default_factory=WorkCalendar)
    escalation_grace: timedelta = 3 * DAY
    # The agency escalations go to when the registry names no supervisor; "" = none.
    supervisor: str = ""
    # Simulated time (`liandong demo --speed N`): every duration is N times shorter.
    speed: float = 1.0
    # Rules the node's config sets: plugins do not override them.
    configured: frozenset[str] = frozenset()
    # Agencies that owe this node their data every quarter (rule "data_sharing.quarterly").
    sharing_from: tuple[str, ...] = ()

    def for_family(self, family: str) -> list[DeadlineRule]:
        return [r for r in self.rules if r.family == family]

    def rule(self, name: str) -> DeadlineRule | None:
        return next((r for r in self.rules if r.name == name), None)

    def due(self, rule: DeadlineRule, anchor: datetime) -> datetime:
        if rule.unit is Unit.HOURS:
            natural = anchor + timedelta(hours=rule.amount)
        elif rule.unit is Unit.CALENDAR_DAYS:
            natural = anchor + rule.amount * DAY
        elif rule.unit is Unit.WORKING_DAYS:
            natural = self.calendar.add_working_days(anchor, rule.amount)
        else:
            natural = add_months(anchor, rule.amount)
        return self.scaled(anchor, natural)

    def scaled(self, anchor: datetime, natural: datetime) -> datetime:
        return anchor + (natural - anchor) / self.speed

    def warn_at(self, rule: DeadlineRule, due: datetime) -> datetime:
        return due - rule.warn_before / self.speed

    def escalate_at(self, due: datetime) -> datetime:
        """When a missed deadline is escalated, if there is anyone to escalate it to.
        A peer may date a deadline up to 9999-12-31: past the calendar's end, at the due time."""
        try:
            return due + self.escalation_grace / self.speed
        except OverflowError:
            return due

    def with_plugin_rules(self, rules: Iterable[DeadlineRule]) -> Deadlines:
        return self.with_overrides(r for r in rules if r.name not in self.configured)

    def with_overrides(self, overrides: Iterable[DeadlineRule]) -> Deadlines:
        by_name = {r.name: r for r in self.rules}
        for rule in overrides:
            by_name[rule.name] = rule
        return replace(self, rules=tuple(by_name.values()))


class RuleError(ValueError):
    """A rule override that cannot be used; str() names the rule and the key."""


def override_rule(base: DeadlineRule | None, name: str, values: Mapping[str, Any]) -> DeadlineRule:
    """A rule from config values (amount, unit, warn_before_hours, while_in, family,
    responsible, condition) laid over the rule of that name, if there is one."""
    known = {
        "amount",
        "unit",
        "warn_before_hours",
        "while_in",
        "family",
        "responsible",
        "condition",
        "anchor",
    }
    unknown = set(values) - known
    if unknown:
        raise RuleError(
            f"deadline rule '{name}': unknown key(s) {sorted(unknown)}; use {sorted(known)}"
        )
    if base is None and not {"family", "while_in", "amount", "unit"} <= set(values):
        raise RuleError(
            f"deadline rule '{name}' is not a built-in rule: give family, while_in, amount and unit"
        )
    rule = base or DeadlineRule(name, "", frozenset(), 0, Unit.CALENDAR_DAYS, Role.ADDRESSEE)
    changes: dict[str, Any] = {}
    try:
        if "amount" in values:
            amount = values["amount"]
            if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
                raise RuleError(f"deadline rule '{name}': amount must be a positive whole number")
            changes["amount"] = amount
        if "unit" in values:
            changes["unit"] = Unit(values["unit"])
        if "warn_before_hours" in values:
            changes["warn_before"] = timedelta(hours=float(values["warn_before_hours"]))
        if "while_in" in values:
            states = values["while_in"]
            if not isinstance(states, list) or not all(isinstance(s, str) for s in states):
                raise RuleError(f"deadline rule '{name}': while_in must be a list of states")
            changes["while_in"] = frozenset(states)
        if "family" in values:
            changes["family"] = str(values["family"])
        if "responsible" in values:
            changes["responsible"] = Role(values["responsible"])
        if "condition" in values:
            changes["condition"] = str(values["condition"])
        if "anchor" in values:
            changes["anchor"] = Anchor(values["anchor"])
    except ValueError as error:
        if isinstance(error, RuleError):
            raise
        raise RuleError(f"deadline rule '{name}': {error}") from None
    return replace(rule, name=name, **changes)
