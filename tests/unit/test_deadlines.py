"""Deadline rules as data: the calendar, the legal defaults, overrides and their errors, and
the lifecycles' shape."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from node.config import ConfigError, load_config, render_config
from node.exchange.deadlines import (
    LEGAL_DEFAULTS,
    Deadlines,
    RuleError,
    Unit,
    WorkCalendar,
    add_months,
    override_rule,
)
from node.exchange.families import FAMILY_BODIES
from node.exchange.lifecycles import LIFECYCLES, RECEIVED, SENT, Role

FRIDAY = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


def test_working_days_skip_weekends_and_holidays_and_count_make_up_days() -> None:
    plain = WorkCalendar()
    assert plain.add_working_days(FRIDAY, 1) == FRIDAY + timedelta(days=3)  # Monday
    assert plain.add_working_days(FRIDAY, 5) == FRIDAY + timedelta(days=7)
    holiday = WorkCalendar(holidays=frozenset({date(2026, 11, 23)}))
    assert holiday.add_working_days(FRIDAY, 1) == FRIDAY + timedelta(days=4)  # Tuesday
    make_up = WorkCalendar(workdays=frozenset({date(2026, 11, 21)}))  # a working Saturday
    assert make_up.add_working_days(FRIDAY, 1) == FRIDAY + timedelta(days=1)


def test_months_keep_the_day_or_take_the_last_one() -> None:
    assert add_months(datetime(2026, 1, 31, tzinfo=UTC), 1) == datetime(2026, 2, 28, tzinfo=UTC)
    assert add_months(datetime(2026, 11, 15, tzinfo=UTC), 2) == datetime(2027, 1, 15, tzinfo=UTC)


def test_the_legal_defaults() -> None:
    deadlines = Deadlines()
    by_name = {r.name: r for r in LEGAL_DEFAULTS}
    start = datetime(2026, 3, 1, tzinfo=UTC)
    assert deadlines.due(by_name["crime_transfer.filing"], start) == start + timedelta(days=3)
    assert deadlines.due(by_name["clue.feedback"], start) == datetime(2026, 4, 1, tzinfo=UTC)
    assert deadlines.due(by_name["recommendation.reply"], start) == datetime(2026, 5, 1, tzinfo=UTC)
    assert deadlines.due(by_name["recommendation.reply_urgent"], start) == start + timedelta(15)
    urgent, normal = by_name["recommendation.reply_urgent"], by_name["recommendation.reply"]
    assert urgent.applies({"urgent": True}) and not normal.applies({"urgent": True})
    assert normal.applies({}) and not urgent.applies({})
    filing = by_name["crime_transfer.filing"]
    assert filing.applies({}, "140400/police") and not filing.applies({}, "140400/procuratorate")
    # The simulated clock divides durations, the warning lead included.
    fast = Deadlines(speed=86400.0)
    due = fast.due(filing, start)
    assert due == start + timedelta(seconds=3)
    assert fast.warn_at(filing, due) == due - timedelta(seconds=1)


def test_overrides_replace_by_name_and_name_the_bad_key() -> None:
    base = Deadlines()
    rule = override_rule(
        base.rule("clue.feedback"), "clue.feedback", {"amount": 20, "unit": "working_days"}
    )
    assert (rule.amount, rule.unit, rule.while_in) == (
        20,
        Unit.WORKING_DAYS,
        base.rule("clue.feedback").while_in,
    )  # type: ignore[union-attr]
    assert base.with_overrides([rule]).rule("clue.feedback") == rule
    with pytest.raises(RuleError, match=r"'clue.feedback': unknown key\(s\) \['amont'\]"):
        override_rule(base.rule("clue.feedback"), "clue.feedback", {"amont": 20})
    with pytest.raises(RuleError, match="amount must be a positive whole number"):
        override_rule(base.rule("clue.feedback"), "clue.feedback", {"amount": 0})
    with pytest.raises(RuleError, match="'fortnights' is not a valid Unit"):
        override_rule(base.rule("clue.feedback"), "clue.feedback", {"unit": "fortnights"})
    with pytest.raises(RuleError, match="not a built-in rule: give family, while_in"):
        override_rule(None, "local.rule", {"amount": 3})
    own = override_rule(
        None,
        "local.rule",
        {"family": "clue", "while_in": ["accepted"], "amount": 3, "unit": "calendar_days"},
    )
    assert own.responsible is Role.ADDRESSEE


def test_deadlines_config_is_read_and_checked(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    base = render_config(agency="140400/ecology", listen="127.0.0.1:7443")
    config.write_text(
        base
        + '\n[deadlines]\nsupervisor = "140400/discipline"\nholidays = ["2026-10-01"]\n'
        + '[deadlines.rules."clue.feedback"]\namount = 20\nunit = "working_days"\n',
        encoding="utf-8",
    )
    loaded = load_config(config).deadlines
    assert loaded.supervisor == "140400/discipline"
    assert loaded.calendar.holidays == frozenset({date(2026, 10, 1)})
    assert loaded.rule("clue.feedback").amount == 20  # type: ignore[union-attr]
    for extra, error in (
        ('\n[deadlines]\nsupervisor = "nobody"\n', "deadlines.supervisor"),
        ('\n[deadlines]\nholidays = ["tomorrow"]\n', "deadlines.holidays"),
        ("\n[deadlines]\nspeed = 0\n", "deadlines.speed' must be greater than 0"),
        ("\n[deadlines]\nsped = 2\n", "unknown key 'deadlines.sped'"),
        ('\n[deadlines.rules."clue.feedback"]\nunit = "weeks"\n', "deadline rule 'clue.feedback'"),
    ):
        config.write_text(base + extra, encoding="utf-8")
        with pytest.raises(ConfigError, match=error):
            load_config(config)


@pytest.mark.parametrize("family", sorted(LIFECYCLES))
def test_each_lifecycle_is_connected(family: str) -> None:
    lifecycle = LIFECYCLES[family]
    if lifecycle.opened == (SENT, RECEIVED):  # opened by a message of its own family
        assert family in FAMILY_BODIES
    reachable = set(lifecycle.opened)
    changed = True
    while changed:
        changed = False
        for t in lifecycle.transitions:
            if t.sources & reachable and t.target not in reachable:
                reachable.add(t.target)
                changed = True
    assert set(lifecycle.states) == reachable, "a state no event leads to"
    for final in lifecycle.final:
        assert not any(final in t.sources for t in lifecycle.transitions), final
    for body, event in lifecycle.body_events.items():
        assert body in FAMILY_BODIES["reply"] and lifecycle.find(event)


def test_escalations_go_to_the_registrys_supervisor_else_the_configured_one() -> None:
    from node.exchange.cases import CaseBook

    named = {"140400/ecology": "140400/discipline"}
    book = CaseBook(
        "140400/procuratorate",
        Deadlines(supervisor="140400/government"),
        lambda agency: named.get(agency, ""),
    )
    assert book.supervisor_for("140400/ecology") == "140400/discipline"
    assert book.supervisor_for("140400/police") == "140400/government"
    # A node never escalates to itself, whoever names it.
    named["140400/police"] = "140400/procuratorate"
    assert book.supervisor_for("140400/police") == ""
    assert CaseBook("140400/procuratorate", Deadlines()).supervisor_for("140400/ecology") == ""


def test_a_missed_deadline_with_nobody_to_escalate_to_stays_overdue() -> None:
    from node.exchange.cases import CaseBook

    named: dict[str, str] = {}
    book = CaseBook("140400/procuratorate", Deadlines(), lambda agency: named.get(agency, ""))
    due = datetime(2026, 11, 1, tzinfo=UTC)
    clock = {
        "case_id": "01a20b04-7672-7cf0-a3db-0a822232a913",
        "peer": "140400/ecology",
        "rule": "recommendation.reply",
        "responsible": "140400/ecology",
        "family": "recommendation",
        "title": "检察建议",
        "confidentiality": "internal",
        "state": "overdue",
        "due_at": due,
        "escalate_at": due + timedelta(days=3),
    }
    now = due + timedelta(days=4)
    assert book.step(clock, now) == ({"state": "overdue", "next_action_at": None}, None)
    # A registry published since the clock started names a supervisor: it is used.
    named["140400/ecology"] = "140400/discipline"
    values, notice = book.step(clock, now)
    assert values["state"] == "escalated"
    assert notice is not None and notice.to == "140400/discipline"
    assert notice.confidentiality == "internal"


@pytest.mark.parametrize(
    ("case_marking", "notice_marking"),
    [("public", "internal"), ("internal", "internal"), ("confidential", "confidential")],
)
def test_a_reminder_carries_its_cases_marking_at_least_internal(
    case_marking: str, notice_marking: str
) -> None:
    """The reminder quotes the case's title: a confidential case's reminder is confidential,
    so it reaches no local system that is not cleared for it (002 §五(三))."""
    from node.exchange.cases import CaseBook

    book = CaseBook("140400/procuratorate", Deadlines())
    due = datetime(2026, 11, 1, tzinfo=UTC)
    clock = {
        "case_id": "01a20b04-7672-7cf0-a3db-0a822232a913",
        "peer": "140400/ecology",
        "rule": "recommendation.reply",
        "responsible": "140400/ecology",
        "family": "recommendation",
        "title": "关于某电镀厂的检察建议",
        "confidentiality": case_marking,
        "state": "due_soon",
        "due_at": due,
        "escalate_at": due + timedelta(days=3),
    }
    values, notice = book.step(clock, due + timedelta(hours=1))
    assert values["state"] == "overdue"
    assert notice is not None and notice.kind == "reminder"
    assert notice.confidentiality == notice_marking and "关于某电镀厂" in notice.title


@pytest.mark.parametrize(
    ("now", "quarter"),
    [
        (datetime(2026, 11, 24, 9, tzinfo=UTC), "2026-Q3"),
        (datetime(2026, 10, 1, tzinfo=UTC), "2026-Q3"),
        (datetime(2026, 9, 30, 23, 59, tzinfo=UTC), "2026-Q2"),
        (datetime(2027, 2, 1, tzinfo=UTC), "2026-Q4"),
    ],
)
def test_the_last_finished_quarter_is_the_one_the_sharing_clock_waits_for(
    now: datetime, quarter: str
) -> None:
    from node.exchange.sharing import last_finished_quarter, quarter_end

    assert last_finished_quarter(now) == quarter
    assert quarter_end(quarter) <= now


def test_a_deadline_at_the_end_of_the_calendar_escalates_at_its_due_time() -> None:
    """A peer may date a deadline 9999-12-31; adding the grace must not crash the writer."""
    last = datetime(9999, 12, 31, 12, tzinfo=UTC)
    assert Deadlines().escalate_at(last) == last
    assert Deadlines().escalate_at(datetime(2026, 11, 1, tzinfo=UTC)) > datetime(
        2026, 11, 1, tzinfo=UTC
    )
