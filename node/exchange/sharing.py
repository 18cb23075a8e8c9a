"""Quarterly data sharing (信息共享, 001 §七): the penalty records an agency shares with the
procuratorate, as a JSON file attached to a data-sharing notice.

One module writes and reads the format, so the bureau's plugin and the procuratorate's
应移未移 check cannot drift apart::

    {"format": "liandong.penalty-records/1", "agency": "140400/ecology",
     "quarter": "2026-Q3", "records": [{"record_id": ..., "decided_on": ..., ...}, ...]}
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any

PENALTY_RECORDS_FORMAT = "liandong.penalty-records/1"
# e.g. 2026-Q3; this century only, so a peer's case_ref can never name an impossible date.
QUARTER = re.compile(r"20\d\d-Q[1-4]\Z")


def quarter_of(day: date) -> str:
    return f"{day.year}-Q{(day.month - 1) // 3 + 1}"


def quarter_end(quarter: str) -> datetime:
    """The first moment after ``quarter`` (``2026-Q3`` -> 2026-10-01T00:00Z)."""
    year, q = int(quarter[:4]), int(quarter[-1])
    return datetime(year + (q == 4), 1 if q == 4 else 3 * q + 1, 1, tzinfo=UTC)


def last_finished_quarter(now: datetime) -> str:
    """The latest quarter that is over at ``now`` (UTC)."""
    day = now.astimezone(UTC).date()
    year, q = day.year, (day.month - 1) // 3 + 1
    return f"{year - 1}-Q4" if q == 1 else f"{year}-Q{q - 1}"


class SharedDataError(ValueError):
    """A shared data file that cannot be read; the message says where."""


def penalty_document(
    agency: str, quarter: str, records: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    return {
        "format": PENALTY_RECORDS_FORMAT,
        "agency": agency,
        "quarter": quarter,
        "records": sorted((dict(r) for r in records), key=lambda r: str(r["record_id"])),
    }


def read_penalty_document(data: bytes) -> tuple[str, list[dict[str, Any]]] | None:
    """(quarter, records) of a penalty-records file; ``None`` for a file of another kind.

    :raises SharedDataError: it claims the format but does not hold it.
    """
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, a 5000-digit number...
        if PENALTY_RECORDS_FORMAT.encode() in data[:4096]:
            raise SharedDataError(f"not valid JSON: {str(error)[:200]}") from None
        return None  # some other file beside the data (a cover letter)
    if not isinstance(document, dict) or document.get("format") != PENALTY_RECORDS_FORMAT:
        return None
    records = document.get("records")
    if not isinstance(records, list):
        raise SharedDataError("'records' is not a list")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not str(record.get("record_id") or "").strip():
            raise SharedDataError(f"records[{i}] has no record_id")
    return str(document.get("quarter", "")), records
