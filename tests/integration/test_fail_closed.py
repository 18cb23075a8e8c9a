"""Fail-closed paths on real nodes, each of which a mutation of its guard once survived
(issue 13, item 4): a registry that expires while the nodes run, and a redaction hook that
fails or answers with something that is not a draft.

The SQL adapter's refusal of rows holding NaN, Infinity or binary values is in
tests/unit/test_sqlsource.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from node._pb.liandong.v1 import admin_pb2, exchange_pb2
from node.admin_client import AdminError
from node.envelope import envelope_from_json
from node.federation import Registry, sign_registry
from node.federation_setup import NodeProcess, NodeSetup
from node.identity import load_signing_key
from tests.conftest import ECOLOGY, POLICE, PROCURATORATE, wait_for
from tests.integration.test_agency_plugins import configure
from tests.integration.test_exchange import cli
from tests.integration.test_rejections import node_state
from tests.integration.test_startup import member_channel
from tests.peer import audit_events, clue_message, database_rows, exchange_stub, sign, signing_key

RPC_TIMEOUT = 20.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(caller: NodeSetup, target: NodeSetup) -> int:
    """The Exchange service's health as a member sees it on the target's peer port."""
    with member_channel(caller, target) as channel:
        request = health_pb2.HealthCheckRequest(service="liandong.v1.Exchange")
        answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=RPC_TIMEOUT)
        return int(answer.status)


def health_is(caller: NodeSetup, target: NodeSetup, status: int) -> bool:
    return health(caller, target) == status


def delivery(node: NodeProcess, message_id: str) -> admin_pb2.Delivery:
    with node.client() as client:
        [found] = client.get_item(message_id).deliveries
        return found


def has_serial(node: NodeProcess, serial: int) -> bool:
    with node.client() as client:
        return client.node_info().registry_serial == serial


def deliver_one(stub: Any, batch: exchange_pb2.DeliveryBatch) -> tuple[int, str]:
    """Send one batch on Deliver: the status code and message of its one result, or of the
    call when the call itself is refused (before its first batch is read)."""
    try:
        [answer] = stub.Deliver(iter([batch]), timeout=RPC_TIMEOUT)
    except grpc.RpcError as error:
        return int(error.code().value[0]), str(error.details())
    [result] = answer.results
    assert not result.HasField("receipt"), result
    return result.code, result.message


# -- 1. a registry that expires while the nodes run ---------------------------------------


def publish_by_hand(setups: list[NodeSetup], serial: int, valid_for: timedelta) -> datetime:
    """Sign registry `serial`, the members of the one in force, valid from now for `valid_for`,
    and move it into each node's registry path (as docs/operations.md asks: write beside, then
    rename, so a node never reads half a file). Returns its expiry."""
    operator = setups[0].directory.parent / "operator"
    current = Registry.from_json_bytes(
        envelope_from_json((operator / "registry.json").read_bytes()).payload
    )
    now = datetime.now(UTC)
    registry = replace(current, serial=serial, issued_at=now, expires_at=now + valid_for)
    signed = sign_registry(registry, load_signing_key(operator / "operator.key"))
    for setup in setups:
        beside = setup.directory / "registry.json.new"
        beside.write_bytes(signed)
        os.replace(beside, setup.directory / "registry.json")
    # As the nodes read it back (the file keeps the time to the microsecond or not).
    return Registry.from_json_bytes(envelope_from_json(signed).payload).expires_at


# Long enough for the nodes to take it (they look every 5 s) before it expires.
SHORT_VALIDITY = timedelta(seconds=10)


def test_a_registry_expiring_while_the_nodes_run_stops_every_exchange_until_a_newer_one(
    make_federation: Any,
) -> None:
    """The ecology bureau sends, the procuratorate receives; both run with no grace period.
    The police node is given a day's grace (`expiry_grace_seconds`): it would still accept
    what the bureau sends, so only the bureau's own check can hold its delivery back."""
    nodes: dict[str, NodeProcess] = make_federation(
        (ECOLOGY, POLICE, PROCURATORATE),
        # Retries every second at most: a held delivery is tried again while the test looks.
        extra_config="\n[delivery]\ninitial_backoff_seconds = 0.2\nmax_backoff_seconds = 1\n",
    )
    ecology, police, procuratorate = nodes[ECOLOGY], nodes[POLICE], nodes[PROCURATORATE]
    setups = [node.setup for node in nodes.values()]
    text = police.setup.config.read_text(encoding="utf-8")
    assert "expiry_grace_seconds = 0\n" in text
    police.setup.config.write_text(
        text.replace("expiry_grace_seconds = 0\n", "expiry_grace_seconds = 86400\n"),
        encoding="utf-8",
    )
    ecology.start(wait=False)
    procuratorate.start()
    ecology.wait_serving()

    # While the registry is valid the bureau stores a transfer for the police, whose node is
    # down: the delivery waits, pending.
    transfer = json.dumps({"title": "漳河危废倾倒案", "facts": "暗管排放"}, ensure_ascii=False)
    with ecology.client() as client:
        held = client.submit(family="crime_transfer", recipients=[POLICE], body_json=transfer)
    wait_for(lambda: delivery(ecology, held).attempts >= 1, what="a first failed attempt")
    assert delivery(ecology, held).state == "pending"

    # Serial 2, valid for seconds, reaches every node; the running ones take it.
    expires_at = publish_by_hand(setups, 2, SHORT_VALIDITY)
    for node in (ecology, procuratorate):
        wait_for(partial(has_serial, node, 2), seconds=30, what=f"{node.agency} on serial 2")
    expired = f"federation registry serial 2 expired at {expires_at.isoformat()}"

    # It expires. Both nodes without grace report NOT_SERVING (the health check runs every
    # 5 s); the bureau's attempts from then on fail on its own registry, before any connection.
    # Once the bureau's registry has expired the police node comes up: inside its grace it
    # serves, and would take the transfer.
    for node in (ecology, procuratorate):
        wait_for(
            partial(health_is, procuratorate.setup, node.setup, NOT_SERVING),
            seconds=30,
            what=f"{node.agency} NOT_SERVING",
        )
        assert "registry unusable" in node.log_path.read_text()
        if node is ecology:
            police.start(wait=False)
    attempts = delivery(ecology, held).attempts
    wait_for(lambda: delivery(ecology, held).attempts >= attempts + 2, what="two more attempts")
    assert expired in delivery(ecology, held).last_error
    police.wait_serving()
    assert health(ecology.setup, police.setup) == SERVING
    attempts = delivery(ecology, held).attempts
    wait_for(
        lambda: (
            delivery(ecology, held).attempts >= attempts + 2
            or delivery(ecology, held).state != "pending"
        ),
        what="two more attempts with the police node up",
    )
    pending = delivery(ecology, held)
    assert pending.state == "pending", pending
    assert expired in pending.last_error and "refuses exchanges" in pending.last_error
    assert database_rows(police.setup, "SELECT count(*) FROM messages") == [(0,)]
    assert not [e for e in audit_events(police.setup) if e["event"] in ("received", "rejected")]
    # A new submission is refused at once, and nothing of it is stored.
    with ecology.client() as client, pytest.raises(AdminError) as caught:
        client.submit(family="crime_transfer", recipients=[POLICE], body_json=transfer)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert expired in str(caught.value)
    assert database_rows(ecology.setup, "SELECT message_id FROM messages") == [(held,)]

    # The procuratorate refuses a message from a member with FAILED_PRECONDITION (protocol
    # 6 check 2a), audits each refusal once and stores nothing: on a unary RPC and on Deliver.
    stub = exchange_stub(police.setup, procuratorate.setup)
    before = node_state(procuratorate.setup)
    logged = len(audit_events(procuratorate.setup))
    refused = sign(clue_message(POLICE, [PROCURATORATE]), signing_key(police.setup))
    with pytest.raises(grpc.RpcError) as unary:
        stub.TransferClue(refused, timeout=RPC_TIMEOUT)
    assert unary.value.code() == grpc.StatusCode.FAILED_PRECONDITION, unary.value
    assert expired in unary.value.details()
    batch = exchange_pb2.DeliveryBatch(
        requests=[exchange_pb2.DeliveryRequest(seq=1, envelope=refused)]
    )
    code, message = deliver_one(stub, batch)
    assert code == grpc.StatusCode.FAILED_PRECONDITION.value[0], message
    assert expired in message
    entries = audit_events(procuratorate.setup)[logged:]
    assert [(e["event"], e["peer"]) for e in entries] == [("rejected", POLICE)] * 2, entries
    for entry in entries:
        assert entry["detail"].startswith("precondition:") and expired in entry["detail"]
        assert "message_id" not in entry  # a refused message is never recorded as a message
    assert node_state(procuratorate.setup) == before

    # The operator publishes serial 3: within seconds every node takes it, serves again, the
    # held transfer goes out and the procuratorate takes messages again.
    publish_by_hand(setups, 3, timedelta(days=30))
    wait_for(lambda: delivery(ecology, held).state == "delivered", seconds=30, what="delivery")
    assert database_rows(police.setup, "SELECT message_id FROM messages") == [(held,)]
    for node in (ecology, procuratorate):
        wait_for(
            partial(health_is, police.setup, node.setup, SERVING),
            seconds=15,
            what=f"{node.agency} SERVING again",
        )
    welcome = sign(clue_message(POLICE, [PROCURATORATE]), signing_key(police.setup))
    receipt = stub.TransferClue(welcome, timeout=RPC_TIMEOUT).receipt
    assert receipt.payload
    with ecology.client() as client:
        client.submit(family="crime_transfer", recipients=[POLICE], body_json=transfer)


# -- 2. a redaction hook that fails or answers with something that is not a draft ---------

# Installed for the test only: a distribution on PYTHONPATH whose entry point, in the node's
# `liandong` group, is the module below. For the procuratorate it answers as the draft's
# title says; for every other recipient it leaves the draft as it is (None).
REDACTOR = """
from dataclasses import asdict, fields
from types import SimpleNamespace

from node.hookspecs import hookimpl
from node.plugin_api import DraftRejected

ANSWERS = {
    "a dict": lambda draft: asdict(draft),
    "an empty dict": lambda draft: {},
    "a string": lambda draft: "redacted",
    "an empty string": lambda draft: "",
    "a look-alike": lambda draft: SimpleNamespace(
        **{f.name: getattr(draft, f.name) for f in fields(draft)}
    ),
}


@hookimpl
def liandong_redact(draft, recipient, api):
    if recipient != "140400/procuratorate":
        return None
    how = draft.body.get("title", "")
    if how == "raises":
        raise RuntimeError("clearance table unreadable")
    if how == "rejects":
        raise DraftRejected("the procuratorate may not get this one")
    answer = ANSWERS.get(how)
    return None if answer is None else answer(draft)
"""

# The hook's answer, the status the submitter gets, and what the message says.
BAD_REDACTIONS = {
    "raises": (
        grpc.StatusCode.UNAVAILABLE,
        f"liandong_redact failed for recipient '{PROCURATORATE}' (RuntimeError: clearance "
        "table unreadable); nothing was sent, try again once the plugin is fixed",
    ),
    "rejects": (
        grpc.StatusCode.INVALID_ARGUMENT,
        "refused by liandong_redact: the procuratorate may not get this one",
    ),
    **{
        how: (
            grpc.StatusCode.UNAVAILABLE,
            f"liandong_redact returned a {kind} for recipient '{PROCURATORATE}', not a Draft "
            "or None; nothing was sent",
        )
        for how, kind in (
            ("a dict", "dict"),
            ("an empty dict", "dict"),
            ("a string", "str"),
            ("an empty string", "str"),
            ("a look-alike", "SimpleNamespace"),
        )
    },
}


def install_redactor(folder: Path) -> Path:
    folder.mkdir()
    (folder / "liandong_test_redactor.py").write_text(REDACTOR, encoding="utf-8")
    dist = folder / "liandong_test_redactor-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: liandong-test-redactor\nVersion: 0.1\n", encoding="utf-8"
    )
    (dist / "entry_points.txt").write_text(
        "[liandong]\ntestredactor = liandong_test_redactor\n", encoding="utf-8"
    )
    return folder


def test_a_redactor_that_fails_or_answers_no_draft_refuses_the_whole_submission(
    make_federation: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is stored, signed or sent, to the recipient the redactor failed for or to any
    other; the submitter is told why; the next good submission goes out as usual."""
    folder = install_redactor(tmp_path / "site")
    path = [str(folder), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, path)))
    nodes: dict[str, NodeProcess] = make_federation((ECOLOGY, POLICE, PROCURATORATE))
    ecology, police, procuratorate = nodes[ECOLOGY], nodes[POLICE], nodes[PROCURATORATE]
    configure(ecology, 'enabled = ["ecology", "testredactor"]\n')  # into [plugins]
    for node in nodes.values():
        node.start(wait=False)
    for node in nodes.values():
        node.wait_serving()
    assert "testredactor" in ecology.log_path.read_text()  # the plugin runs

    recipients = [POLICE, PROCURATORATE]
    with ecology.client() as client:
        for how, (code, message) in BAD_REDACTIONS.items():
            body = json.dumps({"title": how, "facts": "总铬超标3.08倍"}, ensure_ascii=False)
            with pytest.raises(AdminError) as caught:
                client.submit(family="crime_transfer", recipients=recipients, body_json=body)
            assert caught.value.code == code, (how, caught.value)
            assert str(caught.value) == f"{code.name}: {message}", how
        # From the command line: one line naming the recipient and the failure.
        body_file = tmp_path / "raises.json"
        body_file.write_text(json.dumps({"title": "raises"}), encoding="utf-8")
        sent = cli(
            "send",
            "crime-transfer",
            *("--to", POLICE, "--to", PROCURATORATE),
            *("--body", str(body_file)),
            config=ecology.setup.config,
        )
        assert sent.returncode == 1
        expected = f"liandong: error: UNAVAILABLE: {BAD_REDACTIONS['raises'][1]}\n"
        assert sent.stderr == expected, sent.stderr
        # Nothing of any of them was stored, signed, audited or queued.
        assert database_rows(ecology.setup, "SELECT count(*) FROM messages") == [(0,)]
        assert database_rows(ecology.setup, "SELECT count(*) FROM deliveries") == [(0,)]
        assert not [e for e in audit_events(ecology.setup) if e["event"] == "sent"]

        good = json.dumps({"title": "漳河危废倾倒案", "facts": "暗管排放"}, ensure_ascii=False)
        message_id = client.submit(family="crime_transfer", recipients=recipients, body_json=good)
        wait_for(
            lambda: {d.state for d in client.get_item(message_id).deliveries} == {"delivered"},
            what="the good transfer delivered to both",
        )
    # The receivers got that one and nothing before it.
    for receiver in (police, procuratorate):
        assert database_rows(receiver.setup, "SELECT message_id FROM messages") == [(message_id,)]
        assert [e["event"] for e in audit_events(receiver.setup)].count("received") == 1
    assert "plugin hook failed" in ecology.log_path.read_text()
