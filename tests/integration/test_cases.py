"""Case lifecycles and legal deadlines on real nodes: signed messages move cases on both
sides, illegal moves are refused with the current state named, and overdue clocks send
signed reminders and escalations."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import ECOLOGY, POLICE, PROCURATORATE, NodeProcess, wait_for
from tests.integration.test_exchange import cli
from tests.peer import audit_events

MakeFederation = Callable[..., dict[str, NodeProcess]]


def send(
    node: NodeProcess, tmp_path: Path, family: str, to: list[str], body: dict[str, Any], *extra: str
) -> str:
    path = tmp_path / f"body-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
    targets = [arg for agency in to for arg in ("--to", agency)]
    result = cli(
        "send", family, *targets, "--body", str(path), *extra, "--json", config=node.setup.config
    )
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["message_id"])


def refused(
    node: NodeProcess, tmp_path: Path, body: dict[str, Any], in_reply_to: str, to: str
) -> str:
    path = tmp_path / "refused.json"
    path.write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
    result = cli(
        "send",
        "reply",
        "--body-type",
        "feedback",
        "--to",
        to,
        "--in-reply-to",
        in_reply_to,
        "--body",
        str(path),
        config=node.setup.config,
    )
    assert result.returncode != 0, result.stdout
    return result.stderr


def feedback(
    node: NodeProcess, tmp_path: Path, to: str, case_id: str, status: str, text: str = ""
) -> str:
    return send(
        node,
        tmp_path,
        "reply",
        [to],
        {"status": status, "text": text},
        "--body-type",
        "feedback",
        "--in-reply-to",
        case_id,
    )


def cases(node: NodeProcess, case_id: str = "") -> list[dict[str, Any]]:
    result = cli("cases", *([case_id] if case_id else []), "--json", config=node.setup.config)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def state(node: NodeProcess, case_id: str, peer: str) -> str:
    """The case's state with `peer`; "" while the node has no such case (not yet arrived)."""
    result = cli("cases", case_id, "--json", config=node.setup.config)
    if result.returncode != 0 and "NOT_FOUND" in result.stderr:
        return ""
    assert result.returncode == 0, result.stderr
    found = [c for c in json.loads(result.stdout) if c["peer"] == peer]
    return str(found[0]["state"]) if found else ""


def test_a_crime_transfer_moves_on_both_sides_and_illegal_moves_are_refused(
    running: dict[str, NodeProcess], tmp_path: Path
) -> None:
    ecology, police, procuratorate = running[ECOLOGY], running[POLICE], running[PROCURATORATE]
    case_id = send(
        ecology,
        tmp_path,
        "crime-transfer",
        [POLICE, PROCURATORATE],
        {"title": "漳河危废倾倒案", "suspect": "某化工公司", "suspected_offence": "污染环境罪"},
    )
    wait_for(lambda: state(ecology, case_id, POLICE) == "received", what="receipt")
    wait_for(lambda: state(police, case_id, ECOLOGY) == "received", what="police case")
    assert state(ecology, case_id, PROCURATORATE) == "received"  # the copy to the procuratorate
    assert state(procuratorate, case_id, ECOLOGY) == "received"

    # The filing clock runs on both sides: the police must decide within 3 days.
    clocks = json.loads(cli("deadlines", "--json", config=ecology.setup.config).stdout)
    assert [(c["rule"], c["responsible"]) for c in clocks] == [("crime_transfer.filing", POLICE)]
    assert 2 * 86400 < int(clocks[0]["seconds_left"]) <= 3 * 86400

    # Not yet filed: arrest approval is refused, naming the state; no reason, no "not filed".
    error = refused(police, tmp_path, {"status": "arrest_approved"}, case_id, ECOLOGY)
    assert "FAILED_PRECONDITION" in error and "'received'" in error and "'filed'" in error
    error = refused(police, tmp_path, {"status": "not_filed"}, case_id, ECOLOGY)
    assert "INVALID_ARGUMENT" in error and "needs a reason" in error
    error = refused(police, tmp_path, {"status": "flied"}, case_id, ECOLOGY)
    assert "'flied' is not an event" in error and "filed" in error
    # Only the police file: the transferring agency cannot record it.
    error = refused(ecology, tmp_path, {"status": "filed"}, case_id, POLICE)
    assert "PERMISSION_DENIED" in error and "addressee" in error

    feedback(police, tmp_path, ECOLOGY, case_id, "filed", "长公环立〔2026〕12号")
    assert state(police, case_id, ECOLOGY) == "filed"
    wait_for(lambda: state(ecology, case_id, POLICE) == "filed", what="filing at ecology")
    [case] = [c for c in cases(ecology, case_id) if c["peer"] == POLICE]
    assert [(e["event"], e["from_state"], e["to_state"]) for e in case["history"]] == [
        ("received", "sent", "received"),
        ("filed", "received", "filed"),
    ]
    assert case["history"][1]["actor"] == POLICE
    # The filing clock was met: nothing is open any more on either side.
    assert json.loads(cli("deadlines", "--json", config=ecology.setup.config).stdout) == []
    assert json.loads(cli("deadlines", "--json", config=police.setup.config).stdout) == []
    for node in (ecology, police):
        assert "case_transition" in {e["event"] for e in audit_events(node.setup)}


def test_local_decisions_and_a_delay_notice_with_a_new_date(
    running: dict[str, NodeProcess], tmp_path: Path
) -> None:
    ecology, procuratorate = running[ECOLOGY], running[PROCURATORATE]
    request_id = send(
        procuratorate,
        tmp_path,
        "evidence-request",
        [ECOLOGY],
        {"title": "请协助检测土壤样品", "matters": "重金属含量"},
        "--deadline",
        "2099-01-31T17:00:00+08:00",
    )
    wait_for(lambda: state(ecology, request_id, PROCURATORATE) == "received", what="request")
    [clock] = json.loads(cli("deadlines", "--json", config=ecology.setup.config).stdout)
    assert clock["rule"] == "evidence_request.results" and clock["due_at"].startswith(
        "2099-01-31T09"
    )

    decided = cli("decide", request_id, "accepted", config=ecology.setup.config)
    assert decided.returncode == 0, decided.stderr
    assert "now accepted" in decided.stdout
    again = cli("decide", request_id, "accepted", config=ecology.setup.config)
    assert again.returncode != 0 and "is 'accepted'" in again.stderr

    no_date = refused(
        ecology, tmp_path, {"status": "delayed", "text": "实验室排期"}, request_id, PROCURATORATE
    )
    assert "needs the new date" in no_date
    feedback_body = {"status": "delayed", "text": "实验室排期", "due": "2099-03-01T09:00:00Z"}
    send(
        ecology,
        tmp_path,
        "reply",
        [PROCURATORATE],
        feedback_body,
        "--body-type",
        "feedback",
        "--in-reply-to",
        request_id,
    )
    wait_for(lambda: state(procuratorate, request_id, ECOLOGY) == "delayed", what="delay")
    for node in (ecology, procuratorate):
        [clock] = json.loads(cli("deadlines", "--json", config=node.setup.config).stdout)
        assert clock["due_at"].startswith("2099-03-01T09"), clock

    send(
        ecology,
        tmp_path,
        "reply",
        [PROCURATORATE],
        {"summary": "检测完成", "findings": "镉超标"},
        "--body-type",
        "evidence_response",
        "--in-reply-to",
        request_id,
    )
    wait_for(lambda: state(procuratorate, request_id, ECOLOGY) == "results_sent", what="results")
    assert json.loads(cli("deadlines", "--json", config=procuratorate.setup.config).stdout) == []


DEADLINES_FAST = """
[deadlines]
speed = 1000.0                  # a clock of 1 hour runs out in 3.6 s
scan_seconds = 0.2
escalation_grace_days = 0.01    # 14.4 min, i.e. 0.86 s at this speed
supervisor = "140400/procuratorate"  # the fallback, and the node itself: never used here

[deadlines.rules."recommendation.reply"]
amount = 1
unit = "hours"
"""


def test_an_unanswered_recommendation_is_reminded_then_escalated(
    make_federation: MakeFederation, tmp_path: Path
) -> None:
    # The operator named, in the registry, who supervises the bureau.
    nodes = make_federation(extra_config=DEADLINES_FAST, supervisors={ECOLOGY: POLICE})
    for node in nodes.values():
        node.start()
    ecology, police, procuratorate = nodes[ECOLOGY], nodes[POLICE], nodes[PROCURATORATE]
    case_id = send(
        procuratorate,
        tmp_path,
        "recommendation",
        [ECOLOGY],
        {"title": "关于督促整改漳河排污问题的检察建议", "requests": ["封堵暗管"]},
    )

    def escalated() -> bool:
        clocks = json.loads(
            cli("deadlines", "--overdue", "--json", config=procuratorate.setup.config).stdout
        )
        return [c["state"] for c in clocks] == ["escalated"]

    wait_for(escalated, what="escalation")
    [clock] = json.loads(cli("deadlines", "--json", config=procuratorate.setup.config).stdout)
    assert clock["responsible"] == ECOLOGY and int(clock["seconds_left"]) < 0

    def notices(node: NodeProcess) -> list[dict[str, Any]]:
        items = json.loads(cli("inbox", "--json", config=node.setup.config).stdout)
        return [i for i in items if i["body_type"] == "notice"]

    wait_for(lambda: bool(notices(ecology)) and bool(notices(police)), what="notices")
    [reminder] = notices(ecology)
    assert reminder["body"]["kind"] == "KIND_REMINDER"
    assert reminder["case_ref"] == case_id and reminder["sender"] == PROCURATORATE
    [escalation] = notices(police)
    assert escalation["body"]["kind"] == "KIND_ESCALATION"
    assert ECOLOGY in escalation["body"]["text"]
    events = {e["event"] for e in audit_events(procuratorate.setup)}
    assert "deadline_overdue" in events and "deadline_escalated" in events
    # Ecology's own node shows the clock overdue to its liaison, and sends nobody anything.
    [own] = json.loads(cli("deadlines", "--json", config=ecology.setup.config).stdout)
    assert own["state"] == "overdue" and own["responsible"] == ECOLOGY
    assert notices(procuratorate) == []

    # The late reply still closes the case's clock (met late) on both sides.
    send(
        ecology,
        tmp_path,
        "reply",
        [PROCURATORATE],
        {"summary": "已整改", "measures": "封堵暗管"},
        "--body-type",
        "recommendation_reply",
        "--in-reply-to",
        case_id,
    )
    wait_for(lambda: state(procuratorate, case_id, ECOLOGY) == "replied", what="reply")
    assert json.loads(cli("deadlines", "--json", config=procuratorate.setup.config).stdout) == []


def test_the_procuratorate_supervises_filing_from_its_copies(
    make_federation: MakeFederation, tmp_path: Path
) -> None:
    # 3 days pass in 2 s; the police's decisions go to ecology and to the procuratorate.
    nodes = make_federation(extra_config="\n[deadlines]\nspeed = 129600.0\nscan_seconds = 0.2\n")
    for node in nodes.values():
        node.start()
    ecology, police, procuratorate = nodes[ECOLOGY], nodes[POLICE], nodes[PROCURATORATE]
    undecided = send(
        ecology, tmp_path, "crime-transfer", [POLICE, PROCURATORATE], {"title": "暗管排污案"}
    )
    declined = send(
        ecology, tmp_path, "crime-transfer", [POLICE, PROCURATORATE], {"title": "危废倾倒案"}
    )
    for case_id in (undecided, declined):
        wait_for(lambda c=case_id: state(police, c, ECOLOGY) == "received", what="transfer")
    send(
        police,
        tmp_path,
        "reply",
        [ECOLOGY, PROCURATORATE],
        {"status": "not_filed", "text": "倾倒量未达三吨，不构成犯罪"},
        "--body-type",
        "feedback",
        "--in-reply-to",
        declined,
    )
    # The procuratorate's copy follows the police's decision, made by the police.
    wait_for(lambda: state(procuratorate, declined, ECOLOGY) == "not_filed", what="copy")
    [copy] = cases(procuratorate, declined)
    assert copy["history"][-1]["actor"] == POLICE

    def report(fmt: str = "json") -> str:
        result = cli("report", "supervision", "--format", fmt, config=procuratorate.setup.config)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def findings() -> list[dict[str, Any]]:
        return list(json.loads(report()))

    wait_for(lambda: len(findings()) == 2, what="the undecided transfer to go overdue")
    overdue, refused_one = findings()
    assert (overdue["finding"], overdue["case_id"]) == ("should_be_filed", undecided)
    assert overdue["transferred_by"] == ECOLOGY and overdue["overdue_days"] > 0
    assert (refused_one["finding"], refused_one["case_id"]) == ("not_filed", declined)
    assert refused_one["reason"] == "倾倒量未达三吨，不构成犯罪"
    assert refused_one["decided_by"] == POLICE
    csv_lines = report("csv").splitlines()
    assert csv_lines[0].startswith("finding,case_id,transferred_by")
    assert len(csv_lines) == 3
    table = report("table")
    assert "应立未立" in table and "不予立案" in table
