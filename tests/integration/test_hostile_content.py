"""What a member may put in a message, on real nodes: nothing the receiver cannot store
(a message from itself, a recipient twice, a file name no folder holds, a NUL, a reference
too long for its column) is accepted, on SQLite and on PostgreSQL — each refused at check 4
with INVALID_ARGUMENT and audited — and the sender's own node never signs one; only the
parties of a case move it, however a reply names it; and a hand-off that keeps failing is
shown to the officer and re-offered by the operator, not retried for ever."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from node._pb.liandong.v1 import envelope_pb2, exchange_pb2
from node.exchange.messages import uuid7
from tests.conftest import ECOLOGY, POLICE, PROCURATORATE, NodeProcess, wait_for
from tests.integration.test_agency_plugins import configure, inbound_documents
from tests.integration.test_cases import send, state
from tests.integration.test_exchange import cli
from tests.integration.test_rejections import assert_refused
from tests.peer import audit_events, clue_message, exchange_stub, sign, signing_key

WATER = "140400/water"  # a member that is party to none of the cases below

TRANSFER = {
    "title": "暗管排放含铬废水",
    "facts": "总铬超标3.08倍",
    "suspect": "长治市某电镀有限公司",
    "suspected_offence": "污染环境罪",
}


def attachment(file_name: str) -> Callable[[envelope_pb2.Message], None]:
    return lambda m: m.attachments.add(
        sha256=bytes(32), size=3, media_type="application/pdf", file_name=file_name
    )


HOSTILE: list[tuple[str, Callable[[envelope_pb2.Message], None], str]] = [
    (
        "its own message back",
        lambda m: setattr(m, "sender", PROCURATORATE),
        "the sender '140400/procuratorate' is among the recipients",
    ),
    (
        "a recipient twice",
        lambda m: m.recipients.append(PROCURATORATE),
        "a recipient is listed twice",
    ),
    ("a 362-byte file name", attachment("a" * 358 + ".pdf"), "is 362 bytes of UTF-8"),
    ("a path", attachment("../../etc/cron.d/x"), "contains '/'"),
    ("a control character", attachment("a\rb.pdf"), "contains '\\r'"),
    ("dot-dot", attachment(".."), "is not a file name"),
    (
        "in_reply_to too long",
        lambda m: setattr(m, "in_reply_to", "y" * 40),
        "is not another message's id",
    ),
    ("case_ref too long", lambda m: setattr(m, "case_ref", "案" * 129), "case_ref is 129"),
    ("NUL in the body", lambda m: setattr(m.clue, "facts", "a\x00b"), "clue.facts contains a NUL"),
    ("NUL in case_ref", lambda m: setattr(m, "case_ref", "\x00"), "case_ref contains a NUL"),
    (
        "all_recipients without this node",
        lambda m: (setattr(m, "version_of", uuid7()), m.all_recipients.append(POLICE)),
        "all_recipients leaves out '140400/procuratorate'",
    ),
]


def test_what_no_receiver_can_store_is_refused_at_check_4(
    make_federation: Any, backend: str
) -> None:
    # On PostgreSQL a NUL or an over-long case_ref or in_reply_to used to fail the store of
    # a valid signed message: INTERNAL, nothing audited.
    nodes: dict[str, NodeProcess] = make_federation((ECOLOGY, PROCURATORATE), backend=backend)
    for node in nodes.values():
        node.start(wait=False)
    for node in nodes.values():
        node.wait_serving()
    ecology, procuratorate = nodes[ECOLOGY].setup, nodes[PROCURATORATE].setup
    stub = exchange_stub(ecology, procuratorate)
    for what, tamper, phrase in HOSTILE:
        message = clue_message(ECOLOGY, [PROCURATORATE])
        tamper(message)
        envelope = sign(message, signing_key(ecology))
        (
            assert_refused(
                procuratorate,
                lambda e=envelope: stub.TransferClue(e, timeout=30),  # type: ignore[misc]
                envelope,
                peer=ECOLOGY,
                code=grpc.StatusCode.INVALID_ARGUMENT,
                phrase=phrase,
            ),
            what,
        )
    # The same on Deliver, which takes every family.
    message = clue_message(ECOLOGY, [PROCURATORATE])
    message.clue.title = "\x00"
    request = exchange_pb2.DeliveryBatch(
        requests=[exchange_pb2.DeliveryRequest(seq=1, envelope=sign(message, signing_key(ecology)))]
    )
    [answer] = list(stub.Deliver(iter([request]), timeout=30))
    [result] = answer.results
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "clue.title contains a NUL" in result.message
    # A legitimate message still goes through, and the longest references that fit too.
    fine = clue_message(ECOLOGY, [PROCURATORATE])
    fine.case_ref = "案" * 128
    fine.in_reply_to = uuid7()
    receipt = stub.TransferClue(sign(fine, signing_key(ecology)), timeout=30).receipt
    assert envelope_pb2.Receipt.FromString(receipt.payload).message_id == fine.message_id


def test_the_sender_never_signs_what_a_receiver_must_refuse(
    running: dict[str, NodeProcess], tmp_path: Path
) -> None:
    ecology = running[ECOLOGY]
    body = tmp_path / "clue.json"
    body.write_text(json.dumps({"title": "线索"}, ensure_ascii=False), encoding="utf-8")
    long_name = tmp_path / ("报" * 67 + ".pdf")  # 205 bytes: a file the host can hold
    long_name.write_bytes(b"pdf")
    before = len(audit_events(ecology.setup))
    for extra, phrase in [
        (["--to", PROCURATORATE, "--to", PROCURATORATE], "a recipient is listed twice"),
        (["--to", ECOLOGY], "a node does not send to itself"),
        (["--to", PROCURATORATE, "--attach", str(long_name)], "is 205 bytes of UTF-8"),
        (["--to", PROCURATORATE, "--case-ref", "x" * 129], "case_ref is 129 characters"),
        (["--to", PROCURATORATE, "--in-reply-to", "0" * 36], "is not a message id"),
    ]:
        result = cli("send", "clue", "--body", str(body), *extra, config=ecology.setup.config)
        assert result.returncode != 0, extra
        assert "INVALID_ARGUMENT" in result.stderr and phrase in result.stderr, result.stderr
    body.write_text('{"title": "线索\\u0000"}', encoding="utf-8")
    result = cli(
        "send", "clue", "--to", PROCURATORATE, "--body", str(body), config=ecology.setup.config
    )
    assert result.returncode != 0 and "clue.title contains a NUL" in result.stderr, result.stderr
    # Nothing was signed, stored or sent.
    assert len(audit_events(ecology.setup)) == before
    assert json.loads(cli("outbox", "--json", config=ecology.setup.config).stdout) == []


def test_only_the_parties_of_a_case_move_it(make_federation: Any, tmp_path: Path) -> None:
    nodes: dict[str, NodeProcess] = make_federation((ECOLOGY, POLICE, PROCURATORATE, WATER))
    ecology, police, procuratorate, water = (
        nodes[a] for a in (ECOLOGY, POLICE, PROCURATORATE, WATER)
    )
    # The bureau sends the police nothing above internal: the police get a redacted version
    # of their own, which names the procuratorate's (the first) in version_of.
    configure(ecology, f'[plugins.ecology.recipients]\n"{POLICE}" = "internal"\n')
    for node in nodes.values():
        node.start(wait=False)
    for node in nodes.values():
        node.wait_serving()
    first = send(
        ecology,
        tmp_path,
        "crime-transfer",
        [PROCURATORATE, POLICE],
        TRANSFER,
        "--mark",
        "suspect=confidential",
    )
    outbox = json.loads(cli("outbox", "--json", config=ecology.setup.config).stdout)
    [version] = [item["message_id"] for item in outbox if item["message_id"] != first]
    wait_for(lambda: state(police, version, ECOLOGY) == "received", what="the police's case")
    wait_for(lambda: state(procuratorate, first, ECOLOGY) == "received", what="the copy")
    shown = json.loads(cli("show", version, "--json", config=police.setup.config).stdout)
    assert shown["version_of"] == first

    def reply(node: NodeProcess, to: list[str], in_reply_to: str, status: str) -> str:
        return send(
            node,
            tmp_path,
            "reply",
            to,
            {"status": status, "text": "不构成犯罪"},
            "--body-type",
            "feedback",
            "--in-reply-to",
            in_reply_to,
        )

    def mismatches(node: NodeProcess) -> list[dict[str, Any]]:
        return [e for e in audit_events(node.setup) if e["event"] == "case_mismatch"]

    # The attack of the issue: the water bureau answers the first version's id (and then
    # the case's own id) with a decision not to file, to the police and the bureau.
    attacks = [
        reply(water, [POLICE, ECOLOGY], first, "not_filed"),
        reply(water, [POLICE, ECOLOGY], version, "not_filed"),
        # The procuratorate holds a copy: it does not decide on the police's case either.
        reply(procuratorate, [POLICE], version, "not_filed"),
        # Nor does the water bureau on the procuratorate's copy.
        reply(water, [PROCURATORATE, ECOLOGY], first, "not_filed"),
    ]
    wait_for(lambda: len(mismatches(police)) == 3, what="the police recording three")
    wait_for(lambda: len(mismatches(procuratorate)) == 1, what="the procuratorate recording one")
    assert [e["message_id"] for e in mismatches(police)] == attacks[:3]
    assert [e["peer"] for e in mismatches(police)] == [WATER, WATER, PROCURATORATE]
    assert all("is no party of the case it names" in e["detail"] for e in mismatches(police))
    assert mismatches(procuratorate)[0]["message_id"] == attacks[3]
    assert state(police, version, ECOLOGY) == "received"
    assert state(procuratorate, first, ECOLOGY) == "received"
    # The bureau's own cases moved by nothing either (water holds none with it).
    assert state(ecology, version, POLICE) == "received"
    assert state(ecology, first, PROCURATORATE) == "received"

    # The police decide on the version they got: the bureau's case with them follows.
    reply(police, [ECOLOGY, PROCURATORATE], version, "filed")
    assert state(police, version, ECOLOGY) == "filed"
    wait_for(lambda: state(ecology, version, POLICE) == "filed", what="the filing at the bureau")
    # Every node is healthy and a legitimate message still flows.
    clue = send(water, tmp_path, "clue", [PROCURATORATE], {"title": "河道排污"})
    wait_for(lambda: state(procuratorate, clue, WATER) == "received", what="a clue afterwards")


def break_drop_folder(node: NodeProcess) -> Path:
    inbound = node.setup.local_folder / "inbound"
    shutil.rmtree(inbound)
    inbound.write_text("the drop folder's inbound folder is gone", encoding="utf-8")
    return inbound


def fix_drop_folder(inbound: Path) -> None:
    inbound.unlink()
    inbound.mkdir()


def inbox(node: NodeProcess) -> list[dict[str, Any]]:
    result = cli("inbox", "--json", config=node.setup.config)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def test_a_failing_hand_off_is_shown_and_re_offered_once_fixed(
    running: dict[str, NodeProcess], tmp_path: Path
) -> None:
    ecology, procuratorate = running[ECOLOGY], running[PROCURATORATE]
    inbound = break_drop_folder(procuratorate)
    clue = send(ecology, tmp_path, "clue", [PROCURATORATE], {"title": "河道排污"})
    wait_for(
        lambda: any(i.get("handoff_attempts") for i in inbox(procuratorate)),
        what="a failed hand-off",
    )
    [item] = inbox(procuratorate)
    assert item["message_id"] == clue and "handed_off" not in item
    assert item["handoff_error"].startswith(("NotADirectoryError", "FileExistsError"))
    assert item["handoff_retry_at"]
    table = cli("inbox", config=procuratorate.setup.config).stdout
    assert "retrying (" in table
    shown = cli("show", clue, config=procuratorate.setup.config).stdout
    assert "attempt(s) failed, next at" in shown and "last error:" in shown

    fix_drop_folder(inbound)
    result = cli("handoff", "retry", clue, config=procuratorate.setup.config)
    assert result.returncode == 0, result.stderr
    assert f"message {clue} from {ECOLOGY}: offered to the local system again" in result.stdout
    wait_for(lambda: len(inbound_documents(procuratorate)) == 1, what="the hand-off")
    wait_for(lambda: "handed_off" in inbox(procuratorate)[0], what="its record")
    [item] = inbox(procuratorate)
    assert item["handed_off"].endswith(".json") and "handoff_error" not in item
    # Handed off: nothing to re-offer; an unknown id is not found.
    again = cli("handoff", "retry", clue, config=procuratorate.setup.config)
    assert again.returncode != 0 and "FAILED_PRECONDITION" in again.stderr, again.stderr
    unknown = cli("handoff", "retry", uuid7(), config=procuratorate.setup.config)
    assert unknown.returncode != 0 and "NOT_FOUND" in unknown.stderr, unknown.stderr


def test_a_hand_off_that_fails_for_good_is_recorded_and_audited(
    make_federation: Any, tmp_path: Path
) -> None:
    nodes: dict[str, NodeProcess] = make_federation(
        (ECOLOGY, PROCURATORATE),
        extra_config="\n[handoff]\nmax_attempts = 3\nretry_seconds = 0.2\n",
    )
    for node in nodes.values():
        node.start(wait=False)
    for node in nodes.values():
        node.wait_serving()
    ecology, procuratorate = nodes[ECOLOGY], nodes[PROCURATORATE]
    inbound = break_drop_folder(procuratorate)
    clue = send(ecology, tmp_path, "clue", [PROCURATORATE], {"title": "河道排污"})
    wait_for(lambda: "handed_off" in inbox(procuratorate)[0], what="the final failure")
    [item] = inbox(procuratorate)
    assert item["handed_off"].startswith("failed: ") and item["handoff_attempts"] == 3
    assert "handoff_retry_at" not in item
    [entry] = [e for e in audit_events(procuratorate.setup) if e["event"] == "hand_off_failed"]
    assert entry["message_id"] == clue and entry["detail"].startswith("after 3 attempts: ")
    table = cli("inbox", config=procuratorate.setup.config).stdout
    assert "failed: " in table
    shown = cli("show", clue, config=procuratorate.setup.config).stdout
    assert "failed after 3 attempt(s), not retried" in shown
    assert f"liandong handoff retry {clue}" in shown

    fix_drop_folder(inbound)
    result = cli("handoff", "retry", clue, config=procuratorate.setup.config)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: len(inbound_documents(procuratorate)) == 1, what="the hand-off")
    wait_for(
        lambda: inbox(procuratorate)[0].get("handed_off", "").endswith(".json"), what="its record"
    )
