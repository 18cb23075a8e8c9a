"""Answering on arrival, reporting case changes and the quarterly sharing clock, on real
nodes: the procuratorate's built-in adapter declines a clue that came without evidence
(不予受理, not handed to its case system) and accepts one with evidence (受理, handed off), the
police answer a crime transfer copied to the procuratorate, every case change reaches the drop
folders' case logs, and a quarter the bureau has not shared is reminded and then closed."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from node.exchange.cases import sharing_case_id
from node.exchange.sharing import last_finished_quarter
from tests.conftest import ECOLOGY, POLICE, PROCURATORATE, NodeProcess, wait_for
from tests.integration.test_agency_plugins import configure, inbound_documents
from tests.integration.test_cases import cases, feedback, send, state
from tests.integration.test_exchange import cli
from tests.peer import audit_events, database_rows

CLUE = {"title": "漳河岸边非法填埋", "facts": "填埋面积约200平方米", "subject": "某建材公司"}
NO_EVIDENCE = "线索未附证据材料，请补充后重新移送"


def case_log(node: NodeProcess) -> list[dict[str, Any]]:
    folder = node.setup.directory / "local" / "cases"
    return [
        json.loads(line)
        for path in sorted(folder.glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
    ]


def inbox(node: NodeProcess) -> dict[str, dict[str, Any]]:
    result = cli("inbox", "--json", config=node.setup.config)
    assert result.returncode == 0, result.stderr
    return {item["message_id"]: item for item in json.loads(result.stdout)}


def test_inbound_cases_are_answered_on_arrival_and_changes_reach_the_local_system(
    make_federation: Any, tmp_path: Path
) -> None:
    nodes: dict[str, NodeProcess] = make_federation((ECOLOGY, POLICE, PROCURATORATE))
    ecology, police, procuratorate = nodes[ECOLOGY], nodes[POLICE], nodes[PROCURATORATE]
    configure(
        procuratorate,
        "[[plugins.procuratorate.review]]\n"
        'family = "clue"\nwithout_attachments = true\n'
        f'decline = "declined"\nreason = "{NO_EVIDENCE}"\n'
        "[[plugins.procuratorate.review]]\n"
        f'family = "clue"\nfrom = "{ECOLOGY}"\naccept = "accepted"\n',
    )
    configure(police, '[[plugins.police.review]]\nfamily = "crime_transfer"\naccept = "filed"\n')
    for node in nodes.values():
        node.start(wait=False)
    for node in nodes.values():
        node.wait_serving()

    bare = send(ecology, tmp_path, "clue", [PROCURATORATE], CLUE)
    evidence = tmp_path / "photos.txt"
    evidence.write_text("现场照片12张", encoding="utf-8")
    backed = send(ecology, tmp_path, "clue", [PROCURATORATE], CLUE, "--attach", str(evidence))
    transfer = send(
        ecology,
        tmp_path,
        "crime-transfer",
        [POLICE, PROCURATORATE],
        {"title": "暗管排放", "suspect": "某电镀公司", "suspected_offence": "污染环境罪"},
    )

    # The clue without evidence is declined, with the reason, on both nodes...
    wait_for(lambda: state(ecology, bare, PROCURATORATE) == "declined", what="the decline")
    assert state(procuratorate, bare, ECOLOGY) == "declined"
    assert cases(ecology, bare)[0]["history"][-1]["reason"] == NO_EVIDENCE
    # ... and never reaches the procuratorate's case system; the inbox says why.
    wait_for(lambda: inbox(procuratorate)[bare].get("handed_off", "") != "", what="the record")
    recorded = inbox(procuratorate)[bare]["handed_off"]
    assert recorded.startswith(f"declined: declined ({NO_EVIDENCE}), answer ")
    declined = [e for e in audit_events(procuratorate.setup) if e["event"] == "inbound_declined"]
    assert [e["message_id"] for e in declined] == [bare]

    # The clue with evidence is accepted and handed off as usual.
    wait_for(lambda: state(ecology, backed, PROCURATORATE) == "accepted", what="the acceptance")
    wait_for(lambda: len(inbound_documents(procuratorate)) >= 2, what="the hand-offs")
    handed = {d["message_id"] for d in inbound_documents(procuratorate)}
    assert backed in handed and bare not in handed

    # The police's answer to the transfer goes to the procuratorate's copy as well.
    wait_for(lambda: state(ecology, transfer, POLICE) == "filed", what="the filing")
    wait_for(lambda: state(procuratorate, transfer, ECOLOGY) == "filed", what="the copy")

    # Every change after opening reaches each drop folder's case log, once, in order.
    def logged(node: NodeProcess, case_id: str) -> list[tuple[str, str, str]]:
        return [
            (c["peer"], c["from_state"], c["to_state"])
            for c in case_log(node)
            if c["case_id"] == case_id
        ]

    wait_for(
        lambda: "declined" in {t for _p, _f, t in logged(ecology, bare)},
        what="the decline in the bureau's case log",
    )
    assert logged(ecology, bare) == [
        (PROCURATORATE, "sent", "received"),
        (PROCURATORATE, "received", "declined"),
    ]
    wait_for(lambda: len(logged(ecology, transfer)) == 3, what="the transfer's changes")
    assert sorted(logged(ecology, transfer)) == [
        (POLICE, "received", "filed"),
        (POLICE, "sent", "received"),
        (PROCURATORATE, "sent", "received"),
    ]
    wait_for(lambda: len(logged(procuratorate, transfer)) == 1, what="the procuratorate's log")
    assert logged(procuratorate, transfer) == [(ECOLOGY, "received", "filed")]
    assert logged(procuratorate, bare) == [(ECOLOGY, "received", "declined")]
    sequences = [c["sequence"] for c in case_log(ecology)]
    assert sequences == sorted(set(sequences))


def test_a_quarter_not_shared_is_reminded_and_the_sharing_closes_it(
    make_federation: Any, tmp_path: Path
) -> None:
    """001 §七: the bureau owes the procuratorate its penalty data every quarter. The
    procuratorate's node opens a case per quarter when it ends, reminds the bureau when the
    15 days pass, and the bureau's data-sharing notice for that quarter closes it."""
    nodes: dict[str, NodeProcess] = make_federation((ECOLOGY, PROCURATORATE))
    ecology, procuratorate = nodes[ECOLOGY], nodes[PROCURATORATE]
    # 15 days pass in 10 s; the last quarter ended at least that long ago.
    configure(
        procuratorate,
        f'[deadlines]\nsharing_from = ["{ECOLOGY}"]\nspeed = 129600.0\nscan_seconds = 0.2\n',
    )
    for node in nodes.values():
        node.start(wait=False)
    for node in nodes.values():
        node.wait_serving()

    quarter = last_finished_quarter(datetime.now(UTC))
    case_id = sharing_case_id(quarter)
    wait_for(lambda: state(procuratorate, case_id, ECOLOGY) == "awaited", what="the case")

    def clocks() -> list[dict[str, Any]]:
        result = cli("deadlines", "--json", config=procuratorate.setup.config)
        return [c for c in json.loads(result.stdout) if c["case_id"] == case_id]

    wait_for(lambda: [c["state"] for c in clocks()] == ["overdue"], what="the overdue clock")
    [clock] = clocks()
    assert (clock["rule"], clock["responsible"]) == ("data_sharing.quarterly", ECOLOGY)

    def reminders() -> list[dict[str, Any]]:
        return [
            item
            for item in inbox(ecology).values()
            if item.get("case_ref") == case_id and "催办" in json.dumps(item, ensure_ascii=False)
        ]

    wait_for(lambda: len(reminders()) == 1, what="the reminder at the bureau")

    # A notice naming a quarter not yet over changes nothing (it would open a case and close
    # it at once, so that quarter's clock would never run)...
    send(
        ecology,
        tmp_path,
        "notice",
        [PROCURATORATE],
        {"kind": "KIND_DATA_SHARING", "title": "2099-Q4 行政处罚信息", "text": "0 条"},
        "--case-ref",
        "2099-Q4",
    )
    # ... the bureau shares the quarter (here by hand): the case closes, the clock is met late.
    send(
        ecology,
        tmp_path,
        "notice",
        [PROCURATORATE],
        {"kind": "KIND_DATA_SHARING", "title": f"{quarter} 行政处罚信息", "text": "0 条"},
        "--case-ref",
        quarter,
    )
    wait_for(lambda: state(procuratorate, case_id, ECOLOGY) == "shared", what="the sharing")
    wait_for(lambda: clocks() == [], what="the clock closing")
    [row] = database_rows(
        procuratorate.setup,
        f"SELECT state FROM clocks WHERE case_id = '{case_id}'",
    )
    assert row == ("met_late",)
    assert state(procuratorate, sharing_case_id("2099-Q4"), ECOLOGY) == ""


def test_a_verdict_an_officer_overtook_falls_back_to_the_officer(
    make_federation: Any, tmp_path: Path
) -> None:
    """The police's case system is down when a transfer arrives, so the hand-off waits; an
    officer answers meanwhile (not filed). When the case system is back, the review rule's
    verdict (filed) no longer fits the case: it is not sent, and the item is handed off."""
    nodes: dict[str, NodeProcess] = make_federation((ECOLOGY, POLICE))
    ecology, police = nodes[ECOLOGY], nodes[POLICE]
    down = police.setup.directory / "local" / "inbound"  # a file where the folder should be
    down.parent.mkdir(parents=True, exist_ok=True)
    down.write_text("the case system is down", encoding="utf-8")
    for node in nodes.values():
        node.start(wait=False)
    for node in nodes.values():
        node.wait_serving()

    body = {"title": "暗管排放", "suspect": "某电镀公司", "suspected_offence": "污染环境罪"}
    transfer = send(ecology, tmp_path, "crime-transfer", [POLICE], body)
    wait_for(lambda: state(police, transfer, ECOLOGY) == "received", what="the transfer")
    reason = "现有证据不能证明存在犯罪事实"
    feedback(police, tmp_path, ECOLOGY, transfer, "not_filed", reason)
    wait_for(lambda: state(ecology, transfer, POLICE) == "not_filed", what="the officer's answer")
    assert inbox(police)[transfer].get("handed_off", "") == ""

    police.stop()
    configure(police, '[[plugins.police.review]]\nfamily = "crime_transfer"\naccept = "filed"\n')
    down.unlink()
    police.start()
    wait_for(lambda: len(inbound_documents(police)) == 1, what="the hand-off")
    assert inbound_documents(police)[0]["message_id"] == transfer
    assert not inbox(police)[transfer]["handed_off"].startswith("declined")
    assert state(police, transfer, ECOLOGY) == state(ecology, transfer, POLICE) == "not_filed"
    outbox = json.loads(cli("outbox", "--json", config=police.setup.config).stdout)
    assert len([m for m in outbox if m.get("in_reply_to") == transfer]) == 1  # the officer's
    assert "verdict not sent" in police.log_path.read_text(encoding="utf-8")
