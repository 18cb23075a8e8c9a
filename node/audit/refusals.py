"""How many refusals of one kind, from one caller, get an audit entry of their own.

Every refusal is evidence and is accounted for in the audit log, but a caller can make
thousands a second (a stranger's certificate refused at the door costs it nothing), and
audit entries are kept for good. So each (event, caller, reason) has a bucket: up to
`burst` refusals get an entry each, refilled at `per_second`; beyond that they are counted,
and the count is written as one entry — "counted: N refusals …; the last: …" — when the
node next flushes (every few seconds), so the log grows with the number of kinds of
refusal, not with the rate of the attack.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from node.audit.log import AuditEvent, format_time
from node.exchange.errors import cut

BURST = 100
PER_SECOND = 10.0
FLUSH_SECONDS = 5.0  # how often the node writes what was counted (node.runtime)
# The detail of a summary entry; auditors (and tests) read N from it.
COUNTED = re.compile(r"^counted: (\d+) refusals ")


@dataclass
class _Counted:
    count: int
    first: datetime
    last: datetime
    detail: str


@dataclass(frozen=True)
class Summary:
    """One entry standing for `count` refusals that got no entry of their own."""

    event: AuditEvent
    peer: str
    count: int
    detail: str


class RefusalBudget:
    def __init__(
        self,
        burst: int = BURST,
        per_second: float = PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.per_second = per_second
        self.clock = clock
        self._tokens: dict[tuple[AuditEvent, str, str], tuple[float, float]] = {}
        self._counted: dict[tuple[AuditEvent, str, str], _Counted] = {}
        # Spent from the event loop and from worker threads alike.
        self._lock = threading.Lock()

    def spend(self, event: AuditEvent, peer: str, reason: str, detail: str) -> bool:
        """True: write this refusal's entry now. False: it was counted, for a summary."""
        key = (event, peer, reason)
        now = self.clock()
        with self._lock:
            tokens, since = self._tokens.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - since) * self.per_second)
            if tokens >= 1.0:
                self._tokens[key] = (tokens - 1.0, now)
                return True
            self._tokens[key] = (tokens, now)
            moment = datetime.now(UTC)
            counted = self._counted.get(key)
            if counted is None:
                self._counted[key] = _Counted(1, moment, moment, detail)
            else:
                counted.count += 1
                counted.last = moment
                counted.detail = detail
            return False

    def take_summaries(self) -> list[Summary]:
        """What was counted since the last call, one summary per kind; the counts restart."""
        with self._lock:
            counted, self._counted = self._counted, {}
            # Buckets full again are forgotten: a caller seen once is not kept for ever.
            now = self.clock()
            self._tokens = {
                key: (tokens, since)
                for key, (tokens, since) in self._tokens.items()
                if tokens + (now - since) * self.per_second < self.burst
            }
        return [
            Summary(
                event,
                peer,
                c.count,
                f"counted: {c.count} refusals of this kind ({reason}) from "
                f"{format_time(c.first)} to {format_time(c.last)}, over {self.per_second:g} a "
                f"second; the last: {cut(c.detail, 768)}",
            )
            for (event, peer, reason), c in counted.items()
        ]
