"""Witnessing between real nodes: cosigned checkpoints, and a split view caught."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from node._pb.liandong.v1 import audit_pb2, audit_pb2_grpc
from node.audit import note
from node.audit.checkpoint import Checkpoint, log_origin, parse_checkpoint
from node.envelope import cosign_checkpoint, sign_note
from node.federation_setup import NodeSetup
from tests.conftest import ECOLOGY, POLICE, PROCURATORATE, NodeProcess, wait_for
from tests.integration.test_audit_log import (
    audit_stub,
    deliver,
    rewrite_bundle,
    verifier_of,
    verify,
)
from tests.integration.test_exchange import cli
from tests.peer import audit_events, database_rows, serve_as, signing_key

MakeFederation = Callable[..., dict[str, NodeProcess]]


def cosigner_of(setup: NodeSetup) -> note.Verifier:
    name = log_origin("demo-federation", setup.agency)
    return note.parse_vkey(note.vkey(name, signing_key(setup).public_bytes(), note.COSIGNATURE_V1))


def test_peers_cosign_each_others_checkpoints(
    make_federation: MakeFederation, tmp_path: Path
) -> None:
    nodes = make_federation(witness_interval=0.3)
    for node in nodes.values():
        node.start()
    procuratorate = nodes[PROCURATORATE].setup
    deliver(nodes[POLICE], nodes[PROCURATORATE], 2)

    def witnesses() -> set[str]:
        return {w for (w,) in database_rows(procuratorate, "SELECT witness FROM cosignatures")}

    # Each witness cosigns the latest checkpoint it fetched; since every Audit call is logged,
    # the two seldom land on the same size, so each is checked on its own checkpoint.
    wait_for(lambda: witnesses() == {ECOLOGY, POLICE}, seconds=30, what="cosignatures")
    stub = audit_stub(nodes[POLICE].setup, procuratorate)
    for witness in (nodes[ECOLOGY].setup, nodes[POLICE].setup):
        [(size,)] = database_rows(
            procuratorate,
            f"SELECT max(size) FROM cosignatures WHERE witness = '{witness.agency}'",
        )
        answer = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(size=size), timeout=30)
        body = note.verify_note(answer.note, verifier_of(procuratorate))
        assert parse_checkpoint(body).size == size
        verifier = cosigner_of(witness)
        [signature] = [s for s in note.split_note(answer.note)[1] if s.name == verifier.name]
        assert note.verify_cosignature(body, signature, verifier) > 1_700_000_000
    # The witness remembers what it saw, and proofs prefer a cosigned checkpoint.
    # (Cosignatures first: the witness records what it saw before it sends a cosignature.)
    [(cosigned,)] = database_rows(
        procuratorate, f"SELECT max(size) FROM cosignatures WHERE witness = '{ECOLOGY}'"
    )
    [(seen,)] = database_rows(
        nodes[ECOLOGY].setup, f"SELECT size FROM witnessed WHERE peer = '{PROCURATORATE}'"
    )
    assert seen >= cosigned
    proof = audit_stub(nodes[POLICE].setup, procuratorate).GetInclusionProof(
        audit_pb2.InclusionProofRequest(index=0), timeout=30
    )
    assert b"\n\xe2\x80\x94 demo-federation/140400/" in proof.tlog_proof.split(b"\n\n", 1)[1]
    assert len(note.split_note(proof.tlog_proof.split(b"\n\n", 1)[1])[1]) >= 2

    # The cosignatures travel in the audit bundle, and `audit verify` checks them. (Both
    # witnesses may have cosigned the same checkpoint: count the checkpoints, not the lines.)
    [(cosigned_sizes,)] = database_rows(
        procuratorate, "SELECT count(DISTINCT size) FROM cosignatures"
    )
    bundle = tmp_path / "procuratorate.bundle"
    exported = cli("audit", "export", "--out", str(bundle), config=procuratorate.config)
    assert exported.returncode == 0, exported.stderr
    code, report = verify(bundle)
    assert code == 0, report
    assert report["bundles"][0]["cosigned_checkpoints"] >= cosigned_sizes >= 1

    def spoil_a_cosignature(name: str, content: bytes) -> bytes:
        if name != "checkpoints.jsonl":
            return content
        lines = content.splitlines()
        for n, line in enumerate(lines):
            item = json.loads(line)
            if item["note"].count("\u2014") > 1:  # a checkpoint with a witness's line
                head, last = item["note"].rstrip("\n").rsplit(" ", 1)
                raw = bytearray(base64.b64decode(last))
                raw[-1] ^= 1
                item["note"] = f"{head} {base64.b64encode(bytes(raw)).decode()}\n"
                lines[n] = json.dumps(item).encode()
                break
        return b"\n".join(lines) + b"\n"

    rewrite_bundle(bundle, spoil_a_cosignature)
    code, report = verify(bundle)
    assert code == 1
    assert any("cosignature by" in p["problem"] for p in report["problems"])


class SplitViewPeer(audit_pb2_grpc.AuditServicer):
    """Stands in for a peer that shows a witness another history than before."""

    def __init__(self, checkpoint_note: bytes) -> None:
        self.checkpoint_note = checkpoint_note

    def GetCheckpoint(self, request, context):  # type: ignore[no-untyped-def]
        return audit_pb2.SignedCheckpoint(note=self.checkpoint_note)

    def GetConsistencyProof(self, request, context):  # type: ignore[no-untyped-def]
        return audit_pb2.ConsistencyProof(hashes=[bytes(32)] * 3)  # proves nothing


def witness_health(setup: NodeSetup) -> int:
    with grpc.insecure_channel(f"unix:{setup.admin_socket}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="liandong.v1.Witness"), timeout=10
        )
    return int(answer.status)


@pytest.mark.parametrize(
    ("grown", "reason"), [(0, "two roots for size"), (5, "does not extend size")]
)
def test_a_split_view_raises_the_alarm(
    make_federation: MakeFederation, grown: int, reason: str
) -> None:
    nodes = make_federation((ECOLOGY, POLICE), witness_interval=0.3)
    for node in nodes.values():
        node.start()
    ecology, police = nodes[ECOLOGY], nodes[POLICE].setup

    def witnessed() -> list[tuple[int, bytes]]:
        return database_rows(  # type: ignore[return-value]
            ecology.setup, f"SELECT size, root FROM witnessed WHERE peer = '{POLICE}'"
        )

    wait_for(lambda: bool(witnessed()), seconds=30, what="ecology witnessing the police")
    assert witness_health(ecology.setup) == health_pb2.HealthCheckResponse.SERVING
    assert nodes[POLICE].stop() == 0
    [(size, root)] = witnessed()
    # The police's key signs another root for a size the witness already saw.
    origin = log_origin("demo-federation", POLICE)
    forked = sign_note(
        Checkpoint(origin, size + grown, bytes(32)).body(), origin, signing_key(police)
    )
    fake = serve_as(
        police, partial(audit_pb2_grpc.add_AuditServicer_to_server, SplitViewPeer(forked))
    )
    try:
        wait_for(
            lambda: any(e["event"] == "split_view" for e in audit_events(ecology.setup)),
            seconds=30,
            what="the split view recorded",
        )
    finally:
        fake.stop(None)
    [alarm] = [e for e in audit_events(ecology.setup) if e["event"] == "split_view"]
    assert alarm["peer"] == POLICE
    assert reason in alarm["detail"]
    # Both signed checkpoints are in the entry, as evidence anyone can check.
    earlier, later = re.findall(r"(?:note\): |later: )([A-Za-z0-9+/=]+)", alarm["detail"])
    for evidence, expected in ((earlier, root), (later, bytes(32))):
        body = note.verify_note(base64.b64decode(evidence), verifier_of(police))
        assert parse_checkpoint(body).root == expected
    assert witness_health(ecology.setup) == health_pb2.HealthCheckResponse.NOT_SERVING
    log_lines = [
        json.loads(line)
        for line in ecology.log_path.read_text().splitlines()
        if line.startswith("{")  # gRPC's own C++ lines are not JSON
    ]
    assert any(line.get("event", "").startswith("split view") for line in log_lines)
    assert root != bytes(32)


def test_cosignature_refusals(running: dict[str, NodeProcess]) -> None:
    police, procuratorate = running[POLICE].setup, running[PROCURATORATE].setup
    stub = audit_stub(police, procuratorate)
    latest = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=30)
    body = note.split_note(latest.note)[0]
    name = log_origin("demo-federation", POLICE)
    good = cosign_checkpoint(body, name, signing_key(police), int(time.time()))
    other_key = cosign_checkpoint(body, name, signing_key(running[ECOLOGY].setup), int(time.time()))
    future = cosign_checkpoint(body, name, signing_key(police), int(time.time()) + 86400)
    for size, line, code, phrase in [
        (latest.size, b"not a signature line", grpc.StatusCode.INVALID_ARGUMENT, "does not start"),
        (latest.size, other_key, grpc.StatusCode.UNAUTHENTICATED, "is not by"),
        (latest.size, future, grpc.StatusCode.INVALID_ARGUMENT, "ahead of this node's clock"),
        (10_000, good, grpc.StatusCode.NOT_FOUND, "no checkpoint of size 10000"),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.AddCosignature(
                audit_pb2.AddCosignatureRequest(size=size, signature_line=line), timeout=30
            )
        assert caught.value.code() == code, caught.value.details()
        assert phrase in caught.value.details()
    stub.AddCosignature(
        audit_pb2.AddCosignatureRequest(size=latest.size, signature_line=good), timeout=30
    )
    assert database_rows(procuratorate, "SELECT size, witness FROM cosignatures") == [
        (latest.size, POLICE)
    ]
    refused = [e for e in audit_events(procuratorate) if "AddCosignature" in e.get("detail", "")]
    assert sum("refused" in e["detail"] for e in refused) == 4
