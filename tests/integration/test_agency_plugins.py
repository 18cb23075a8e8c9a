"""The agency plugins on real local systems: the bureau's penalty records in a SQLite database,
the police decisions in PostgreSQL, drop folders on disk — three real nodes between them.

One story: the bureau's records are classified against the crime thresholds and become a
crime transfer with its evidence file, a litigation clue, a confidential transfer the police
adapter is not cleared for, one the bureau decided not to transfer, and one bad row; the
quarter's records are shared with the procuratorate, whose supervision report finds the
untransferred one (应移未移); the police case system's decision, read from its database,
files the transfer on every side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import ECOLOGY, POLICE, PROCURATORATE, NodeProcess, wait_for
from tests.integration.test_cases import cases, state
from tests.integration.test_exchange import cli
from tests.peer import audit_events

RECORDS = [
    # record_id, party, decided_on, tonnes, finding, evidence, marking, decision
    ("长环罚〔2026〕101号", "甲化工公司", "2026-08-03", 5, "", "r1/现场照片.jpg", "", ""),
    ("长环罚〔2026〕102号", "乙养殖场", "2026-08-10", None, "public_interest", "", "", ""),
    ("长环罚〔2026〕103号", "丙电镀厂", "2026-08-15", None, "hidden", "", "", "否"),
    ("长环罚〔2026〕104号", "丁冶炼厂", "2026-09-01", None, "zone", "", "confidential", ""),
    ("长环罚〔2026〕105号", "", "2026-09-02", 9, "", "", "", ""),
    ("长环罚〔2026〕106号", "戊印染厂", "2026-09-20", 0.2, "", "", "", ""),
]
FINDINGS = ("public_interest", "hidden", "zone")


def bureau_database(path: Path) -> str:
    """The bureau's enforcement system: its own table layout, its own column names."""
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE penalty_records (id INTEGER PRIMARY KEY, decision_no TEXT, "
                "party_name TEXT, decided_on TEXT, hw_tonnes REAL, public_interest TEXT, "
                "hidden TEXT, zone TEXT, evidence TEXT, marking TEXT, decision TEXT, facts TEXT)"
            )
        )
        for n, (no, party, day, tonnes, finding, evidence, marking, decision) in enumerate(
            RECORDS, start=1
        ):
            connection.execute(
                text(
                    "INSERT INTO penalty_records VALUES (:id, :no, :party, :day, :tonnes, "
                    ":public_interest, :hidden, :zone, :evidence, :marking, :decision, :facts)"
                ),
                {
                    "id": n,
                    "no": no,
                    "party": party,
                    "day": day,
                    "tonnes": tonnes,
                    **{f: "是" if f == finding else "否" for f in FINDINGS},
                    "evidence": evidence,
                    "marking": marking,
                    "decision": decision,
                    "facts": f"{party}违法排污",
                },
            )
    engine.dispose()
    return url


def police_database(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE decisions (id INTEGER PRIMARY KEY, transfer_id TEXT, "
                "decision TEXT, reason TEXT)"
            )
        )
    engine.dispose()


def add_decision(url: str, *row: object) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO decisions VALUES (:id, :transfer, :decision, :reason)"),
            dict(zip(("id", "transfer", "decision", "reason"), row, strict=True)),
        )
    engine.dispose()


def configure(node: NodeProcess, text_: str) -> None:
    with node.setup.config.open("a", encoding="utf-8") as fh:
        fh.write("\n" + text_)


def inbound_documents(node: NodeProcess) -> list[dict[str, Any]]:
    folder = node.setup.directory / "local" / "inbound"
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def findings(node: NodeProcess) -> list[dict[str, Any]]:
    result = cli("report", "supervision", "--format", "json", config=node.setup.config)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


@pytest.fixture
def agencies(
    make_federation: Any, postgres_database: str, tmp_path: Path
) -> dict[str, NodeProcess]:
    nodes: dict[str, NodeProcess] = make_federation((ECOLOGY, POLICE, PROCURATORATE))
    ecology = nodes[ECOLOGY]
    evidence = ecology.setup.directory / "evidence" / "r1"
    evidence.mkdir(parents=True)
    (evidence / "现场照片.jpg").write_bytes(b"\xff\xd8 photo of the dumping site")
    records_url = bureau_database(tmp_path / "bureau.db")
    configure(
        ecology,
        f"""[plugins.ecology.records.penalties]
url = "{records_url}"
query = "SELECT * FROM penalty_records WHERE id > :after ORDER BY id"
key = "id"
[plugins.ecology.records.penalties.columns]
record_id = "decision_no"
party = "party_name"
decided_on = "decided_on"
hazardous_waste_tonnes = "hw_tonnes"
evidence = "evidence"
confidentiality = "marking"
transfer_decision = "decision"
facts = "facts"
public_interest_damage = "public_interest"
hidden_discharge = "hidden"
protected_zone = "zone"
""",
    )
    police_database(postgres_database)
    configure(
        nodes[POLICE],
        f"""[plugins.police.sql.decisions]
url = "{postgres_database}"
query = "SELECT id, transfer_id, decision, reason FROM decisions WHERE id > :after ORDER BY id"
key = "id"
[plugins.police.sql.decisions.columns]
in_reply_to = "transfer_id"
"body.status" = "decision"
"body.text" = "reason"
[plugins.police.sql.decisions.fixed]
family = "reply"
body_type = "feedback"
to = "{ECOLOGY};{PROCURATORATE}"
""",
    )
    configure(nodes[PROCURATORATE], '[plugins.procuratorate]\ncleared_for = "confidential"\n')
    for node in nodes.values():
        node.start(wait=False)
    for node in nodes.values():
        node.wait_serving()
    nodes["police_db"] = postgres_database  # type: ignore[assignment]
    return nodes


def test_penalty_records_become_transfers_clues_shared_data_and_supervision(
    agencies: dict[str, NodeProcess],
) -> None:
    ecology, police, procuratorate = agencies[ECOLOGY], agencies[POLICE], agencies[PROCURATORATE]

    def transfers() -> list[dict[str, Any]]:
        return [c for c in cases(ecology) if c["family"] in ("crime_transfer", "clue")]

    wait_for(lambda: len(transfers()) == 5, what="the bureau's transfers and clue")
    by_ref: dict[tuple[str, str], dict[str, Any]] = {}
    for case in transfers():
        shown = json.loads(
            cli("show", case["case_id"], "--json", config=ecology.setup.config).stdout
        )
        by_ref[(shown["case_ref"], case["peer"])] = {**case, **shown}
    # Records 1 and 4 met crime thresholds (to the police, copied to the procuratorate), 2 is
    # a clue; 3 was decided against, 5 has no party, 6 met nothing.
    assert sorted(by_ref) == [
        ("长环罚〔2026〕101号", POLICE),
        ("长环罚〔2026〕101号", PROCURATORATE),
        ("长环罚〔2026〕102号", PROCURATORATE),
        ("长环罚〔2026〕104号", POLICE),
        ("长环罚〔2026〕104号", PROCURATORATE),
    ]
    transfer = by_ref[("长环罚〔2026〕101号", POLICE)]
    assert transfer["family"] == "crime_transfer"
    body = transfer["body"]
    assert body["suspect"] == "甲化工公司" and body["suspected_offence"] == "污染环境罪"
    assert any("三吨以上" in line and "5" in line for line in body["evidence"])
    assert [a["file_name"] for a in transfer["attachments"]] == ["现场照片.jpg"]
    assert by_ref[("长环罚〔2026〕102号", PROCURATORATE)]["family"] == "clue"
    assert by_ref[("长环罚〔2026〕104号", POLICE)]["confidentiality"] == "confidential"
    failed = ecology.setup.directory / "plugins/ecology/records/penalties.failed.jsonl"
    [bad] = [json.loads(line) for line in failed.read_text(encoding="utf-8").splitlines()]
    assert bad["key"] == 5 and "field 'party': required" in bad["error"]

    # The police case system got the transfer with its evidence; the confidential one was
    # withheld from it (cleared for internal) and audited; the procuratorate, cleared for
    # confidential, got its copy.
    wait_for(lambda: len(inbound_documents(police)) == 1, what="the police hand-off")
    [document] = inbound_documents(police)
    assert document["case_ref"] == "长环罚〔2026〕101号"
    assert Path(document["attachments"][0]["path"]).read_bytes().startswith(b"\xff\xd8")
    confidential = by_ref[("长环罚〔2026〕104号", POLICE)]["message_id"]
    wait_for(
        lambda: any(e["event"] == "hand_off_withheld" for e in audit_events(police.setup)),
        what="the withheld hand-off",
    )
    [withheld] = [e for e in audit_events(police.setup) if e["event"] == "hand_off_withheld"]
    assert withheld["message_id"] == confidential
    assert (
        "marked confidential" in withheld["detail"] and "cleared for internal" in withheld["detail"]
    )
    inbox = cli("inbox", config=police.setup.config).stdout
    assert "confidential" in inbox and "withheld: marked confidential" in inbox
    wait_for(
        lambda: any(d["message_id"] == confidential for d in inbound_documents(procuratorate)),
        what="the procuratorate's copy of the confidential transfer",
    )

    # The quarter (2026-Q3) is over: its five readable records went to the procuratorate,
    # whose supervision report finds the one over a threshold that was never transferred.
    def shared() -> list[dict[str, Any]]:
        return [
            d
            for d in inbound_documents(procuratorate)
            if d["body_type"] == "notice" and d["body"].get("kind") == "KIND_DATA_SHARING"
        ]

    wait_for(lambda: len(shared()) == 1, what="the quarterly sharing")
    [notice] = shared()
    data = json.loads(Path(notice["attachments"][0]["path"]).read_text(encoding="utf-8"))
    assert data["format"] == "liandong.penalty-records/1" and data["quarter"] == "2026-Q3"
    # Every record is shared, the one that could not be transferred (no party) included; the
    # notice carries the marking of its most restricted record.
    assert len(data["records"]) == 6
    assert notice["confidentiality"] == "confidential"
    found = [f for f in findings(procuratorate) if f["finding"] == "should_be_transferred"]
    assert [f["case_id"] for f in found] == ["长环罚〔2026〕103号", "长环罚〔2026〕105号"]
    assert found[0]["transferred_by"] == ECOLOGY and found[0]["title"] == "丙电镀厂"
    assert "暗管" in found[0]["reason"] and found[0]["overdue_days"] > 60
    assert "三吨以上" in found[1]["reason"]
    table = cli("report", "supervision", config=procuratorate.setup.config).stdout
    assert "应移未移" in table and "长环罚〔2026〕103号" in table

    # The police decide in their own system; the decision row becomes signed feedback that
    # files the transfer on every side. A row that is not a decision is logged and skipped.
    police_db = str(agencies["police_db"])  # type: ignore[index]
    case_id = transfer["message_id"]
    add_decision(police_db, 1, case_id, "flied", "typo")
    add_decision(police_db, 2, case_id, "filed", "长公环立〔2026〕7号")
    wait_for(lambda: state(ecology, case_id, POLICE) == "filed", what="filing at the bureau")
    wait_for(lambda: state(procuratorate, case_id, ECOLOGY) == "filed", what="filing at the copy")
    failed = police.setup.directory / "plugins/police/sql/decisions.failed.jsonl"
    [bad] = [json.loads(line) for line in failed.read_text(encoding="utf-8").splitlines()]
    assert bad["key"] == 1 and "'flied' is not an event" in bad["error"]
