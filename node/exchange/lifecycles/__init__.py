"""Case lifecycles: one explicit state machine per exchange family, as data.

A *case* is what one opening message (a clue, a crime transfer, an evidence request, a
recommendation, a notice) starts between its sender (the *opener*) and one recipient (the
*addressee*); a message to three agencies opens three cases with the same id, one per
recipient, each with its own state. Every transition is caused by a signed message (the
receipt, a feedback, a reply) or by a decision recorded on the node (`liandong case decide`),
is allowed only from the states listed, only to the role listed, and is written to the audit
log (node.exchange.cases applies them).

Each family's machine is its own module here; `LIFECYCLES` maps the family to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    OPENER = "opener"  # sent the opening message
    ADDRESSEE = "addressee"  # received it

    @property
    def other(self) -> Role:
        return Role.ADDRESSEE if self is Role.OPENER else Role.OPENER


# Events every lifecycle shares: the opening message stored on either side, and the
# addressee's signed receipt stored on the opener's side.
SENT = "sent"
RECEIVED = "received"


@dataclass(frozen=True)
class Transition:
    event: str
    sources: frozenset[str]
    target: str
    by: Role
    needs_reason: bool = False
    needs_date: bool = False  # e.g. a delay notice gives the new date
    escalate: bool = False  # worth telling the supervising agency at once (e.g. a refusal)
    label: str = ""  # the Chinese term, for people


@dataclass(frozen=True)
class Lifecycle:
    family: str
    title: str
    transitions: tuple[Transition, ...]
    final: frozenset[str] = field(default_factory=frozenset)
    # Body types whose messages are an event of this lifecycle (a reply without a status).
    body_events: dict[str, str] = field(default_factory=dict)
    # The states a case starts in: "sent" and "received" for one an opening message starts.
    opened: tuple[str, ...] = (SENT, RECEIVED)

    @property
    def states(self) -> list[str]:
        seen: dict[str, None] = dict.fromkeys(self.opened)
        for t in self.transitions:
            seen.update(dict.fromkeys(sorted(t.sources)))
            seen[t.target] = None
        return list(seen)

    @property
    def events(self) -> list[str]:
        return list(dict.fromkeys(t.event for t in self.transitions))

    def find(self, event: str) -> list[Transition]:
        return [t for t in self.transitions if t.event == event]


def transition(
    event: str,
    sources: str,
    target: str,
    by: Role,
    label: str = "",
    *,
    needs_reason: bool = False,
    needs_date: bool = False,
    escalate: bool = False,
) -> Transition:
    """`sources` is space-separated, e.g. "received supplemented"."""
    return Transition(
        event,
        frozenset(sources.split()),
        target,
        by,
        needs_reason=needs_reason,
        needs_date=needs_date,
        escalate=escalate,
        label=label,
    )


RECEIPT = transition(RECEIVED, SENT, RECEIVED, Role.ADDRESSEE, "回执")


def _load() -> dict[str, Lifecycle]:
    from node.exchange.lifecycles import (
        clue,
        crime_transfer,
        data_sharing,
        evidence_request,
        notice,
        recommendation,
    )

    machines = (
        clue.LIFECYCLE,
        crime_transfer.LIFECYCLE,
        data_sharing.LIFECYCLE,
        evidence_request.LIFECYCLE,
        notice.LIFECYCLE,
        recommendation.LIFECYCLE,
    )
    return {m.family: m for m in machines}


LIFECYCLES: dict[str, Lifecycle] = _load()
