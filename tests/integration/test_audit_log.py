"""The audit log as a Merkle tree with signed checkpoints, on real nodes and real files.

Each tamper test runs a node, sends it real deliveries, stops it, edits its SQLite file the
way someone with access to the disk could, and checks that the node refuses to start again,
naming the first bad entry index.
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from node._pb.liandong.v1 import audit_pb2, audit_pb2_grpc, envelope_pb2, exchange_pb2
from node.audit import note
from node.audit.checkpoint import log_origin, parse_checkpoint
from node.audit.merkle import leaf_hash, verify_consistency
from node.audit.proof import parse_proof, verify_proof
from node.federation_setup import NodeSetup
from tests.conftest import ECOLOGY, POLICE, PROCURATORATE, NodeProcess, wait_for
from tests.integration.test_exchange import cli
from tests.integration.test_startup import assert_refused_to_start
from tests.peer import (
    anonymous_credentials,
    audit_events,
    clue_message,
    database_rows,
    exchange_stub,
    sign,
    signing_key,
)
from tests.unit.test_merkle import naive_root

MakeFederation = Callable[..., dict[str, NodeProcess]]


def deliver(sender: NodeProcess, receiver: NodeProcess, count: int) -> None:
    """`count` clue transfers, one call each (so one batch, one checkpoint each)."""
    key = signing_key(sender.setup)
    stub = exchange_stub(sender.setup, receiver.setup)
    for _ in range(count):
        stub.TransferClue(sign(clue_message(sender.agency, [receiver.agency]), key), timeout=30)


def verifier_of(setup: NodeSetup) -> note.Verifier:
    origin = log_origin("demo-federation", setup.agency)
    return note.parse_vkey(note.vkey(origin, signing_key(setup).public_bytes()))


@pytest.fixture
def stopped_procuratorate(make_federation: MakeFederation) -> NodeSetup:
    """The procuratorate's node after it received 6 clues from the police, stopped."""
    nodes = make_federation((POLICE, PROCURATORATE))
    for node in nodes.values():
        node.start()
    deliver(nodes[POLICE], nodes[PROCURATORATE], 6)
    assert nodes[PROCURATORATE].stop() == 0
    return nodes[PROCURATORATE].setup


def test_every_batch_leaves_a_signed_checkpoint_of_the_whole_log(
    stopped_procuratorate: NodeSetup,
) -> None:
    setup = stopped_procuratorate
    entries = [
        row[0] for row in database_rows(setup, "SELECT entry FROM audit_entries ORDER BY idx")
    ]
    checkpoints = database_rows(setup, "SELECT size, root, note FROM checkpoints ORDER BY size")
    assert checkpoints, "no checkpoint was signed"
    verifier = verifier_of(setup)
    previous = 0
    for size, root, signed in checkpoints:
        checkpoint = parse_checkpoint(note.verify_note(signed, verifier))
        assert checkpoint.origin == f"demo-federation/{PROCURATORATE}"
        assert checkpoint.size == size > previous
        assert checkpoint.root == root == naive_root([leaf_hash(e) for e in entries[:size]])
        previous = size
    assert previous == len(entries)  # the last checkpoint covers the whole log


def tamper(setup: NodeSetup, *statements: str) -> None:
    with sqlite3.connect(setup.directory / "node.db") as connection:
        for statement in statements:
            connection.execute(statement)


def received_index(setup: NodeSetup, nth: int) -> int:
    rows = database_rows(
        setup, "SELECT idx FROM audit_entries WHERE event = 'received' ORDER BY idx"
    )
    return int(rows[nth][0])


def test_a_changed_byte_in_an_entry_is_named(stopped_procuratorate: NodeSetup) -> None:
    setup = stopped_procuratorate
    index = received_index(setup, 3)
    [(entry,)] = database_rows(setup, f"SELECT entry FROM audit_entries WHERE idx = {index}")
    changed = entry.replace(b'"received"', b'"rejected"')
    assert changed != entry and len(changed) == len(entry)
    with sqlite3.connect(setup.directory / "node.db") as connection:
        connection.execute("UPDATE audit_entries SET entry = ? WHERE idx = ?", (changed, index))
    assert_refused_to_start(setup.config, f"first bad index {index}:", f"entry {index}")


def test_a_deleted_entry_is_named(stopped_procuratorate: NodeSetup) -> None:
    setup = stopped_procuratorate
    index = received_index(setup, 2)
    tamper(setup, f"DELETE FROM audit_entries WHERE idx = {index}")
    assert_refused_to_start(setup.config, f"first bad index {index}:", "is missing")


def test_a_deleted_last_entry_is_named(stopped_procuratorate: NodeSetup) -> None:
    setup = stopped_procuratorate
    [(last,)] = database_rows(setup, "SELECT max(idx) FROM audit_entries")
    tamper(setup, f"DELETE FROM audit_entries WHERE idx = {last}")
    assert_refused_to_start(setup.config, f"first bad index {last}:", "are missing")


def test_two_swapped_entries_are_named(stopped_procuratorate: NodeSetup) -> None:
    setup = stopped_procuratorate
    first, second = received_index(setup, 1), received_index(setup, 4)
    rows = dict(database_rows(setup, "SELECT idx, entry FROM audit_entries"))
    with sqlite3.connect(setup.directory / "node.db") as connection:
        connection.execute(
            "UPDATE audit_entries SET entry = ? WHERE idx = ?", (rows[second], first)
        )
        connection.execute(
            "UPDATE audit_entries SET entry = ? WHERE idx = ?", (rows[first], second)
        )
    assert_refused_to_start(setup.config, f"first bad index {first}:")


def test_a_replaced_checkpoint_is_named(stopped_procuratorate: NodeSetup) -> None:
    """A checkpoint re-signed with another key (say, to hide a rewritten history)."""
    setup = stopped_procuratorate
    [(size, signed)] = database_rows(
        setup, "SELECT size, note FROM checkpoints ORDER BY size LIMIT 1 OFFSET 2"
    )
    text, _ = note.split_note(signed)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from node.envelope import sign_note
    from node.identity import SigningKey

    forger = SigningKey.from_private_key(Ed25519PrivateKey.generate())
    forged = sign_note(text, f"demo-federation/{PROCURATORATE}", forger)
    with sqlite3.connect(setup.directory / "node.db") as connection:
        connection.execute("UPDATE checkpoints SET note = ? WHERE size = ?", (forged, size))
    assert_refused_to_start(
        setup.config, f"first bad index {size - 1}:", f"checkpoint of size {size}", "not signed by"
    )


def test_an_untouched_log_restarts(stopped_procuratorate: NodeSetup) -> None:
    # Counted before the start: once up, the node may go on appending (a hand-off to the
    # local inbound that the stop interrupted is finished then), so a later count can be larger.
    written = len(database_rows(stopped_procuratorate, "SELECT idx FROM audit_entries"))
    node = NodeProcess(stopped_procuratorate).start()
    try:
        log = node.log_path.read_text(encoding="utf-8")
        checked = [json.loads(line) for line in log.splitlines() if "audit log checked" in line]
        assert checked[-1]["entries"] == written
    finally:
        node.stop()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_checkpoints_on_both_backends(make_federation: MakeFederation, backend: str) -> None:
    nodes = make_federation((ECOLOGY, PROCURATORATE), backend=backend)
    for node in nodes.values():
        node.start()
    deliver(nodes[ECOLOGY], nodes[PROCURATORATE], 3)
    setup = nodes[PROCURATORATE].setup
    # The checkpoint first: the node may still be appending (hand-offs), and entries read
    # before a later checkpoint would be too few for it.
    [(size, root, signed)] = database_rows(
        setup, "SELECT size, root, note FROM checkpoints ORDER BY size DESC LIMIT 1"
    )
    entries = [
        row[0] for row in database_rows(setup, "SELECT entry FROM audit_entries ORDER BY idx")
    ]
    assert parse_checkpoint(note.verify_note(signed, verifier_of(setup))).size == size
    assert root == naive_root([leaf_hash(e) for e in entries[:size]])
    # Restarted, it checks the log it wrote and goes on from there.
    assert nodes[PROCURATORATE].stop() == 0
    nodes[PROCURATORATE].start()
    deliver(nodes[ECOLOGY], nodes[PROCURATORATE], 1)
    [(later,)] = database_rows(setup, "SELECT max(size) FROM checkpoints")
    assert later > size


# -- the Audit service (members, mutual TLS) and the auditor's CLI ----------------------


def audit_stub(caller: NodeSetup, target: NodeSetup) -> audit_pb2_grpc.AuditStub:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(caller.directory / "ca.crt").read_bytes(),
        private_key=(caller.directory / "keys" / "tls.key").read_bytes(),
        certificate_chain=(caller.directory / "tls.crt").read_bytes(),
    )
    return audit_pb2_grpc.AuditStub(grpc.secure_channel(target.endpoint, credentials))


def test_members_get_checkpoints_and_proofs_that_verify_offline(
    running: dict[str, NodeProcess],
) -> None:
    police, procuratorate = running[POLICE], running[PROCURATORATE]
    deliver(police, procuratorate, 3)
    key = signing_key(police.setup)
    message = clue_message(POLICE, [PROCURATORATE])
    exchange_stub(police.setup, procuratorate.setup).TransferClue(sign(message, key), timeout=30)
    stub = audit_stub(police.setup, procuratorate.setup)
    verifier = verifier_of(procuratorate.setup)

    latest = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=30)
    checkpoint = parse_checkpoint(note.verify_note(latest.note, verifier))
    assert (checkpoint.size, checkpoint.root) == (latest.size, latest.root)

    answer = stub.GetInclusionProof(
        audit_pb2.InclusionProofRequest(message_id=message.message_id), timeout=30
    )
    proof = parse_proof(answer.tlog_proof)
    assert json.loads(proof.entry or b"")["message_id"] == message.message_id
    assert json.loads(answer.entry)["event"] == "received"
    covered = verify_proof(proof, verifier)
    assert covered.size == answer.size >= answer.index + 1

    earlier = database_rows(procuratorate.setup, "SELECT size, root FROM checkpoints ORDER BY size")
    (old_size, old_root), (new_size, new_root) = earlier[0], earlier[-1]
    consistency = stub.GetConsistencyProof(
        audit_pb2.ConsistencyProofRequest(old_size=old_size, new_size=new_size), timeout=30
    )
    verify_consistency(old_size, new_size, old_root, new_root, list(consistency.hashes))

    # Entries: the police's own, at their indices; empty bytes where it is no party (entry 0,
    # the procuratorate's registry_accepted, for one).
    entries = stub.GetEntries(audit_pb2.GetEntriesRequest(start=0, limit=5), timeout=30)
    assert len(entries.entries) == 5
    assert entries.entries[0] == b""
    shown = [json.loads(e) for e in entries.entries if e]
    assert shown
    assert all(e["v"] == 1 and e["peer"] == POLICE for e in shown)

    # Each call is in the log, with who asked.
    queries = [e for e in audit_events(procuratorate.setup) if e["event"] == "audit_query"]
    assert [q["detail"].split(" ")[0] for q in queries] == [
        "GetCheckpoint",
        "GetInclusionProof",
        "GetConsistencyProof",
        "GetEntries",
    ]
    assert {q["peer"] for q in queries} == {POLICE}


def test_audit_service_refusals(running: dict[str, NodeProcess]) -> None:
    police, procuratorate = running[POLICE], running[PROCURATORATE]
    deliver(police, procuratorate, 1)
    stub = audit_stub(police.setup, procuratorate.setup)
    for call, request, code, phrase in [
        (
            stub.GetInclusionProof,
            audit_pb2.InclusionProofRequest(message_id="01a2087f-397b-7d93-9e6b-dca9fcaac36a"),
            grpc.StatusCode.NOT_FOUND,
            "no message",
        ),
        (
            stub.GetInclusionProof,
            audit_pb2.InclusionProofRequest(index=10_000),
            grpc.StatusCode.NOT_FOUND,
            "not in the checkpoint",
        ),
        (
            stub.GetConsistencyProof,
            audit_pb2.ConsistencyProofRequest(old_size=3, new_size=2),
            grpc.StatusCode.INVALID_ARGUMENT,
            "at most the new one",
        ),
        (
            stub.GetCheckpoint,
            audit_pb2.GetCheckpointRequest(size=10_000),
            grpc.StatusCode.NOT_FOUND,
            "no checkpoint of size 10000",
        ),
        (
            stub.GetCheckpoint,
            audit_pb2.GetCheckpointRequest(size=2**64 - 1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "beyond any log",
        ),
        (
            stub.GetEntries,
            audit_pb2.GetEntriesRequest(start=2**63),
            grpc.StatusCode.INVALID_ARGUMENT,
            "beyond any log",
        ),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=30)
        assert caught.value.code() == code, caught.value.details()
        assert phrase in caught.value.details()
    # A certificate from the federation CA that names no member: refused and logged.
    channel = grpc.secure_channel(
        procuratorate.setup.endpoint, anonymous_credentials(procuratorate.setup)
    )
    with pytest.raises(grpc.RpcError) as refused:
        audit_pb2_grpc.AuditStub(channel).GetCheckpoint(
            audit_pb2.GetCheckpointRequest(), timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    queries = [e for e in audit_events(procuratorate.setup) if e["event"] == "audit_query"]
    assert queries[-1]["peer"] == "unknown"
    assert "refused" in queries[-1]["detail"]


def test_auditor_cli_prints_the_checkpoint_and_a_proof(
    running: dict[str, NodeProcess], tmp_path: Path
) -> None:
    police, procuratorate = running[POLICE], running[PROCURATORATE]
    message = clue_message(POLICE, [PROCURATORATE])
    exchange_stub(police.setup, procuratorate.setup).TransferClue(
        sign(message, signing_key(police.setup)), timeout=30
    )
    config = procuratorate.setup.config
    printed = cli("audit", "checkpoint", config=config)
    assert printed.returncode == 0, printed.stderr
    verifier = verifier_of(procuratorate.setup)
    assert parse_checkpoint(note.verify_note(printed.stdout.encode(), verifier)).size >= 1

    out = tmp_path / "clue.tlog-proof"
    written = cli("audit", "prove", message.message_id, "--out", str(out), config=config)
    assert written.returncode == 0, written.stderr
    proof = parse_proof(out.read_bytes())
    assert out.read_bytes().startswith(b"c2sp.org/tlog-proof@v1\nextra ")
    verify_proof(proof, verifier)
    # The same proof does not prove another entry.
    with pytest.raises(note.NoteError, match="does not lead to the root"):
        verify_proof(proof, verifier, entry=b'{"event":"received"}')

    missing = cli("audit", "prove", "01a2087f-397b-7d93-9e6b-dca9fcaac36a", config=config)
    assert missing.returncode == 1
    assert missing.stderr.startswith("liandong: error: NOT_FOUND: no message")
    neither = cli("audit", "prove", config=config)
    assert neither.returncode == 1
    assert "give either a MESSAGE_ID or --index N" in neither.stderr


def test_the_auditing_guide_snippet_checks_a_real_proof(make_federation: MakeFederation) -> None:
    """docs/auditing.md's dozen lines, run as printed, on a proof from a running node, by a
    member the registry names an auditor (it gets every entry with its proof)."""
    nodes = make_federation((POLICE, PROCURATORATE), auditors=(POLICE,))
    for node in nodes.values():
        node.start()
    police, procuratorate = nodes[POLICE], nodes[PROCURATORATE]
    deliver(police, procuratorate, 5)
    guide = (Path(__file__).parents[2] / "docs" / "auditing.md").read_text(encoding="utf-8")
    section = guide.split("## Check one inclusion proof", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(snippet, namespace)
    verify_inclusion = namespace["verify_inclusion"]
    stub = audit_stub(police.setup, procuratorate.setup)
    latest = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=30)
    for index in range(latest.size):
        request = audit_pb2.InclusionProofRequest(index=index, size=latest.size)
        answer = stub.GetInclusionProof(request, timeout=30)
        hashes = list(answer.hashes)
        assert verify_inclusion(answer.entry, index, latest.size, hashes, latest.root)
        assert not verify_inclusion(answer.entry + b" ", index, latest.size, hashes, latest.root)


def operator_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "federation", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_members_read_their_own_entries_and_auditors_every_entry(
    running: dict[str, NodeProcess],
) -> None:
    """Least exposure: a member reads the entries it is a party to, empty bytes at the others'
    indices; checkpoints and proofs are open to it; the member the operator names an auditor
    (`liandong federation auditor`, then publish) reads the whole log."""
    ecology, police, procuratorate = running[ECOLOGY], running[POLICE], running[PROCURATORATE]
    key = signing_key(police.setup)
    theirs = clue_message(POLICE, [PROCURATORATE])
    exchange_stub(police.setup, procuratorate.setup).TransferClue(sign(theirs, key), timeout=30)
    mine = clue_message(ECOLOGY, [PROCURATORATE])
    exchange_stub(ecology.setup, procuratorate.setup).TransferClue(
        sign(mine, signing_key(ecology.setup)), timeout=30
    )

    def handed_off() -> set[str]:
        events = audit_events(procuratorate.setup)
        return {e["message_id"] for e in events if e["event"] == "handed_off"}

    wait_for(lambda: handed_off() >= {mine.message_id, theirs.message_id}, what="hand-offs")
    stored = [
        row[0]
        for row in database_rows(
            procuratorate.setup, "SELECT entry FROM audit_entries ORDER BY idx"
        )
    ]
    index = {
        (json.loads(e)["event"], json.loads(e).get("message_id")): n for n, e in enumerate(stored)
    }

    ecology_stub = audit_stub(ecology.setup, procuratorate.setup)
    answer = ecology_stub.GetEntries(audit_pb2.GetEntriesRequest(limit=1000), timeout=30)
    assert answer.start == 0 and len(answer.entries) >= len(stored)
    for n, entry in enumerate(stored):
        fields = json.loads(entry)
        party = fields.get("peer") == ECOLOGY and fields["event"] != "handed_off"
        assert answer.entries[n] == (entry if party else b""), (n, fields)
    assert (
        answer.entries[index["received", mine.message_id]]
        == stored[index["received", mine.message_id]]
    )
    # Its own message's hand-off is the procuratorate's own system (a file path): not shown.
    assert answer.entries[index["handed_off", mine.message_id]] == b""
    assert answer.entries[index["received", theirs.message_id]] == b""
    # Its query is logged once answered, under its name, and it may read that entry.
    again = ecology_stub.GetEntries(
        audit_pb2.GetEntriesRequest(start=len(stored), limit=1000), timeout=30
    )
    later = [json.loads(e) for e in again.entries if e]
    assert {
        "event": "audit_query",
        "peer": ECOLOGY,
        "detail": "GetEntries start=0 limit=1000",
    }.items() <= later[0].items()

    # A proof is open to it, without the entry; by message id it learns nothing of another's.
    at = index["received", theirs.message_id]
    proof = ecology_stub.GetInclusionProof(audit_pb2.InclusionProofRequest(index=at), timeout=30)
    assert proof.entry == b"" and b"\nextra " not in proof.tlog_proof
    verify_proof(parse_proof(proof.tlog_proof), verifier_of(procuratorate.setup), stored[at])
    with pytest.raises(grpc.RpcError) as caught:
        ecology_stub.GetInclusionProof(
            audit_pb2.InclusionProofRequest(message_id=theirs.message_id), timeout=30
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"that {ECOLOGY} is a party to" in (caught.value.details() or "")
    own = ecology_stub.GetInclusionProof(
        audit_pb2.InclusionProofRequest(message_id=mine.message_id), timeout=30
    )
    assert own.entry == stored[index["received", mine.message_id]]

    # The operator names the police an auditor and publishes; the node takes the registry.
    operator = procuratorate.setup.directory.parent / "operator"
    named = operator_cli("auditor", POLICE, "--add", "--dir", str(operator))
    assert named.returncode == 0, named.stderr
    assert named.stdout.startswith(f"{POLICE} is an auditor")
    unknown = operator_cli("auditor", "140400/court", "--add", "--dir", str(operator))
    assert unknown.returncode == 1
    assert "'140400/court' is not a member" in unknown.stderr
    out = operator / "registry.json"
    published = operator_cli("publish", "--dir", str(operator), "--out", str(out))
    assert published.returncode == 0, published.stderr
    for node in running.values():
        shutil.copy(out, node.setup.directory / "registry.json")
    wait_for(
        lambda: procuratorate.client().node_info().registry_serial == 2,
        seconds=30,
        what="the new registry",
    )

    police_stub = audit_stub(police.setup, procuratorate.setup)
    latest = police_stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=30)
    whole = police_stub.GetEntries(audit_pb2.GetEntriesRequest(limit=latest.size), timeout=30)
    assert len(whole.entries) == latest.size and all(whole.entries)
    assert whole.entries[: len(stored)] == stored
    # An auditor can recompute the signed tree from what it read.
    assert naive_root([leaf_hash(e) for e in whole.entries]) == latest.root
    proof = police_stub.GetInclusionProof(
        audit_pb2.InclusionProofRequest(message_id=mine.message_id), timeout=30
    )
    assert proof.entry == stored[index["received", mine.message_id]]
    # The others still read only theirs.
    again = ecology_stub.GetEntries(audit_pb2.GetEntriesRequest(limit=1000), timeout=30)
    assert again.entries[at] == b""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_one_sequencer_per_database(make_federation: MakeFederation, backend: str) -> None:
    """A second node process on the same database would fork the log: it refuses to start."""
    nodes = make_federation((ECOLOGY, PROCURATORATE), backend=backend)
    first = nodes[PROCURATORATE].start()
    assert_refused_to_start(first.setup.config, "another node process holds", "writer lock")
    assert first.serving()
    assert first.stop() == 0
    # Released at shutdown: the node starts again.
    nodes[PROCURATORATE].start()


# -- export and offline verification -------------------------------------------------------


def rewrite_bundle(path: Path, change: Callable[[str, bytes], bytes]) -> None:
    """Rewrite a bundle file with `change(member name, content)` applied to every member."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, change(name, content))


@pytest.fixture
def bundles(running: dict[str, NodeProcess], tmp_path: Path) -> dict[str, Path]:
    """Ecology sends the police and the procuratorate real messages; each exports a bundle."""
    ecology = running[ECOLOGY]
    for n in range(3):
        sent = cli(
            "send",
            "notice",
            "--to",
            POLICE,
            "--to",
            PROCURATORATE,
            "--body",
            str(write_body(tmp_path / f"n{n}.json", {"title": f"通报 {n}"})),
            config=ecology.setup.config,
        )
        assert sent.returncode == 0, sent.stderr
    wait_for(lambda: ecology.client().node_info().pending_deliveries == 0, what="deliveries")
    paths = {}
    for agency, node in running.items():
        out = tmp_path / f"{agency.replace('/', '_')}.bundle"
        exported = cli("audit", "export", "--out", str(out), config=node.setup.config)
        assert exported.returncode == 0, exported.stderr
        assert exported.stdout.startswith(f"wrote {out}: entries 0..")
        paths[agency] = out
    return paths


def write_body(path: Path, body: dict[str, str]) -> Path:
    path.write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
    return path


def verify(*paths: Path, workers: int = 0) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli",
            "audit",
            "verify",
            *map(str, paths),
            "--json",
            f"--workers={workers}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, json.loads(result.stdout)


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "two-workers"])
def test_exported_bundles_verify_alone_and_together(bundles: dict[str, Path], workers: int) -> None:
    code, report = verify(*bundles.values(), workers=workers)
    assert code == 0, report
    assert report["ok"] is True
    assert report["matched_across_bundles"] == 6  # 3 notices to 2 recipients
    by_agency = {b["agency"]: b for b in report["bundles"]}
    assert by_agency[ECOLOGY]["messages"] == 3
    assert all(
        b["checkpoints"] >= 1 and b["signatures"] >= b["checkpoints"] for b in by_agency.values()
    )
    # Ecology's bundle comes first: it checks the 3 envelopes, the 6 receipts and the 6
    # receivers' proofs; the receivers' bundles hold the same envelopes and receipts, which
    # are not checked twice.
    alone = {
        agency: verify(path, workers=workers)[1]["bundles"][0] for agency, path in bundles.items()
    }
    assert alone[ECOLOGY]["signatures"] == by_agency[ECOLOGY]["signatures"]
    for agency in (POLICE, PROCURATORATE):
        assert alone[agency]["signatures"] == by_agency[agency]["signatures"] + 3 + 3
    readable = subprocess.run(
        [sys.executable, "-m", "node.cli", "audit", "verify", *map(str, bundles.values())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert readable.returncode == 0, readable.stderr
    assert readable.stdout.rstrip().endswith("OK")
    assert "messages matched across bundles: 6" in readable.stdout


def test_a_changed_entry_in_a_bundle_is_named(bundles: dict[str, Path]) -> None:
    path = bundles[POLICE]
    lines = zipfile.ZipFile(path).read("entries.log").split(b"\n")
    index = next(n for n, line in enumerate(lines) if b'"received"' in line)

    def change(name: str, content: bytes) -> bytes:
        if name != "entries.log":
            return content
        altered = content.split(b"\n")
        altered[index] = altered[index].replace(b"received", b"rejected")
        return b"\n".join(altered)

    rewrite_bundle(path, change)
    code, report = verify(path)
    assert code == 1
    assert report["problems"][0]["index"] == index
    assert "signed checkpoint" in report["problems"][0]["problem"]


def test_a_message_missing_on_one_side_is_listed(bundles: dict[str, Path]) -> None:
    procuratorate = bundles[PROCURATORATE]
    dropped: list[str] = []

    def drop_first_message(name: str, content: bytes) -> bytes:
        if name != "messages.jsonl":
            return content
        first, rest = content.split(b"\n", 1)
        dropped.append(json.loads(first)["message_id"])
        return rest

    rewrite_bundle(procuratorate, drop_first_message)
    code, report = verify(*bundles.values())
    assert code == 1
    assert report["problems"] == []
    [one_sided] = report["one_sided"]
    assert dropped[0] in one_sided
    assert f"{PROCURATORATE}'s bundle has no such message" in one_sided


def test_a_malformed_message_line_is_named_and_the_rest_checked(
    bundles: dict[str, Path],
) -> None:
    """In the first bundle (parsed by the workers) and in a later one (parsed where blobs
    checked before are skipped): the line is named, the other lines are still checked."""
    _, first_report = verify(*bundles.values())
    checked_before = [b["messages"] for b in first_report["bundles"]]

    def receipts_as_pairs(name: str, content: bytes) -> bytes:
        if name != "messages.jsonl":
            return content
        first, rest = content.split(b"\n", 1)
        item = json.loads(first)
        item["receipts"] = [[1, "AAAA"]]  # dict() would take it, with a signer that is no text
        return json.dumps(item).encode() + b"\n" + rest

    for path in bundles.values():
        rewrite_bundle(path, receipts_as_pairs)
    code, report = verify(*bundles.values())
    assert code == 1
    malformed = [
        p for p in report["problems"] if "messages.jsonl line 1 is malformed" in p["problem"]
    ]
    assert [p["bundle"] for p in malformed] == [str(path) for path in bundles.values()]
    assert [b["messages"] for b in report["bundles"]] == [n - 1 for n in checked_before]


def test_a_forged_envelope_in_a_bundle_is_named(bundles: dict[str, Path]) -> None:
    path = bundles[ECOLOGY]

    def forge(name: str, content: bytes) -> bytes:
        if name != "messages.jsonl":
            return content
        first, rest = content.split(b"\n", 1)
        item = json.loads(first)
        envelope = envelope_pb2.Envelope.FromString(base64.b64decode(item["envelope"]))
        envelope.payload = envelope.payload.replace("通报".encode(), "通知".encode())
        item["envelope"] = base64.b64encode(envelope.SerializeToString()).decode()
        return json.dumps(item).encode() + b"\n" + rest

    rewrite_bundle(path, forge)
    for workers in (0, 2):
        code, report = verify(path, workers=workers)
        assert code == 1
        problems = [p["problem"] for p in report["problems"]]
        assert any("envelope signature" in p and "does not verify" in p for p in problems)


def test_export_and_verify_refusals(running: dict[str, NodeProcess], tmp_path: Path) -> None:
    config = running[PROCURATORATE].setup.config
    deliver(running[POLICE], running[PROCURATORATE], 1)
    nowhere = cli("audit", "export", "--out", str(tmp_path / "no" / "b.zip"), config=config)
    assert nowhere.returncode == 1
    assert "does not exist" in nowhere.stderr
    zoneless = cli(
        "audit",
        "export",
        "--out",
        str(tmp_path / "b.zip"),
        "--since",
        "2026-01-01T00:00:00",
        config=config,
    )
    assert zoneless.returncode == 1
    assert "has no time zone" in zoneless.stderr
    future = cli(
        "audit",
        "export",
        "--out",
        str(tmp_path / "b.zip"),
        "--since",
        "2999-01-01T00:00:00Z",
        config=config,
    )
    assert future.returncode == 1
    assert "no audit entry since" in future.stderr
    not_a_bundle = tmp_path / "notes.txt"
    not_a_bundle.write_text("hello", encoding="utf-8")
    code, report = verify(not_a_bundle)
    assert code == 1
    assert "not an audit bundle" in report["problems"][0]["problem"]


def test_the_sender_keeps_the_receivers_proof(
    running: dict[str, NodeProcess], tmp_path: Path
) -> None:
    """With the receipt comes the receiver's tlog-proof; the sender checks and stores it, so
    the sender alone can later show that the receiver logged the message."""
    ecology, procuratorate = running[ECOLOGY], running[PROCURATORATE]
    sent = cli(
        "send",
        "clue",
        "--to",
        PROCURATORATE,
        "--body",
        str(write_body(tmp_path / "c.json", {"title": "线索"})),
        config=ecology.setup.config,
    )
    assert sent.returncode == 0, sent.stderr
    message_id = sent.stdout.split()[1]  # "queued <id> (clue to ...)"
    wait_for(lambda: ecology.client().node_info().pending_deliveries == 0, what="delivery")
    [(index, proof_text)] = database_rows(
        ecology.setup,
        "SELECT receiver_log_index, receiver_proof FROM deliveries "
        f"WHERE message_id = '{message_id}'",
    )
    proof = parse_proof(proof_text)
    assert proof.index == index
    entry = json.loads(proof.entry or b"")
    assert (entry["event"], entry["message_id"]) == ("received", message_id)
    checkpoint = verify_proof(proof, verifier_of(procuratorate.setup))
    assert checkpoint.size > index
    # The sender's bundle alone carries it, and `audit verify` checks it.
    bundle = tmp_path / "ecology.bundle"
    exported = cli("audit", "export", "--out", str(bundle), config=ecology.setup.config)
    assert exported.returncode == 0, exported.stderr
    code, report = verify(bundle)
    assert code == 0, report

    def spoil_the_proof(name: str, content: bytes) -> bytes:
        """Swap the proven entry for a doctored one: its hash no longer fits the path."""
        if name != "messages.jsonl":
            return content
        lines = []
        for line in content.splitlines():
            item = json.loads(line)
            for recipient, text in item["proofs"].items():
                head, _, rest = text.partition("extra ")
                encoded, _, tail = rest.partition("\n")
                doctored = base64.b64decode(encoded).replace(b'"clue"', b'"notice"')
                item["proofs"][recipient] = (
                    f"{head}extra {base64.b64encode(doctored).decode()}\n{tail}"
                )
            lines.append(json.dumps(item).encode())
        return b"\n".join(lines) + b"\n"

    rewrite_bundle(bundle, spoil_the_proof)
    code, report = verify(bundle)
    assert code == 1
    assert any("proof of receipt" in p["problem"] for p in report["problems"])
    # And on the wire, for any peer: the Deliver stream's result carries it.
    key = signing_key(running[POLICE].setup)
    batch = exchange_pb2.DeliveryBatch(
        requests=[{"seq": 1, "envelope": sign(clue_message(POLICE, [PROCURATORATE]), key)}]
    )
    [answer] = exchange_stub(running[POLICE].setup, procuratorate.setup).Deliver(
        iter([batch]), timeout=30
    )
    [result] = answer.results
    streamed = parse_proof(result.receiver_proof)
    receipt = envelope_pb2.Receipt.FromString(result.receipt.payload)
    assert streamed.index == receipt.log_index
    verify_proof(streamed, verifier_of(procuratorate.setup))
