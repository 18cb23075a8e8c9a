"""The ecology plugin's pieces that a crash or a bad record could break: the quarterly ledger,
the leader's decision, the sharing of a quarter and its addenda."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from node.exchange.sharing import SharedDataError, read_penalty_document
from node.plugin_api import Draft
from plugins import ecology
from plugins.sqlsource import RowError
from tests.fakes import FakeNodeAPI

AFTER_Q3 = datetime(2026, 10, 2, tzinfo=UTC)


class FakeAPI(FakeNodeAPI):
    def __init__(self, data_dir: Path, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(data_dir, agency="140400/ecology", plugin="ecology", config=config)

    @property
    def drafts(self) -> list[Draft]:
        return self.submitted


def record(n: int, **fields: Any) -> dict[str, Any]:
    return {
        "record_id": f"罚{n}号",
        "decided_on": "2026-08-0" + str(n),
        "party": f"公司{n}",
        **fields,
    }


def test_a_torn_ledger_line_is_skipped_and_the_next_record_starts_a_new_line(
    tmp_path: Path,
) -> None:
    ledger = ecology.Ledger(tmp_path)
    ledger.add("2026-Q3", record(1))
    with (tmp_path / "2026-Q3.jsonl").open("ab") as fh:
        fh.write(b'{"record_id": "cut sho')  # a crash in the middle of a write
    ledger.add("2026-Q3", record(2))
    (tmp_path / "12-Q9.jsonl").write_text("{}\n")  # not a quarter: ignored
    assert ledger.quarters() == ["2026-Q3"]
    assert [r["record_id"] for r in ledger.records("2026-Q3")] == ["罚1号", "罚2号"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"decided_on": "0001-01-01"}, "outside 1949..2199"),
        ({"decided_on": "last week"}, "is not a date"),
        ({"record_id": ""}, "field 'record_id': required"),
    ],
)
def test_a_record_without_a_usable_date_or_number_is_named(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(RowError, match=message):
        ecology.decided_on(record(1, **fields))


def test_the_leaders_no_stops_the_transfer_but_not_the_clue(tmp_path: Path) -> None:
    settings = ecology.settings_of(FakeAPI(tmp_path))
    both = {"hazardous_waste_tonnes": 5, "public_interest_damage": "是"}
    assert [d.family for d in ecology.drafts_for(record(1, **both), settings)] == [
        "crime_transfer",
        "clue",
    ]
    declined = record(1, transfer_decision=0, **both)  # SQLite's false
    assert [d.family for d in ecology.drafts_for(declined, settings)] == ["clue"]
    with pytest.raises(RowError, match="'transfer_decision': 'maybe' is neither"):
        ecology.drafts_for(record(1, transfer_decision="maybe", **both), settings)


def test_a_bare_approval_date_is_read_as_beijing_time(tmp_path: Path) -> None:
    settings = ecology.settings_of(FakeAPI(tmp_path))
    [draft] = ecology.drafts_for(
        record(1, hazardous_waste_tonnes=5, approved_at="2026-08-03"), settings
    )
    assert draft.body["approved_at"] == "2026-08-02T16:00:00Z"


def test_a_quarter_is_shared_once_then_again_when_a_record_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FakeAPI(tmp_path)
    settings = ecology.settings_of(api)
    for fields in (record(1), record(2, confidentiality="confidential")):
        ecology.take_record(api, settings, fields)
    assert ecology.share_quarters(api, settings, datetime(2026, 9, 30, tzinfo=UTC)) == []
    [first] = ecology.share_quarters(api, settings, AFTER_Q3)
    notice = api.drafts[-1]
    assert notice.confidentiality == "confidential"  # its most restricted record
    assert notice.recipients == ("140400/procuratorate",)
    quarter, records = read_penalty_document(notice.attachments[0].read_bytes()) or ("", [])
    assert quarter == "2026-Q3" and len(records) == 2
    assert ecology.share_quarters(api, settings, AFTER_Q3) == []  # nothing new
    # A corrected record (same number, read again) is an addendum with the whole quarter.
    ecology.take_record(api, settings, record(1, party="公司1（更正）"))
    [addendum] = ecology.share_quarters(api, settings, AFTER_Q3)
    assert addendum != first and "（补充）" in api.drafts[-1].body["title"]
    # A record read again unchanged is not shared again; a quarter whose ledger has not grown
    # since it was last looked at is not even read (each poll looks at every past quarter).
    ecology.take_record(api, settings, record(2, confidentiality="confidential"))
    reads: list[str] = []
    original = ecology.Ledger.records
    monkeypatch.setattr(
        ecology.Ledger, "records", lambda self, q: reads.append(q) or original(self, q)
    )
    assert ecology.share_quarters(api, settings, AFTER_Q3) == []
    assert ecology.share_quarters(api, settings, AFTER_Q3) == []
    assert reads == ["2026-Q3"]


@pytest.mark.parametrize(
    "data",
    [
        b'{"format": "liandong.penalty-records/1", "records": [' + b"[" * 100_000,
        b'{"format": "liandong.penalty-records/1", "records": [{"record_id": 1' + b"0" * 5000,
        b'{"format": "liandong.penalty-records/1", "records": {}}',
        b'{"format": "liandong.penalty-records/1", "records": [{"party": "x"}]}',
    ],
)
def test_a_malformed_shared_file_is_an_error_not_a_crash(data: bytes) -> None:
    with pytest.raises(SharedDataError):
        read_penalty_document(data)


def test_another_file_beside_the_data_is_not_an_error() -> None:
    assert read_penalty_document("说明：见附件".encode()) is None
    assert read_penalty_document(b'{"title": "cover letter"}') is None
