"""Refusals past a caller's audit budget are counted, and the count written as one entry
(node.audit.refusals)."""

from __future__ import annotations

from node.audit.log import AuditEvent
from node.audit.refusals import COUNTED, RefusalBudget

REJECTED, QUERY = AuditEvent.REJECTED, AuditEvent.AUDIT_QUERY


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_gets_entries_then_refusals_are_counted_per_kind() -> None:
    clock = Clock()
    budget = RefusalBudget(burst=3, per_second=1.0, clock=clock)
    spent = [budget.spend(REJECTED, "unknown", "unauthenticated", f"n{n}") for n in range(10)]
    assert spent == [True] * 3 + [False] * 7
    # Another kind, or another caller, has a budget of its own.
    assert budget.spend(REJECTED, "unknown", "invalid", "x")
    assert budget.spend(QUERY, "unknown", "unauthenticated", "x")
    assert budget.spend(REJECTED, "140400/police", "unauthenticated", "x")
    [summary] = budget.take_summaries()
    assert (summary.event, summary.peer, summary.count) == (REJECTED, "unknown", 7)
    counted = COUNTED.match(summary.detail)
    assert counted is not None and int(counted.group(1)) == 7
    assert summary.detail.endswith("the last: n9")
    assert budget.take_summaries() == []  # the count restarts


def test_the_budget_refills_with_time() -> None:
    clock = Clock()
    budget = RefusalBudget(burst=2, per_second=2.0, clock=clock)
    assert [budget.spend(REJECTED, "p", "r", "") for _ in range(3)] == [True, True, False]
    clock.now += 0.5  # one refusal's worth
    assert [budget.spend(REJECTED, "p", "r", "") for _ in range(2)] == [True, False]
    clock.now += 60
    assert [budget.spend(REJECTED, "p", "r", "") for _ in range(3)] == [True, True, False]


def test_a_long_detail_is_cut_in_the_summary() -> None:
    budget = RefusalBudget(burst=0, per_second=0.0)
    budget.spend(REJECTED, "p", "r", "x" * 100_000)
    [summary] = budget.take_summaries()
    assert len(summary.detail.encode()) < 1024
