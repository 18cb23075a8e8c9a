"""`liandong demo`: three agencies of Changzhi exchange a case, end to end, on loopback.

Three nodes run as separate processes with mutual TLS, and a fourth for the discipline
commission, which receives escalations. The scenario follows 长环发〔2024〕75号 and the
procuratorate cooperation rules, on a simulated clock (`--speed N`: every legal deadline
runs N times faster): ecology transfers a suspected pollution crime to the police (copied to
the procuratorate) with an evidence file, and the police file it within the 3 days; ecology
sends a public-interest-litigation clue, which the procuratorate accepts and answers within
the month; the procuratorate asks ecology for evidence, ecology sends a signed delay notice
with a new date and then the results with a file; the procuratorate issues an urgent
recommendation that ecology leaves unanswered until it is overdue, is reminded (催办) and is
escalated to the discipline commission (督办), and ecology's late reply closes it; ecology's
case system drops a major-incident notice for both others into its drop folder.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import grpc

from node._pb.liandong.v1 import envelope_pb2
from node.admin_client import AdminClient, AdminError
from node.audit.verify import verify_bundles
from node.exchange.cases import sharing_case_id
from node.exchange.messages import marking_label
from node.exchange.sharing import last_finished_quarter, quarter_end
from node.federation_setup import NodeProcess, NodeProcessError, NodeSetup, create_federation

ECOLOGY, POLICE, PROCURATORATE = "140400/ecology", "140400/police", "140400/procuratorate"
DISCIPLINE = "140400/discipline"
NAMES = {
    ECOLOGY: "长治市生态环境局",
    POLICE: "长治市公安局",
    PROCURATORATE: "长治市人民检察院",
    DISCIPLINE: "长治市纪委监委",
}
SHORT = {
    ECOLOGY: "ecology",
    POLICE: "police",
    PROCURATORATE: "procuratorate",
    DISCIPLINE: "discipline",
}
DEFAULT_SPEED = 100_000.0  # 15 days in 13 s, 3 days in 2.6 s
DAY = 86400.0


def deadline_config(speed: float) -> str:
    return (
        "\n[deadlines]\n"
        f"speed = {speed}\n"
        "scan_seconds = 0.2\n"
        "escalation_grace_days = 3\n"
        # The police's and the procuratorate's case systems may hold confidential items.
        '[plugins.police]\ncleared_for = "confidential"\n'
        '[plugins.procuratorate]\ncleared_for = "confidential"\n'
        # The bureau sends the discipline commission nothing above internal: it gets a
        # version of a message without the fields marked confidential.
        f'[plugins.ecology.recipients]\n"{DISCIPLINE}" = "internal"\n'
    )


ENFORCEMENT_TABLE = (
    "CREATE TABLE penalty_records (id INTEGER PRIMARY KEY, decision_no TEXT, party TEXT, "
    "decided_on TEXT, facts TEXT, hw_tonnes REAL, hidden_pipe TEXT, evidence TEXT, "
    "leader_decision TEXT)"
)

ENFORCEMENT_QUERY = "SELECT * FROM penalty_records WHERE id > :after ORDER BY id LIMIT 500"


def connect_enforcement_system(node: NodeSetup) -> Path:
    """The bureau's enforcement system: a SQLite database of its own, which the ecology
    plugin reads (read-only) through a query and a column mapping in node.toml."""
    database = node.directory / "enforcement.db"
    with sqlite3.connect(database) as connection:
        connection.execute(ENFORCEMENT_TABLE)
    connection.close()
    with node.config.open("a", encoding="utf-8") as config:
        config.write(
            "\n[plugins.ecology.records.penalties]\n"
            f'url = "sqlite:///{database.resolve()}"\n'
            f'query = "{ENFORCEMENT_QUERY}"\n'
            'key = "id"\n'
            "[plugins.ecology.records.penalties.columns]\n"
            'record_id = "decision_no"\nparty = "party"\ndecided_on = "decided_on"\n'
            'facts = "facts"\nhazardous_waste_tonnes = "hw_tonnes"\n'
            'hidden_discharge = "hidden_pipe"\nevidence = "evidence"\n'
            'transfer_decision = "leader_decision"\n'
        )
    return database


def configure_procuratorate(node: NodeSetup) -> None:
    """The procuratorate's node accepts the bureau's clues on arrival (受理, a review rule)
    and waits for the bureau's quarterly penalty data (001 §七, ``sharing_from``)."""
    text = node.config.read_text(encoding="utf-8")
    text = text.replace("\n[deadlines]\n", f'\n[deadlines]\nsharing_from = ["{ECOLOGY}"]\n', 1)
    text += (
        "\n[[plugins.procuratorate.review]]\n"
        f'family = "clue"\nfrom = "{ECOLOGY}"\naccept = "accepted"\n'
    )
    node.config.write_text(text, encoding="utf-8")


STARTUP_SECONDS = 60.0
DELIVERY_SECONDS = 60.0


class DemoFailed(Exception):
    pass


def say(text: str) -> None:
    print(text, flush=True)


def run_demo(workdir: Path | None, speed: float = DEFAULT_SPEED) -> int:
    started = time.monotonic()
    keep = workdir is not None
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="liandong-demo-"))
    if keep and root.exists() and any(root.iterdir()):
        say(f"liandong: error: --workdir {root} is not empty; give a new or empty directory")
        return 1
    root.mkdir(parents=True, exist_ok=True)
    processes: list[NodeProcess] = []
    try:
        say(
            f"Setting up a federation of three agencies, and the discipline commission that "
            f"receives escalations, in {root}"
        )
        # Witnessing every second, so the short scenario ends with cosigned checkpoints.
        setups = create_federation(
            root,
            list(NAMES),
            names=NAMES,
            witness_interval=1.0,
            extra_config=deadline_config(speed),
            # The operator names, in the registry, where escalations about each agency go.
            supervisors={ECOLOGY: DISCIPLINE, POLICE: DISCIPLINE},
        )
        say(f"Legal deadlines run {speed:,.0f} times faster than real time (--speed)")
        nodes = {n.agency: n for n in setups}
        connect_enforcement_system(nodes[ECOLOGY])
        configure_procuratorate(nodes[PROCURATORATE])
        for node in nodes.values():
            processes.append(NodeProcess(node).start(wait=False))
            say(f"  started {node.agency:<22} {NAMES[node.agency]}  on {node.endpoint} (mTLS)")
        for process in processes:
            process.wait_serving(STARTUP_SECONDS)
        clients = {agency: AdminClient(node.admin_socket) for agency, node in nodes.items()}
        say("Running the scenario")
        run_scenario(root, nodes, clients, speed)
        say("")
        print_timeline(clients)
        say("")
        summarize(clients)
        say("")
        print_cases(clients)
        say("")
        audit_trail(root, clients)
        for client in clients.values():
            client.close()
    except (DemoFailed, AdminError, NodeProcessError) as error:
        say(f"liandong demo: FAILED: {error}")
        return 1
    finally:
        for process in processes:
            process.stop(timeout=20)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    say(f"Demo finished in {time.monotonic() - started:.1f} s; nodes stopped.")
    if keep:
        say(f"Every node's files are kept in {root} (node.toml, node.db, local/, node.log).")
    return 0


def wait_until(condition: Callable[[], bool], seconds: float, failure: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise DemoFailed(failure)


def _all_handed_off(client: AdminClient) -> bool:
    return all(item.handed_off for item in client.list_items("inbox", 100))


def _delivered(client: AdminClient, message_id: str) -> bool:
    item = client.get_item(message_id)
    return all(d.state == "delivered" for d in item.deliveries)


def _send(
    client: AdminClient,
    what: str,
    family: str,
    to: list[str],
    body: dict[str, object],
    **extra: object,
) -> str:
    message_id = client.submit(
        family=family,
        recipients=to,
        body_json=json.dumps(body, ensure_ascii=False),
        **extra,  # type: ignore[arg-type]
    )
    wait_until(
        lambda: _delivered(client, message_id), DELIVERY_SECONDS, f"{what} was not delivered"
    )
    say(f"  ✓ {what}")
    return message_id


def _case_state(client: AdminClient, case_id: str, peer: str) -> str:
    """The case's state with `peer`; "" while the node has no such case (not yet arrived)."""
    try:
        cases = client.cases(case_id=case_id)
    except AdminError as error:
        if error.code is grpc.StatusCode.NOT_FOUND:
            return ""
        raise
    return next((c.state for c in cases if c.peer == peer), "")


def _in_days(days: float) -> str:
    """The date `days` from now, RFC 3339 (the node's simulated clock scales it)."""
    return (datetime.now(UTC) + timedelta(days=days)).isoformat()


def _wait_state(client: AdminClient, case_id: str, peer: str, state: str, what: str) -> None:
    wait_until(
        lambda: _case_state(client, case_id, peer) == state,
        DELIVERY_SECONDS,
        f"{what}: the case did not reach '{state}'",
    )


def _simulated(seconds: float, speed: float) -> str:
    days = seconds * speed / DAY
    return f"{days:.1f} days" if days >= 1 else f"{days * 24:.1f} hours"


def run_scenario(
    root: Path, nodes: dict[str, NodeSetup], clients: dict[str, AdminClient], speed: float
) -> None:
    evidence = root / "evidence"
    evidence.mkdir()
    report = evidence / "监测报告-2026-118.csv"
    report.write_text(
        "采样时间,点位,污染物,浓度(mg/L),排放标准(mg/L),倍数\n"
        "2026-11-02 09:40,暗管出口,总铬,4.62,1.5,3.08\n"
        "2026-11-02 10:15,暗管出口,六价铬,1.71,0.5,3.42\n",
        encoding="utf-8",
    )
    case = "长环罚〔2026〕118号"
    crime = _send(
        clients[ECOLOGY],
        "ecology → police (cc procuratorate): suspected pollution crime, with test report",
        "crime_transfer",
        [POLICE, PROCURATORATE],
        {
            "title": "某电镀厂通过暗管排放含铬废水涉嫌污染环境罪",
            "facts": "2026年11月2日现场检查发现暗管排放，总铬超标3.08倍，六价铬超标3.42倍。",
            "suspect": "长治市某电镀有限公司",
            "location": "长治市潞州区",
            "suspected_offence": "污染环境罪",
            "transfer_letter_no": "长环移〔2026〕7号",
            "approved_by": "局长",
            "evidence": ["现场检查笔录", "采样监测报告"],
        },
        case_ref=case,
        attachment_paths=[str(report)],
        confidentiality=envelope_pb2.CONFIDENTIALITY_CONFIDENTIAL,
    )
    clue = _send(
        clients[ECOLOGY],
        "ecology → procuratorate: public-interest-litigation clue",
        "clue",
        [PROCURATORATE],
        {
            "title": "漳河支流生态环境损害线索",
            "facts": "电镀废水长期排入漳河支流，下游河段生态环境受损，损害公共利益。",
            "subject": "长治市某电镀有限公司",
            "location": "漳河支流潞州段",
        },
        case_ref=case,
    )
    _send(
        clients[POLICE],
        "police → ecology (cc procuratorate): filed (立案) within the 3-day filing deadline",
        "reply",
        [ECOLOGY, PROCURATORATE],
        {"status": "filed", "text": "长公环立字〔2026〕15号"},
        body_type="feedback",
        in_reply_to=crime,
        case_ref=case,
    )
    _wait_state(clients[ECOLOGY], crime, POLICE, "filed", "the filing")
    _wait_state(clients[PROCURATORATE], crime, ECOLOGY, "filed", "the procuratorate's copy")
    _wait_state(clients[ECOLOGY], clue, PROCURATORATE, "accepted", "the acceptance")
    say("  ✓ procuratorate's node: clue accepted (受理) on arrival by its review rule,")
    say("    answered to ecology as signed feedback")
    _send(
        clients[PROCURATORATE],
        "procuratorate → ecology: how the clue was handled, within the month",
        "reply",
        [ECOLOGY],
        {"status": "feedback", "text": "线索已受理，已立案调查（长检公益立〔2026〕9号）。"},
        body_type="feedback",
        in_reply_to=clue,
        case_ref=case,
    )
    _wait_state(clients[ECOLOGY], clue, PROCURATORATE, "feedback_sent", "feedback")
    request = _send(
        clients[PROCURATORATE],
        "procuratorate → ecology: evidence-assistance request",
        "evidence_request",
        [ECOLOGY],
        {
            "title": "协助调查取证函",
            "matters": "请对漳河支流受损河段开展补充采样监测，并评估生态环境损害范围。",
            "legal_basis": "《人民检察院公益诉讼办案规则》",
            "contact": "公益诉讼检察部 联络员",
        },
        case_ref=case,
        deadline=_in_days(20),
    )
    _wait_state(clients[ECOLOGY], request, PROCURATORATE, "received", "the request")
    clients[ECOLOGY].decide(request, "accepted")
    _send(
        clients[ECOLOGY],
        "ecology → procuratorate: signed delay notice (延期), new date in 30 days",
        "reply",
        [PROCURATORATE],
        {
            "status": "delayed",
            "text": "补充采样需待汛期后开展，申请延期。",
            "due": _in_days(30),
        },
        body_type="feedback",
        in_reply_to=request,
        case_ref=case,
    )
    results = evidence / "补充监测结果.csv"
    results.write_text("点位,六价铬(mg/L)\n下游500米,0.92\n下游2公里,0.41\n", encoding="utf-8")
    _send(
        clients[ECOLOGY],
        "ecology → procuratorate: evidence results, with data file",
        "reply",
        [PROCURATORATE],
        {"summary": "补充监测完成", "findings": "下游2公里内六价铬仍超标，损害范围约2公里河段。"},
        body_type="evidence_response",
        in_reply_to=request,
        case_ref=case,
        attachment_paths=[str(results)],
    )
    _send(
        clients[PROCURATORATE],
        "procuratorate → ecology: results acknowledged (确认)",
        "reply",
        [ECOLOGY],
        {"status": "acknowledged", "text": "结果已收悉。"},
        body_type="feedback",
        in_reply_to=request,
        case_ref=case,
    )
    clients[PROCURATORATE].decide(request, "completed")
    say("  ✓ procuratorate: evidence request completed (办结)")
    penalty_records(nodes, clients)
    recommendation = _send(
        clients[PROCURATORATE],
        "procuratorate → ecology: urgent procuratorial recommendation (reply due in 15 days)",
        "recommendation",
        [ECOLOGY],
        {
            "title": "关于督促依法履行漳河支流水污染监管职责的检察建议",
            "facts": "暗管排放含铬废水，下游河段生态环境损害持续扩大。",
            "legal_basis": "《中华人民共和国行政诉讼法》第二十五条",
            "requests": ["立即封堵暗管", "督促企业开展生态修复"],
            "urgent": True,
        },
        case_ref=case,
    )
    say("  … ecology leaves the recommendation unanswered; the procuratorate's node waits")
    began = time.monotonic()
    wait_until(
        lambda: any(
            d.case_id == recommendation and d.state == "escalated"
            for d in clients[PROCURATORATE].deadlines(overdue=True)
        ),
        15 * DAY / speed + 3 * DAY / speed + DELIVERY_SECONDS,
        "the unanswered recommendation was not escalated",
    )
    say(
        f"  ✓ overdue after 15 days, reminded (催办 → ecology), escalated after 3 more "
        f"(督办 → discipline commission): {_simulated(time.monotonic() - began, speed)} "
        "of simulated time"
    )
    wait_until(
        lambda: any(i.family == "notice" for i in clients[DISCIPLINE].list_items("inbox", 10)),
        DELIVERY_SECONDS,
        "the escalation notice did not reach the discipline commission",
    )
    print_deadlines(clients[PROCURATORATE], PROCURATORATE, speed)
    _send(
        clients[ECOLOGY],
        "ecology → procuratorate: the written reply, late",
        "reply",
        [PROCURATORATE],
        {"summary": "已封堵暗管，企业已停产整改。", "measures": "封堵暗管2处，责令停产整治"},
        body_type="recommendation_reply",
        in_reply_to=recommendation,
        case_ref=case,
    )
    _wait_state(clients[PROCURATORATE], recommendation, ECOLOGY, "replied", "the late reply")
    # The notice comes from ecology's own case system, through its drop folder.
    drafts = nodes[ECOLOGY].local_folder / "drafts"
    # Its text names the company under investigation: marked confidential (002 §五(三)), so
    # the discipline commission, cleared for internal, gets the notice without it.
    draft = {
        "family": "notice",
        "to": [POLICE, PROCURATORATE, DISCIPLINE],
        "body": {
            "kind": "KIND_MAJOR_INCIDENT",
            "title": "重大舆情通报：漳河支流水体异常",
            "text": "网络出现漳河支流水体变色报道，经核查系长治市某电镀有限公司暗管排放所致。",
        },
        "case_ref": case,
        "confidentiality": "internal",
        "field_markings": {"text": "confidential"},
    }
    temp = drafts / ".notice.json.tmp"
    temp.write_text(json.dumps(draft, ensure_ascii=False), encoding="utf-8")
    temp.rename(drafts / "notice.json")
    wait_until(
        lambda: (drafts / "processed" / "notice.json").exists(),
        DELIVERY_SECONDS,
        "the drop-folder notice draft was not picked up",
    )
    notice = next(i for i in clients[ECOLOGY].list_items("outbox", 10) if i.family == "notice")
    wait_until(
        lambda: _delivered(clients[ECOLOGY], notice.message_id),
        DELIVERY_SECONDS,
        "notice not delivered",
    )
    notices = [i for i in clients[ECOLOGY].list_items("outbox", 20) if i.family == "notice"]
    [redacted] = [i for i in notices if i.version_of]
    if DISCIPLINE not in redacted.recipients or "text" in json.loads(redacted.body_json):
        raise DemoFailed("the discipline commission's notice was not redacted")
    wait_until(
        lambda: _delivered(clients[ECOLOGY], redacted.message_id),
        DELIVERY_SECONDS,
        "redacted notice not delivered",
    )
    say("  ✓ ecology → police, procuratorate: major-incident notice (from the drop folder)")
    say("  ✓ ecology → discipline: the same notice without its confidential text (redacted)")
    # Every inbound message must reach the receiving agency's local system.
    for agency in (ECOLOGY, POLICE, PROCURATORATE):  # the discipline commission has no plugin
        client = clients[agency]
        wait_until(
            partial(_all_handed_off, client),
            DELIVERY_SECONDS,
            f"{agency}: inbound messages not handed to the local system",
        )


def penalty_records(nodes: dict[str, NodeSetup], clients: dict[str, AdminClient]) -> None:
    """Last quarter's penalty records appear in the bureau's enforcement system: the plugin
    transfers the one over a crime threshold, shares the quarter with the procuratorate, and
    the procuratorate's supervision finds the one the bureau decided not to transfer."""
    quarter = last_finished_quarter(datetime.now(UTC))
    quarter_start = quarter_end(quarter).date()  # of this quarter, the one not yet finished
    last_quarter = [quarter_start - timedelta(days=d) for d in (70, 50, 20)]
    evidence = nodes[ECOLOGY].directory / "evidence" / "penalty-31"
    evidence.mkdir(parents=True)
    (evidence / "危废称重单.csv").write_text("批次,重量(吨)\n1,3.9\n2,2.6\n", encoding="utf-8")
    records = [
        (
            "长环罚〔2026〕31号",
            "某化工有限公司",
            last_quarter[0],
            "非法倾倒废酸等危险废物",
            6.5,
            "否",
            "penalty-31/危废称重单.csv",
            "",
        ),
        (
            "长环罚〔2026〕47号",
            "某五金加工厂",
            last_quarter[1],
            "通过暗管排放电镀废水",
            None,
            "是",
            "",
            "否",
        ),
        ("长环罚〔2026〕52号", "某洗车店", last_quarter[2], "未批先建", None, "否", "", ""),
    ]
    with sqlite3.connect(nodes[ECOLOGY].directory / "enforcement.db") as connection:
        connection.executemany(
            "INSERT INTO penalty_records (decision_no, party, decided_on, facts, hw_tonnes, "
            "hidden_pipe, evidence, leader_decision) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(no, party, str(day), *rest) for no, party, day, *rest in records],
        )
    connection.close()
    say("  … the bureau's enforcement system records 3 penalties of last quarter (SQLite)")
    wait_until(
        lambda: any(
            i.family == "crime_transfer" and i.case_ref == "长环罚〔2026〕31号"
            for i in clients[ECOLOGY].list_items("outbox", 50)
        ),
        DELIVERY_SECONDS,
        "the penalty record over the hazardous-waste threshold was not transferred",
    )
    say("  ✓ ecology plugin: 31号 (6.5 t hazardous waste ≥ 3 t) → crime transfer to police,")
    say("    with its weighing slip attached; 47号 not transferred (the leader decided 否)")
    [transfer] = [
        i
        for i in clients[ECOLOGY].list_items("outbox", 50)
        if i.family == "crime_transfer" and i.case_ref == "长环罚〔2026〕31号"
    ]
    _wait_state(clients[POLICE], transfer.message_id, ECOLOGY, "received", "the 31号 transfer")
    _send(
        clients[POLICE],
        "police → ecology (cc procuratorate): 31号 filed (立案) too",
        "reply",
        [ECOLOGY, PROCURATORATE],
        {"status": "filed", "text": "长公环立字〔2026〕21号"},
        body_type="feedback",
        in_reply_to=transfer.message_id,
        case_ref=transfer.case_ref,
    )

    def untransferred() -> list[str]:
        return [
            f.case_id
            for f in clients[PROCURATORATE].supervision_report()
            if f.finding == "should_be_transferred"
        ]

    wait_until(
        lambda: untransferred() == ["长环罚〔2026〕47号"],
        DELIVERY_SECONDS,
        "the procuratorate's supervision did not find the untransferred record",
    )
    say("  ✓ ecology → procuratorate: last quarter's penalty records shared (信息共享)")
    _wait_state(
        clients[PROCURATORATE], sharing_case_id(quarter), ECOLOGY, "shared", "the sharing clock"
    )
    say(f"  ✓ procuratorate's node: its {quarter} sharing clock (due 15 days after the quarter)")
    say("    is closed by the bureau's data-sharing notice")
    say("  ✓ procuratorate: liandong report supervision finds 47号 (hidden pipe) 应移未移")


def print_timeline(clients: dict[str, AdminClient]) -> None:
    rows = []
    for client in clients.values():
        for item in client.list_items("outbox", 100):
            body = json.loads(item.body_json)
            title = body.get("title") or body.get("summary") or body.get("status", "")
            for d in item.deliveries:
                rows.append((item.created_at, item, d, title))
    rows.sort(key=lambda row: (row[0], row[2].recipient))
    say("Timeline (every line is a signed message and a signed receipt)")
    say(f"  {'time (UTC)':<12} {'from → to':<32} {'what':<22} {'receipt'}")
    for created, item, d, title in rows:
        route = f"{SHORT.get(item.sender, item.sender)} → {SHORT.get(d.recipient, d.recipient)}"
        receipt = f"#{d.receiver_log_index} in their log, sha256:{d.receipt_sha256[:12]}"
        label = marking_label(item.confidentiality, dict(item.field_markings))
        marking = f" [{label}]" if label not in ("public", "internal") else ""
        if item.version_of:
            marking += " [redacted]"
        say(f"  {created[11:23]:<12} {route:<32} {item.body_type:<22} {receipt}")
        say(f"  {'':<12} {'':<32} {title}{marking}")


def print_deadlines(client: AdminClient, agency: str, speed: float) -> None:
    say(f"  liandong deadlines on {SHORT[agency]}'s node:")
    for d in client.deadlines():
        who = SHORT.get(d.responsible, d.responsible)
        # From due_at, not the whole seconds of seconds_left: at this speed a second is a day.
        left = (datetime.fromisoformat(d.due_at) - datetime.now(UTC)).total_seconds()
        late = "late by" if left < 0 else "left:"
        when = _simulated(abs(left), speed)
        say(f"    {d.state:<10} {d.rule:<28} responsible {who:<8} {late} {when}")


def print_cases(clients: dict[str, AdminClient]) -> None:
    say("Cases (liandong cases), as each opener's node records them")
    for agency, client in clients.items():
        for case in client.cases():
            if case.role != "opener":
                continue
            route = f"{SHORT[agency]} → {SHORT.get(case.peer, case.peer)}"
            say(f"  {route:<28} {case.family:<17} {case.state:<14} {case.title[:28]}")


def audit_trail(root: Path, clients: dict[str, AdminClient]) -> None:
    """What an auditor would do: export each agency's log and check them together, offline."""
    say("Audit trail (liandong audit export, then liandong audit verify on all of them)")
    bundles = []
    for agency, client in clients.items():
        path = root / f"{agency.replace('/', '-')}.audit-bundle"
        [*_progress, summary] = client.export_audit(path.resolve())
        bundles.append(path)
        say(
            f"  {agency:<22} entries 0..{summary.end_index - 1}, "
            f"{summary.checkpoints} signed checkpoints, {summary.size_bytes} bytes"
        )
    report = verify_bundles(bundles)
    for problem in [*map(str, report.problems), *report.one_sided]:
        say(f"  FAIL {problem}")
    if not report.ok:
        raise DemoFailed("the audit bundles do not verify")
    signatures = sum(b.signatures for b in report.bundles)
    cosigned = sum(b.cosigned_checkpoints for b in report.bundles)
    say(
        f"  verified offline: {signatures} signatures, every checkpoint against its entries "
        f"({cosigned} cosigned by the other agencies as witnesses), {report.matched} messages "
        "matched between sender and receiver: ok"
    )


def summarize(clients: dict[str, AdminClient]) -> None:
    for agency, client in clients.items():
        info = client.node_info()
        inbox = client.list_items("inbox", 100)
        say(
            f"  {agency:<22} audit entries: {info.audit_entries:<3} inbox: {len(inbox)}  "
            f"pending deliveries: {info.pending_deliveries}"
        )
    # Both sides must hold the same envelope digest for every delivered message.
    mismatches = 0
    for client in clients.values():
        for item in client.list_items("outbox", 100):
            for d in item.deliveries:
                theirs = clients[d.recipient].get_item(item.message_id)
                if theirs.envelope_sha256 != item.envelope_sha256:
                    mismatches += 1
    if mismatches:
        raise DemoFailed(f"{mismatches} message(s) differ between sender and receiver")
    say("  sender and receiver hold the same envelope digest for every message: ok")
