"""The receiver's verification order (docs/protocol.md section 6), one crafted refusal per check.

Every refusal must carry the exact gRPC status, a details message a person can act on,
exactly one `rejected` audit entry naming the reason, and leave nothing else behind: no
message row, no attachment, no blob, no file in the local system's drop folder.

One procuratorate node runs for the whole module; the callers are hand-made peers using
the police's and ecology's real TLS certificates and signing keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node._pb.liandong.v1 import envelope_pb2, exchange_pb2, exchange_pb2_grpc
from node.envelope import (
    MESSAGE_PAYLOAD_TYPE,
    RECEIPT_PAYLOAD_TYPE,
    envelope_digest,
    envelope_from_json,
    sign_envelope,
    verify_envelope,
)
from node.federation import DEFAULT_PERMISSIONS, Registry, sign_registry
from node.federation_setup import NodeSetup, create_federation
from node.identity import SigningKey, load_signing_key
from tests.conftest import ECOLOGY, POLICE, PROCURATORATE, NodeProcess, wait_for
from tests.peer import (
    attachment_message,
    audit_events,
    clue_message,
    database_rows,
    exchange_stub,
    sign,
    signing_key,
)

RPC_TIMEOUT = 20.0
# Messages up to 31 days old must be signable: keys are back-dated this far in the registry.
KEY_BACKDATE = timedelta(days=60)


# -- the federation under test ------------------------------------------------------------


@dataclass(frozen=True)
class Federation:
    receiver: NodeProcess
    setups: dict[str, NodeSetup]

    @property
    def target(self) -> NodeSetup:
        return self.receiver.setup


def _backdate_signing_keys(root: Path, setups: list[NodeSetup]) -> None:
    """Re-sign the registry with every key valid since 60 days ago, as for a back-filled member.

    Keys are otherwise valid only from enrolment (seconds ago), and check 6 (key valid at
    created_at) would refuse an old message before check 9 (maximum age) is reached.
    """
    operator = root / "operator"
    payload = envelope_from_json((operator / "registry.json").read_bytes()).payload
    registry = Registry.from_json_bytes(payload)
    members = tuple(
        replace(
            member,
            signing_keys=tuple(
                replace(key, not_before=key.not_before - KEY_BACKDATE)
                for key in member.signing_keys
            ),
        )
        for member in registry.members
    )
    signed = sign_registry(
        replace(registry, members=members), load_signing_key(operator / "operator.key")
    )
    for setup in setups:
        (setup.directory / "registry.json").write_bytes(signed)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("rej")
    setups = create_federation(root, [ECOLOGY, POLICE, PROCURATORATE])
    _backdate_signing_keys(root, setups)
    by_agency = {s.agency: s for s in setups}
    receiver = NodeProcess(by_agency[PROCURATORATE])
    try:
        receiver.start()
        yield Federation(receiver, by_agency)
    finally:
        receiver.stop()


# -- what "nothing else changed" means ----------------------------------------------------


def _files(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def node_state(setup: NodeSetup) -> dict[str, Any]:
    return {
        "messages": database_rows(setup, "SELECT message_id FROM messages ORDER BY message_id"),
        "attachments": database_rows(setup, "SELECT sha256 FROM attachments ORDER BY sha256"),
        "blobs": _files(setup.directory / "blobs"),
        "local_inbound": _files(setup.local_folder / "inbound"),
    }


def assert_refused(
    receiver: NodeSetup,
    call: Callable[[], Any],
    envelope: envelope_pb2.Envelope,
    *,
    peer: str,
    code: grpc.StatusCode,
    phrase: str,
) -> None:
    """`call` fails with `code` and `phrase`, one `rejected` entry is logged, nothing else."""
    before = node_state(receiver)
    logged = len(audit_events(receiver))
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == code, f"{error.code()}: {error.details()}"
    assert phrase in error.details(), error.details()

    new_entries = audit_events(receiver)[logged:]
    assert [e["event"] for e in new_entries] == ["rejected"], new_entries
    entry = new_entries[0]
    assert entry["envelope_sha256"] == envelope_digest(envelope).hex()
    assert entry["peer"] == peer
    reason = entry["detail"].split(":", 1)[0]
    assert reason == _REASON_FOR_STATUS[code], entry["detail"]
    assert phrase in entry["detail"]
    assert "message_id" not in entry  # a refused message is never recorded as a message

    assert node_state(receiver) == before


_REASON_FOR_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.FAILED_PRECONDITION: "precondition",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "too_large",
}


def deliver(fed: Federation, envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    """Deliver a valid police clue; wait until the receiver has handed it to its local system.

    Waiting keeps the shared node quiet, so the next test's before/after comparison sees
    only what its own request caused.
    """
    message_id = envelope_pb2.Message.FromString(envelope.payload).message_id
    stub = exchange_stub(fed.setups[POLICE], fed.target)
    receipt: envelope_pb2.Envelope = stub.TransferClue(envelope, timeout=RPC_TIMEOUT).receipt
    assert envelope_pb2.Receipt.FromString(receipt.payload).message_id == message_id

    def handed_off() -> bool:
        return any(
            e["event"] == "handed_off" and e.get("message_id") == message_id
            for e in audit_events(fed.target)
        )

    wait_for(handed_off, seconds=30, what=f"hand-off of {message_id}")
    return receipt


# -- the crafted requests ----------------------------------------------------------------


def _police_clue(fed: Federation, **options: Any) -> envelope_pb2.Envelope:
    return sign(clue_message(POLICE, [PROCURATORATE], **options), signing_key(fed.setups[POLICE]))


def payload_altered(fed: Federation) -> envelope_pb2.Envelope:
    envelope = _police_clue(fed, body={"title": "线索", "facts": "河道排污"})
    envelope.payload = envelope.payload.replace("河道排污".encode(), "河道清洁".encode())
    return envelope


def unknown_key(fed: Federation) -> envelope_pb2.Envelope:
    stranger = SigningKey.from_private_key(Ed25519PrivateKey.generate())
    return sign(clue_message(POLICE, [PROCURATORATE]), stranger)


def wrong_payload_type(fed: Federation) -> envelope_pb2.Envelope:
    payload = clue_message(POLICE, [PROCURATORATE]).SerializeToString(deterministic=True)
    return sign_envelope(payload, RECEIPT_PAYLOAD_TYPE, signing_key(fed.setups[POLICE]))


def no_signature(fed: Federation) -> envelope_pb2.Envelope:
    envelope = _police_clue(fed)
    del envelope.signatures[:]
    return envelope


def sender_is_not_tls_peer(fed: Federation) -> envelope_pb2.Envelope:
    # Signed with the police's own key, sent over the police's TLS connection, but the
    # message claims to come from the ecology bureau.
    return sign(clue_message(ECOLOGY, [PROCURATORATE]), signing_key(fed.setups[POLICE]))


def garbage_payload(fed: Federation) -> envelope_pb2.Envelope:
    return sign_envelope(
        b"this is not a protobuf message", MESSAGE_PAYLOAD_TYPE, signing_key(fed.setups[POLICE])
    )


def not_a_recipient(fed: Federation) -> envelope_pb2.Envelope:
    return sign(clue_message(POLICE, [ECOLOGY]), signing_key(fed.setups[POLICE]))


def police_crime_transfer(fed: Federation) -> envelope_pb2.Envelope:
    message = clue_message(
        POLICE, [PROCURATORATE], family="crime_transfer", body={"title": "案件", "facts": "排污"}
    )
    return sign(message, signing_key(fed.setups[POLICE]))


def ecology_recommendation(fed: Federation) -> envelope_pb2.Envelope:
    message = clue_message(
        ECOLOGY, [PROCURATORATE], family="recommendation", body={"title": "检察建议"}
    )
    return sign(message, signing_key(fed.setups[ECOLOGY]))


def from_the_future(fed: Federation) -> envelope_pb2.Envelope:
    return _police_clue(fed, created_at=datetime.now(UTC) + timedelta(seconds=900))


def too_old(fed: Federation) -> envelope_pb2.Envelope:
    return _police_clue(fed, created_at=datetime.now(UTC) - timedelta(days=31))


def too_large(fed: Federation) -> envelope_pb2.Envelope:
    return _police_clue(fed, body={"title": "大", "facts": "x" * (5 * 1024 * 1024)})


def weak_field_marking(fed: Federation) -> envelope_pb2.Envelope:
    message = clue_message(POLICE, [PROCURATORATE])
    message.field_markings.add(field="facts", confidentiality=envelope_pb2.CONFIDENTIALITY_PUBLIC)
    return sign(message, signing_key(fed.setups[POLICE]))


def unknown_marking(fed: Federation) -> envelope_pb2.Envelope:
    # Read as "internal", a stricter marking of a newer protocol would leak.
    message = clue_message(POLICE, [PROCURATORATE])
    message.confidentiality = 7  # type: ignore[assignment]
    return sign(message, signing_key(fed.setups[POLICE]))


def attachment_not_uploaded(fed: Federation) -> envelope_pb2.Envelope:
    message, _digest = attachment_message(
        POLICE, [PROCURATORATE], b"never uploaded", title="附件线索", file_name="a.txt"
    )
    return sign(message, signing_key(fed.setups[POLICE]))


@dataclass(frozen=True)
class Case:
    build: Callable[[Federation], envelope_pb2.Envelope]
    code: grpc.StatusCode
    phrase: str
    caller: str = POLICE
    rpc: str = "TransferClue"


UNAUTH = grpc.StatusCode.UNAUTHENTICATED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

CASES: dict[str, Case] = {
    "payload-altered": Case(payload_altered, UNAUTH, "does not verify"),
    "unknown-key": Case(unknown_key, UNAUTH, "not a key of this sender in the federation registry"),
    "wrong-payload-type": Case(wrong_payload_type, UNAUTH, f"expected {MESSAGE_PAYLOAD_TYPE!r}"),
    "no-signature": Case(no_signature, UNAUTH, "has no signature"),
    "sender-not-tls-peer": Case(
        sender_is_not_tls_peer, UNAUTH, f"sender '{ECOLOGY}' is not the TLS peer '{POLICE}'"
    ),
    "garbage-payload": Case(garbage_payload, INVALID, "payload is not a liandong.v1.Message"),
    "not-a-recipient": Case(not_a_recipient, PRECONDITION, "not a recipient"),
    "crime-transfer-from-police": Case(
        police_crime_transfer,
        grpc.StatusCode.PERMISSION_DENIED,
        f"does not permit '{POLICE}' to send crime_transfer to '{PROCURATORATE}'",
        rpc="TransferCrime",
    ),
    "recommendation-from-ecology": Case(
        ecology_recommendation,
        grpc.StatusCode.PERMISSION_DENIED,
        f"does not permit '{ECOLOGY}' to send recommendation to '{PROCURATORATE}'",
        caller=ECOLOGY,
        rpc="IssueRecommendation",
    ),
    "created-in-the-future": Case(from_the_future, INVALID, "check the sender's clock"),
    "older-than-max-age": Case(too_old, INVALID, "is older than the"),
    "clue-on-crime-rpc": Case(
        _police_clue,
        INVALID,
        "belongs on the clue RPC, not on the crime_transfer RPC",
        rpc="TransferCrime",
    ),
    "envelope-too-large": Case(
        too_large, grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds this node's limit"
    ),
    "attachment-not-uploaded": Case(attachment_not_uploaded, PRECONDITION, "has not been uploaded"),
    "field-marked-below-its-message": Case(
        weak_field_marking, INVALID, "field 'facts' is marked public, not above"
    ),
    "unknown-marking": Case(unknown_marking, INVALID, "confidentiality 7 is not a known marking"),
}


def _rpc(fed: Federation, case: Case) -> Callable[..., Any]:
    stub = exchange_stub(fed.setups[case.caller], fed.target)
    return getattr(stub, case.rpc)  # type: ignore[no-any-return]


def test_default_permissions_forbid_the_families_used_here() -> None:
    """The PERMISSION_DENIED cases rely on the operator's defaults; keep them honest."""
    registry = Registry("f", 1, datetime.now(UTC), datetime.now(UTC), (), DEFAULT_PERMISSIONS)
    assert not registry.is_permitted("crime_transfer", POLICE, PROCURATORATE)
    assert not registry.is_permitted("recommendation", ECOLOGY, PROCURATORATE)
    assert registry.is_permitted("clue", POLICE, PROCURATORATE)
    assert registry.is_permitted("crime_transfer", ECOLOGY, PROCURATORATE)


@pytest.mark.parametrize("name", list(CASES))
def test_refused(federation: Federation, name: str) -> None:
    case = CASES[name]
    envelope = case.build(federation)
    call = _rpc(federation, case)
    assert_refused(
        federation.target,
        lambda: call(envelope, timeout=RPC_TIMEOUT),
        envelope,
        peer=case.caller,
        code=case.code,
        phrase=case.phrase,
    )


def test_upload_not_matching_its_digest_is_discarded(federation: Federation) -> None:
    police = federation.setups[POLICE]
    content = b"%PDF-1.7 sampling report " * 400
    forged = b"%PDF-1.7 doctored report " * 400
    assert len(forged) == len(content)
    message, digest = attachment_message(
        POLICE,
        [PROCURATORATE],
        content,
        title="监测报告",
        file_name="report.pdf",
        media_type="application/pdf",
    )
    envelope = sign(message, signing_key(police))
    stub = exchange_stub(police, federation.target)
    chunks = [
        exchange_pb2.AttachmentChunk(
            envelope=envelope, sha256=digest, offset=0, data=forged[:4000]
        ),
        exchange_pb2.AttachmentChunk(data=forged[4000:]),
    ]
    assert_refused(
        federation.target,
        lambda: stub.UploadAttachment(iter(chunks), timeout=RPC_TIMEOUT),
        envelope,
        peer=POLICE,
        code=INVALID,
        phrase="does not match SHA-256",
    )
    assert _files(federation.target.directory / "blobs") == []
    # Nothing was kept: the message that references it still cannot be delivered.
    assert_refused(
        federation.target,
        lambda: stub.TransferClue(envelope, timeout=RPC_TIMEOUT),
        envelope,
        peer=POLICE,
        code=PRECONDITION,
        phrase="has not been uploaded",
    )


# -- TLS: refused before any RPC runs ----------------------------------------------------


def _foreign_client_certificate(agency: str) -> tuple[bytes, bytes]:
    """A key and a certificate naming `agency`, issued by a CA outside the federation."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "impostor CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agency)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"urn:liandong:agency:{agency}")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    chain = leaf.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(
        serialization.Encoding.PEM
    )
    return key_pem, chain


def _stub(
    target: NodeSetup, credentials: grpc.ChannelCredentials
) -> exchange_pb2_grpc.ExchangeStub:
    return exchange_pb2_grpc.ExchangeStub(grpc.secure_channel(target.endpoint, credentials))


@pytest.mark.parametrize("client", ["foreign-ca", "no-certificate"])
def test_tls_client_outside_the_federation_cannot_call(federation: Federation, client: str) -> None:
    target = federation.target
    ca = (target.directory / "ca.crt").read_bytes()
    if client == "foreign-ca":
        key_pem, chain = _foreign_client_certificate(POLICE)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key_pem, certificate_chain=chain
        )
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    # A perfectly valid police message: only the TLS identity is wrong.
    envelope = _police_clue(federation)
    before = node_state(target)
    logged = audit_events(target)
    with pytest.raises(grpc.RpcError) as caught:
        _stub(target, credentials).TransferClue(envelope, timeout=RPC_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    after = audit_events(target)
    digest = envelope_digest(envelope).hex()
    assert not [e for e in after if e.get("envelope_sha256") == digest]
    assert after == logged  # the handshake failed: no RPC ran, nothing to audit
    assert node_state(target) == before
    # The same envelope over the police's real certificate is accepted, so only TLS refused it.
    deliver(federation, envelope)


# -- after all that, the node still works ------------------------------------------------


def test_receiver_still_serves_after_refusals(federation: Federation) -> None:
    target = federation.target
    for case in CASES.values():  # replay every refusal, so this test stands on its own
        with pytest.raises(grpc.RpcError):
            _rpc(federation, case)(case.build(federation), timeout=RPC_TIMEOUT)
    assert federation.receiver.process is not None
    assert federation.receiver.process.poll() is None

    envelope = _police_clue(federation, body={"title": "有效线索", "facts": "夜间偷排"})
    message_id = envelope_pb2.Message.FromString(envelope.payload).message_id
    receipt = deliver(federation, envelope)

    registry = Registry.from_json_bytes(
        envelope_from_json((target.directory / "registry.json").read_bytes()).payload
    )
    verify_envelope(receipt, RECEIPT_PAYLOAD_TYPE, registry.public_keys(PROCURATORATE))
    body = envelope_pb2.Receipt.FromString(receipt.payload)
    assert body.message_id == message_id
    assert body.envelope_sha256 == envelope_digest(envelope)
    assert database_rows(
        target, f"SELECT count(*) FROM messages WHERE message_id = '{message_id}'"
    ) == [(1,)]
    received = [e for e in audit_events(target) if e["event"] == "received"]
    assert received[-1]["message_id"] == message_id
    assert (target.local_folder / "inbound" / f"{message_id}.json").exists()
