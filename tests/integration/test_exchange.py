"""End to end: nodes as processes, mutual TLS, the CLI, receipts, idempotency."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from node import pki
from node._pb.liandong.v1 import envelope_pb2, exchange_pb2
from node.envelope import RECEIPT_PAYLOAD_TYPE, envelope_digest, envelope_from_json, verify_envelope
from node.federation import Registry
from node.federation_setup import NodeSetup
from tests.conftest import ECOLOGY, POLICE, PROCURATORATE, NodeProcess, wait_for
from tests.peer import audit_events, clue_message, database_rows, exchange_stub, sign, signing_key


def cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def registry_of(node: NodeProcess) -> Registry:
    data = (node.setup.directory / "registry.json").read_bytes()
    return Registry.from_json_bytes(envelope_from_json(data).payload)


def test_cli_send_inbox_outbox_show(running: dict[str, NodeProcess], tmp_path: Path) -> None:
    ecology, procuratorate = running[ECOLOGY], running[PROCURATORATE]
    body = tmp_path / "clue.json"
    body.write_text(json.dumps({"title": "漳河排污线索", "facts": "暗管排放"}), encoding="utf-8")
    evidence = tmp_path / "photo.jpg"
    evidence.write_bytes(b"\xff\xd8" + b"x" * 5000)

    sent = cli(
        "send",
        "clue",
        "--to",
        PROCURATORATE,
        "--body",
        str(body),
        "--attach",
        str(evidence),
        "--json",
        config=ecology.setup.config,
    )
    assert sent.returncode == 0, sent.stderr
    message_id = json.loads(sent.stdout)["message_id"]

    def delivered() -> bool:
        shown = cli("show", message_id, "--json", config=ecology.setup.config)
        return json.loads(shown.stdout)["deliveries"][0]["state"] == "delivered"

    wait_for(delivered, what="delivery")
    outbox = cli("outbox", config=ecology.setup.config)
    assert message_id in outbox.stdout and "delivered" in outbox.stdout
    inbox = json.loads(cli("inbox", "--json", config=procuratorate.setup.config).stdout)
    assert [i["message_id"] for i in inbox] == [message_id]
    assert inbox[0]["body"] == {"title": "漳河排污线索", "facts": "暗管排放"}
    assert inbox[0]["attachments"][0]["file_name"] == "photo.jpg"
    shown = cli("show", message_id, config=procuratorate.setup.config)
    assert "漳河排污线索" in shown.stdout and "[INTERNAL]" in shown.stdout

    # The local system got the message and the attachment, byte for byte.
    local = procuratorate.setup.local_folder / "inbound"
    wait_for(lambda: (local / f"{message_id}.json").exists(), what="hand-off")
    handed = json.loads((local / f"{message_id}.json").read_text(encoding="utf-8"))
    assert Path(handed["attachments"][0]["path"]).read_bytes() == evidence.read_bytes()

    # Both audit logs name the same envelope digest.
    sender_events = {e["event"]: e for e in audit_events(ecology.setup)}
    receiver_events = {e["event"]: e for e in audit_events(procuratorate.setup)}
    digest = sender_events["sent"]["envelope_sha256"]
    assert receiver_events["received"]["envelope_sha256"] == digest
    assert sender_events["receipt_received"]["envelope_sha256"] == digest
    assert {"attachment_stored", "handed_off"} <= receiver_events.keys()


def test_cli_reports_bad_input_in_one_line(running: dict[str, NodeProcess], tmp_path: Path) -> None:
    ecology = running[ECOLOGY]
    body = tmp_path / "bad.json"
    body.write_text(json.dumps({"title": "x", "no_such_field": 1}), encoding="utf-8")
    result = cli(
        "send", "clue", "--to", PROCURATORATE, "--body", str(body), config=ecology.setup.config
    )
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "no_such_field" in result.stderr
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"title": "整改建议"}), encoding="utf-8")
    result = cli(
        "send", "recommendation", "--to", POLICE, "--body", str(good), config=ecology.setup.config
    )
    assert result.returncode == 1
    assert "PERMISSION_DENIED" in result.stderr
    assert "does not permit" in result.stderr
    assert database_rows(ecology.setup, "SELECT count(*) FROM messages") == [(0,)]


def test_repeated_message_gets_the_original_receipt(running: dict[str, NodeProcess]) -> None:
    police, procuratorate = running[POLICE], running[PROCURATORATE]
    stub = exchange_stub(police.setup, procuratorate.setup)
    envelope = sign(clue_message(POLICE, [PROCURATORATE]), signing_key(police.setup))

    first = stub.TransferClue(envelope, timeout=10).receipt
    second = stub.TransferClue(envelope, timeout=10).receipt
    assert first == second

    verify_envelope(
        first, RECEIPT_PAYLOAD_TYPE, registry_of(procuratorate).public_keys(PROCURATORATE)
    )
    receipt = envelope_pb2.Receipt.FromString(first.payload)
    assert receipt.envelope_sha256 == envelope_digest(envelope)
    assert receipt.receiver == PROCURATORATE and receipt.sender == POLICE
    assert database_rows(procuratorate.setup, "SELECT count(*) FROM messages") == [(1,)]


def test_same_id_with_other_content_is_rejected(running: dict[str, NodeProcess]) -> None:
    police, procuratorate = running[POLICE], running[PROCURATORATE]
    stub = exchange_stub(police.setup, procuratorate.setup)
    original = clue_message(POLICE, [PROCURATORATE])
    stub.TransferClue(sign(original, signing_key(police.setup)), timeout=10)
    altered = clue_message(
        POLICE, [PROCURATORATE], message_id=original.message_id, body={"title": "另一条"}
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.TransferClue(sign(altered, signing_key(police.setup)), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already received" in caught.value.details()
    assert database_rows(procuratorate.setup, "SELECT count(*) FROM messages") == [(1,)]
    rejected = [e for e in audit_events(procuratorate.setup) if e["event"] == "rejected"]
    assert len(rejected) == 1
    assert "already received" in rejected[0]["detail"]


def test_transfer_on_each_backend(make_federation, backend: str) -> None:  # type: ignore[no-untyped-def]
    nodes = make_federation((ECOLOGY, POLICE), backend=backend)
    for node in nodes.values():
        node.start()
    with nodes[ECOLOGY].client() as client:
        ids = [
            client.submit(
                family="crime_transfer",
                recipients=[POLICE],
                body_json=json.dumps({"title": f"案件 {n}", "facts": "超标排放"}),
            )
            for n in range(20)
        ]
        wait_for(
            lambda: all(d.state == "delivered" for i in ids for d in client.get_item(i).deliveries),
            what="20 deliveries",
        )
    with nodes[POLICE].client() as client:
        assert {i.message_id for i in client.list_items("inbox", 100)} == set(ids)


def test_recipient_downloads_an_attachment_and_others_may_not(
    running: dict[str, NodeProcess], tmp_path: Path
) -> None:
    ecology, police, procuratorate = running[ECOLOGY], running[POLICE], running[PROCURATORATE]
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.7 " + bytes(range(256)) * 9000)
    with ecology.client() as client:
        message_id = client.submit(
            family="clue",
            recipients=[PROCURATORATE],
            body_json=json.dumps({"title": "附件下载"}),
            attachment_paths=[str(report)],
        )
        wait_for(lambda: client.get_item(message_id).deliveries[0].state == "delivered")
    envelope = envelope_pb2.Envelope.FromString(
        database_rows(ecology.setup, "SELECT envelope FROM messages")[0][0]
    )
    digest = envelope_pb2.Message.FromString(envelope.payload).attachments[0].sha256
    query = exchange_pb2.AttachmentQuery(envelope=envelope, sha256=digest)

    chunks = exchange_stub(procuratorate.setup, ecology.setup).DownloadAttachment(query, timeout=30)
    assert b"".join(chunk.data for chunk in chunks) == report.read_bytes()

    with pytest.raises(grpc.RpcError) as caught:
        list(exchange_stub(police.setup, ecology.setup).DownloadAttachment(query, timeout=30))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not a recipient" in caught.value.details()
    rejected = [e for e in audit_events(ecology.setup) if e["event"] == "rejected"]
    assert [e["peer"] for e in rejected] == [POLICE]


def test_a_ca_issued_certificate_not_in_the_registry_is_refused(
    running: dict[str, NodeProcess], tmp_path: Path
) -> None:
    """The CA issued it, but the operator has not published it: useless until then."""
    police, procuratorate = running[POLICE], running[PROCURATORATE]
    operator = police.setup.directory.parent / "operator"
    unpublished = pki.add_member(operator, police.setup.directory / "request.json")
    caller = tmp_path / "police-copy"
    shutil.copytree(police.setup.directory, caller, ignore=shutil.ignore_patterns("*.sock"))
    (caller / "tls.crt").write_bytes(unpublished.read_bytes())
    stub = exchange_stub(NodeSetup(POLICE, caller, police.setup.endpoint), procuratorate.setup)
    envelope = sign(clue_message(POLICE, [PROCURATORATE]), signing_key(police.setup))
    with pytest.raises(grpc.RpcError) as caught:
        stub.TransferClue(envelope, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "is not registered" in caught.value.details()
    assert database_rows(procuratorate.setup, "SELECT count(*) FROM messages") == [(0,)]
