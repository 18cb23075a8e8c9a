"""What the domain needs to know about this node: who it is, its key, its trust."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from node.audit.refusals import RefusalBudget
from node.config import Limits
from node.exchange.cases import CaseBook
from node.exchange.deadlines import Deadlines
from node.exchange.errors import ExchangeError, Reason
from node.exchange.thresholds import LEGAL_THRESHOLDS, Threshold
from node.federation import Registry
from node.identity import SigningKey


@dataclass
class NodeContext:
    agency: str
    signing_key: SigningKey
    registry: Registry
    registry_grace: timedelta
    limits: Limits
    deadlines: Deadlines = field(default_factory=Deadlines)
    thresholds: tuple[Threshold, ...] = LEGAL_THRESHOLDS  # for 应移未移 (node.exchange.supervision)
    # Which refusals get an audit entry each, and which are counted (node.audit.refusals).
    refusals: RefusalBudget = field(default_factory=RefusalBudget)

    def __post_init__(self) -> None:
        # The lifecycles and clocks of this node's cases, moved in the writer's units.
        self.cases = CaseBook(self.agency, self.deadlines, self._supervisor_of)

    def _supervisor_of(self, agency: str) -> str:
        # The registry in force when asked: a newly published one applies at once.
        return self.registry.supervisor_of(agency)

    def usable_registry(self, now: datetime) -> Registry:
        """The registry, unless it has expired past the grace period (fail closed)."""
        if now > self.registry.expires_at + self.registry_grace:
            raise ExchangeError(
                Reason.PRECONDITION,
                f"federation registry serial {self.registry.serial} expired at "
                f"{self.registry.expires_at.isoformat()}; the node refuses exchanges until the "
                "operator publishes a newer registry",
            )
        return self.registry
