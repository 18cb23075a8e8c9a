"""A hostile member gets nothing: one case per class of attack on the peer port.

Every case asserts the status, the audit entry (under the TLS identity that sent it), that
nothing else changed where it matters, and that afterwards the node still answers its
health check and takes a legitimate message. One procuratorate node runs for the module,
with short time limits and small per-member shares so that the limits are reached fast;
the callers use the police's and ecology's real certificates and keys, or certificates the
federation CA issued to strangers.

(Classes already defended — signatures, recipients, permissions, replays, timestamps — are
in test_rejections.py.)
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from node._pb.liandong.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    envelope_pb2,
    exchange_pb2,
    exchange_pb2_grpc,
)
from node.envelope import envelope_digest
from node.exchange.errors import MAX_REASON
from node.federation_setup import NodeSetup, create_federation
from tests.conftest import ECOLOGY, POLICE, PROCURATORATE, NodeProcess, wait_for
from tests.peer import (
    anonymous_credentials,
    attachment_message,
    audit_events,
    clue_message,
    database_rows,
    sign,
    signing_key,
)

TIMEOUT = 30.0
FIRST_MESSAGE_SECONDS = 2
IDLE_SECONDS = 3
PEER_STREAMS = 4
PEER_CALLS = 8
LIMITS = f"""
[limits]
first_message_seconds = {FIRST_MESSAGE_SECONDS}
stream_idle_seconds = {IDLE_SECONDS}
peer_streams = {PEER_STREAMS}
peer_calls = {PEER_CALLS}
peer_checks = 4
"""


@dataclass(frozen=True)
class Federation:
    receiver: NodeProcess
    setups: dict[str, NodeSetup]

    @property
    def target(self) -> NodeSetup:
        return self.receiver.setup


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("hostile")
    setups = {
        s.agency: s
        for s in create_federation(root, [ECOLOGY, POLICE, PROCURATORATE], extra_config=LIMITS)
    }
    receiver = NodeProcess(setups[PROCURATORATE])
    try:
        receiver.start()
        yield Federation(receiver, setups)
    finally:
        receiver.stop()


# -- callers ------------------------------------------------------------------------------


def member_credentials(setup: NodeSetup) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(setup.directory / "ca.crt").read_bytes(),
        private_key=(setup.directory / "keys" / "tls.key").read_bytes(),
        certificate_chain=(setup.directory / "tls.crt").read_bytes(),
    )


def stranger_credentials(target: NodeSetup, uri: str | None) -> grpc.ChannelCredentials:
    """A certificate the federation CA issued (so TLS accepts it) with the given URI SAN."""
    return anonymous_credentials(target, uri)


def channel(fed: Federation, caller: str | grpc.ChannelCredentials = POLICE) -> grpc.Channel:
    credentials = member_credentials(fed.setups[caller]) if isinstance(caller, str) else caller
    return grpc.secure_channel(fed.target.endpoint, credentials)


def _raw(data: bytes) -> bytes:
    return data


def raw_unary(ch: grpc.Channel, path: str, data: bytes, server_streaming: bool) -> Any:
    if server_streaming:
        call = ch.unary_stream(path, request_serializer=_raw, response_deserializer=_raw)
        return list(call(data, timeout=TIMEOUT))
    return ch.unary_unary(path, request_serializer=_raw, response_deserializer=_raw)(
        data, timeout=TIMEOUT
    )


# -- what must hold after every case ------------------------------------------------------


# What a call itself writes; a received message's hand-off and case entries follow later.
CALL_EVENTS = ("rejected", "audit_query", "received", "attachment_stored")


def entries_after(fed: Federation, count: int) -> list[dict[str, Any]]:
    return [e for e in audit_events(fed.target)[count:] if e["event"] in CALL_EVENTS]


def assert_healthy_and_open(fed: Federation) -> None:
    """Health answers SERVING and a legitimate message from ecology is received."""
    with channel(fed, ECOLOGY) as ch:
        answer = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        envelope = sign(clue_message(ECOLOGY, [PROCURATORATE]), signing_key(fed.setups[ECOLOGY]))
        receipt = exchange_pb2_grpc.ExchangeStub(ch).TransferClue(envelope, timeout=TIMEOUT)
        assert receipt.receipt.payload_type.endswith("receipt+protobuf")


def refusal(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# -- 1. nothing escapes as UNKNOWN, INTERNAL or a traceback ------------------------------


def _request_unary_methods() -> list[MethodDescriptor]:
    services = [
        exchange_pb2.DESCRIPTOR.services_by_name["Exchange"],
        audit_pb2.DESCRIPTOR.services_by_name["Audit"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
    ]
    return [m for s in services for m in s.methods if not m.client_streaming]


@pytest.mark.parametrize("method", _request_unary_methods(), ids=lambda m: m.full_name)
def test_bytes_that_are_no_request_are_invalid_argument_and_audited(
    fed: Federation, method: MethodDescriptor
) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    logged = len(audit_events(fed.target))
    with channel(fed) as ch:
        error = refusal(lambda: raw_unary(ch, path, b"\xff\xff\xff\x07", method.server_streaming))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert f"not a valid {method.input_type.full_name} message" in error.details()
    [entry] = entries_after(fed, logged)
    assert entry["peer"] == POLICE
    if method.containing_service.name == "Audit":
        assert entry["event"] == "audit_query"
        assert entry["detail"].startswith(f"{method.name} refused: ")
    else:
        assert entry["event"] == "rejected"
        assert entry["detail"].startswith("invalid: ")
    assert "Traceback" not in fed.receiver.log_path.read_text(encoding="utf-8")
    assert_healthy_and_open(fed)


def test_an_undecodable_upload_chunk_is_refused_and_audited(fed: Federation) -> None:
    message, digest = attachment_message(POLICE, [PROCURATORATE], b"x" * 1000, title="附件")
    envelope = sign(message, signing_key(fed.setups[POLICE]))
    first = exchange_pb2.AttachmentChunk(
        envelope=envelope, sha256=digest, offset=0, data=b"x" * 10
    ).SerializeToString()
    logged = len(audit_events(fed.target))
    path = "/liandong.v1.Exchange/UploadAttachment"
    with channel(fed) as ch:
        upload = ch.stream_unary(path, request_serializer=_raw, response_deserializer=_raw)
        garbage_first = refusal(lambda: upload(iter([b"\xff\xff\xff"]), timeout=TIMEOUT))
        garbage_later = refusal(lambda: upload(iter([first, b"\xff\xff\xff"]), timeout=TIMEOUT))
    for error in (garbage_first, garbage_later):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "not a valid liandong.v1.AttachmentChunk message" in error.details()
    entries = entries_after(fed, logged)
    assert [e["event"] for e in entries] == ["rejected", "rejected"]
    assert all(e["peer"] == POLICE for e in entries)
    # The second refusal came once the envelope was known: the entry names it.
    assert entries[1]["envelope_sha256"] == envelope_digest(envelope).hex()
    assert "Traceback" not in fed.receiver.log_path.read_text(encoding="utf-8")
    assert_healthy_and_open(fed)


def test_an_empty_upload_stream_is_refused_and_audited(fed: Federation) -> None:
    logged = len(audit_events(fed.target))
    with channel(fed) as ch:
        stub = exchange_pb2_grpc.ExchangeStub(ch)
        error = refusal(lambda: stub.UploadAttachment(iter([]), timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty upload" in error.details()
    [entry] = entries_after(fed, logged)
    assert (entry["event"], entry["peer"]) == ("rejected", POLICE)
    assert_healthy_and_open(fed)


def test_deliver_answers_every_batch_an_undecodable_one_included(fed: Federation) -> None:
    """One DeliveryResults per batch: a batch that does not parse gets seq 0 with the
    refusal, and the valid batches after it are still received."""
    key = signing_key(fed.setups[POLICE])
    good = [sign(clue_message(POLICE, [PROCURATORATE]), key) for _ in range(2)]
    batches = [
        exchange_pb2.DeliveryBatch(
            requests=[exchange_pb2.DeliveryRequest(seq=n + 1, envelope=good[n])]
        ).SerializeToString()
        for n in range(2)
    ]
    logged = len(audit_events(fed.target))
    path = "/liandong.v1.Exchange/Deliver"
    with channel(fed) as ch:
        deliver = ch.stream_stream(path, request_serializer=_raw, response_deserializer=_raw)
        raw_answers = list(deliver(iter([batches[0], b"\xff\xff", batches[1]]), timeout=TIMEOUT))
    answers = [exchange_pb2.DeliveryResults.FromString(a) for a in raw_answers]
    results = {r.seq: r for a in answers for r in a.results}
    assert len(answers) == 3
    assert sorted(results) == [0, 1, 2]
    assert results[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a valid liandong.v1.DeliveryBatch message" in results[0].message
    assert results[1].code == results[2].code == 0
    entries = entries_after(fed, logged)
    assert sorted(e["event"] for e in entries) == ["received", "received", "rejected"]
    [rejected] = [e for e in entries if e["event"] == "rejected"]
    assert rejected["peer"] == POLICE and "envelope_sha256" not in rejected


@pytest.mark.parametrize(
    "uri",
    ["urn:liandong:agency:NOT/AN AGENCY", "urn:liandong:agency:", None],
    ids=["malformed-uri-san", "empty-agency", "no-san"],
)
def test_a_ca_issued_certificate_naming_no_agency_is_refused_and_audited(
    fed: Federation, uri: str | None
) -> None:
    credentials = stranger_credentials(fed.target, uri)
    logged = len(audit_events(fed.target))
    envelope = sign(clue_message(POLICE, [PROCURATORATE]), signing_key(fed.setups[POLICE]))
    with channel(fed, credentials) as ch:
        stub = exchange_pb2_grpc.ExchangeStub(ch)
        error = refusal(lambda: stub.TransferClue(envelope, timeout=TIMEOUT))
        # Health stays open to anyone the CA certified (in the strangers' own small share).
        health = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT
        )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    assert "names no agency" in error.details()
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    [entry] = entries_after(fed, logged)
    assert (entry["event"], entry["peer"]) == ("rejected", "unknown")
    assert "Traceback" not in fed.receiver.log_path.read_text(encoding="utf-8")
    assert_healthy_and_open(fed)


# -- 2. bounded per peer; no request stalls the node ---------------------------------------


def test_a_signature_flood_is_refused_before_any_verification(fed: Federation) -> None:
    """30,000 signatures under the sender's own key id: refused by count, while health
    checks go on being answered."""
    police = fed.setups[POLICE]
    message, digest = attachment_message(POLICE, [PROCURATORATE], b"y" * 100, title="洪水")
    envelope = sign(message, signing_key(police))
    [signature] = envelope.signatures
    flooded = envelope_pb2.Envelope(
        payload=envelope.payload,
        payload_type=envelope.payload_type,
        signatures=[signature] * 30_000,
    )
    query = exchange_pb2.AttachmentQuery(envelope=flooded, sha256=digest)
    logged = len(audit_events(fed.target))
    answered: list[int] = []
    stop = threading.Event()

    def check_health() -> None:
        with channel(fed, ECOLOGY) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while not stop.is_set():
                stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
                answered.append(1)

    checker = threading.Thread(target=check_health)
    checker.start()
    try:
        with channel(fed) as ch:
            stub = exchange_pb2_grpc.ExchangeStub(ch)
            errors = [
                refusal(lambda: stub.QueryAttachment(query, timeout=TIMEOUT)) for _ in range(3)
            ]
    finally:
        stop.set()
        checker.join()
    assert answered  # health kept answering (each within its deadline)
    for error in errors:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "carries 30000 signatures; at most 4" in error.details()
    entries = entries_after(fed, logged)
    assert [e["event"] for e in entries] == ["rejected"] * 3
    assert_healthy_and_open(fed)


def test_refusal_texts_do_not_echo_what_the_attacker_sent(fed: Federation) -> None:
    """A 3 MiB payload type and four 600 KB key ids: the status message and the audit entry
    stay small (every quoted value cut, the whole text at most MAX_REASON bytes)."""
    police = fed.setups[POLICE]
    envelope = sign(clue_message(POLICE, [PROCURATORATE]), signing_key(police))
    huge_type = envelope_pb2.Envelope()
    huge_type.CopyFrom(envelope)
    huge_type.payload_type = "\n" + "类" * (1024 * 1024)  # 3 MiB of UTF-8
    many_ids = envelope_pb2.Envelope(
        payload=envelope.payload,
        payload_type=envelope.payload_type,
        signatures=[envelope_pb2.Signature(keyid="k" * 600_000, sig=b"\x00" * 64)] * 4,
    )
    for hostile in (huge_type, many_ids):
        logged = len(audit_events(fed.target))
        with channel(fed) as ch:
            stub = exchange_pb2_grpc.ExchangeStub(ch)
            error = refusal(lambda h=hostile, s=stub: s.TransferClue(h, timeout=TIMEOUT))
        assert error.code() in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ), error.details()
        assert len(error.details().encode()) <= MAX_REASON
        [entry] = entries_after(fed, logged)
        assert len(entry["detail"].encode()) <= MAX_REASON + 32
        assert "\n" not in entry["detail"]
    assert_healthy_and_open(fed)


def test_a_member_cannot_hold_more_than_its_share(fed: Federation) -> None:
    """The police opens its whole share of streams and sits on them: its next stream is
    refused at once (audited), while health and ecology's messages go on; the idle streams
    are ended by the node, after which the police can open streams again."""
    key = signing_key(fed.setups[POLICE])
    logged = len(audit_events(fed.target))
    path = "/liandong.v1.Exchange/Deliver"
    held: list[Any] = []
    with channel(fed) as ch:
        deliver = ch.stream_stream(path, request_serializer=_raw, response_deserializer=_raw)
        for _ in range(PEER_STREAMS):
            # Each sends one valid batch, then nothing: open, but idle.
            batch = exchange_pb2.DeliveryBatch(
                requests=[
                    exchange_pb2.DeliveryRequest(
                        seq=1, envelope=sign(clue_message(POLICE, [PROCURATORATE]), key)
                    )
                ]
            ).SerializeToString()
            gate = threading.Event()

            def requests(b: bytes = batch, g: threading.Event = gate) -> Iterator[bytes]:
                yield b
                g.wait(60)

            call = deliver(requests(), timeout=60)
            assert next(call)  # its one batch is answered: the stream is open
            held.append((call, gate))
        extra = refusal(lambda: list(deliver(iter([b""]), timeout=TIMEOUT)))
        assert extra.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, extra.details()
        assert f"already has {PEER_STREAMS} streams open" in extra.details()
        # The police's own health checks and another member's messages are not affected.
        health = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert_healthy_and_open(fed)
        # Idle streams are ended by the node as if the caller had closed them.
        for call, gate in held:
            assert list(call) == []
            assert call.code() == grpc.StatusCode.OK
            gate.set()
        answers = list(deliver(iter([batch]), timeout=TIMEOUT))
        assert len(answers) == 1
    refused = [e for e in entries_after(fed, logged) if e["event"] == "rejected"]
    assert len(refused) == 1 and refused[0]["peer"] == POLICE
    assert refused[0]["detail"].startswith("too_large: ")


def test_a_call_without_its_first_message_is_ended_and_audited(fed: Federation) -> None:
    logged = len(audit_events(fed.target))
    release = threading.Event()

    def nothing() -> Iterator[bytes]:
        release.wait(60)
        yield from ()

    path = "/liandong.v1.Exchange/TransferClue"
    with channel(fed) as ch:
        # A unary method whose request never comes (as a client stream, to hold it back).
        call = ch.stream_unary(path, request_serializer=_raw, response_deserializer=_raw)
        error = refusal(lambda: call(nothing(), timeout=TIMEOUT))
        release.set()
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
    assert f"no request arrived within {FIRST_MESSAGE_SECONDS} s" in error.details()
    [entry] = entries_after(fed, logged)
    assert (entry["event"], entry["peer"]) == ("rejected", POLICE)
    assert entry["detail"].startswith("timeout: ")
    assert_healthy_and_open(fed)


def test_strangers_streams_are_refused_at_once_and_hold_nothing(fed: Federation) -> None:
    """Streams from a certificate of no member are refused before their first message
    is awaited: fifty of them leave every share free."""
    credentials = stranger_credentials(fed.target, "urn:liandong:agency:140400/water")
    release = threading.Event()

    def nothing() -> Iterator[exchange_pb2.AttachmentChunk]:
        release.wait(60)
        yield from ()

    with channel(fed, credentials) as ch:
        stub = exchange_pb2_grpc.ExchangeStub(ch)
        futures = [stub.UploadAttachment.future(nothing(), timeout=60) for _ in range(50)]
        errors = [f.exception() for f in futures]
        release.set()
    # UNAUTHENTICATED, not DEADLINE_EXCEEDED: none waited for its (never sent) first message.
    assert {e.code() for e in errors if isinstance(e, grpc.RpcError)} == {
        grpc.StatusCode.UNAUTHENTICATED
    }
    assert all("not a member" in e.details() for e in errors if isinstance(e, grpc.RpcError))
    assert_healthy_and_open(fed)


# -- 3. no side doors to other agencies' attachments ---------------------------------------


def test_a_member_cannot_learn_of_or_cite_another_agencys_file(fed: Federation) -> None:
    ecology, police = fed.setups[ECOLOGY], fed.setups[POLICE]
    data = b"evidence " * 10_000
    theirs, digest = attachment_message(ECOLOGY, [PROCURATORATE], data, title="证据")
    their_envelope = sign(theirs, signing_key(ecology))
    with channel(fed, ECOLOGY) as ch:
        stub = exchange_pb2_grpc.ExchangeStub(ch)
        status = stub.UploadAttachment(
            iter(
                [
                    exchange_pb2.AttachmentChunk(
                        envelope=their_envelope, sha256=digest, offset=0, data=data
                    )
                ]
            ),
            timeout=TIMEOUT,
        )
        assert status.complete
        stub.TransferClue(their_envelope, timeout=TIMEOUT)

    mine, same_digest = attachment_message(POLICE, [PROCURATORATE], data, title="同一文件")
    assert same_digest == digest
    my_envelope = sign(mine, signing_key(police))
    with channel(fed) as ch:
        stub = exchange_pb2_grpc.ExchangeStub(ch)
        # The node does not say it holds the file: the police has uploaded none of it.
        held = stub.QueryAttachment(
            exchange_pb2.AttachmentQuery(envelope=my_envelope, sha256=digest), timeout=TIMEOUT
        )
        assert (held.received, held.complete) == (0, False)
        # Nor may the police cite it without uploading it itself.
        logged = len(audit_events(fed.target))
        cited = refusal(lambda: stub.TransferClue(my_envelope, timeout=TIMEOUT))
        assert cited.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "has not been uploaded by the sender" in cited.details()
        [entry] = entries_after(fed, logged)
        assert (entry["event"], entry["peer"]) == ("rejected", POLICE)
        # Once it sends the bytes (and they match), it may.
        status = stub.UploadAttachment(
            iter([exchange_pb2.AttachmentChunk(envelope=my_envelope, sha256=digest, data=data)]),
            timeout=TIMEOUT,
        )
        assert status.complete
        stub.TransferClue(my_envelope, timeout=TIMEOUT)
    uploads = database_rows(
        fed.target,
        f"SELECT sender FROM attachment_uploads WHERE sha256 = '{digest.hex()}' ORDER BY sender",
    )
    assert uploads == [(ECOLOGY,), (POLICE,)]


def test_a_cancelled_upload_does_not_lock_its_file(fed: Federation) -> None:
    """The caller's deadline cancels an upload while the node re-hashes the part it holds:
    the next upload of the file still goes through (the reservation was released)."""
    police = fed.setups[POLICE]
    size = 96 * 1024 * 1024
    piece = hashlib.sha256(b"seed").digest() * (1024 * 1024 // 32)
    data = piece * (size // len(piece))
    message, digest = attachment_message(POLICE, [PROCURATORATE], data, title="大文件")
    envelope = sign(message, signing_key(police))
    half = size // 2
    chunk = 1024 * 1024

    def chunks(start: int, end: int) -> Iterator[exchange_pb2.AttachmentChunk]:
        yield exchange_pb2.AttachmentChunk(envelope=envelope, sha256=digest, offset=start)
        for offset in range(start, end, chunk):
            yield exchange_pb2.AttachmentChunk(data=data[offset : offset + chunk])

    with channel(fed) as ch:
        stub = exchange_pb2_grpc.ExchangeStub(ch)
        status = stub.UploadAttachment(chunks(0, half), timeout=120)
        assert (status.received, status.complete) == (half, False)
        # Cancelled by their deadlines, most while the node re-reads the half it holds (one
        # may also finish in time, or find the file still reserved: either is fine).
        for deadline in (0.01, 0.02, 0.04, 0.08):
            with contextlib.suppress(grpc.RpcError):
                stub.UploadAttachment(chunks(half, half), timeout=deadline)

        def finished() -> bool:
            try:
                return bool(stub.UploadAttachment(chunks(half, size), timeout=120).complete)
            except grpc.RpcError as error:
                # Only "already in progress" may come, and only until the cancelled work ends.
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return False

        wait_for(finished, seconds=60, what="the upload after a cancelled one")
    assert_healthy_and_open(fed)


def test_a_peer_cannot_reuse_the_id_of_a_message_this_node_sent(fed: Federation) -> None:
    """An id is new only if no one has used it, this node included (protocol.md 6.2)."""
    with fed.receiver.client() as client:
        ours = client.submit(
            family="notice",
            recipients=[POLICE],
            body_json='{"title": "本院通报", "text": "通报内容"}',
        )
    copy = sign(
        clue_message(POLICE, [PROCURATORATE], message_id=ours), signing_key(fed.setups[POLICE])
    )
    logged = len(audit_events(fed.target))
    with channel(fed) as ch:
        stub = exchange_pb2_grpc.ExchangeStub(ch)
        error = refusal(lambda: stub.TransferClue(copy, timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "is the id of a message this node sent" in error.details()
    [entry] = entries_after(fed, logged)
    assert (entry["event"], entry["peer"]) == ("rejected", POLICE)
    assert database_rows(
        fed.target, f"SELECT direction FROM messages WHERE message_id = '{ours}'"
    ) == [("out",)]
    assert_healthy_and_open(fed)


@pytest.mark.parametrize(
    "path",
    ["/liandong.v1.Audit/NoSuchMethod", "/x" * 2000],
    ids=["unknown-method", "huge-path"],
)
def test_a_method_the_node_does_not_serve_is_unimplemented_and_audited(
    fed: Federation, path: str
) -> None:
    logged = len(audit_events(fed.target))
    with channel(fed) as ch:
        error = refusal(lambda: raw_unary(ch, path, b"", server_streaming=False))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED, error.details()
    assert len(error.details().encode()) <= MAX_REASON
    [entry] = entries_after(fed, logged)
    assert (entry["event"], entry["peer"]) == ("rejected", POLICE)
    assert entry["detail"].startswith("unimplemented: ")
    assert "Traceback" not in fed.receiver.log_path.read_text(encoding="utf-8")
    assert_healthy_and_open(fed)


def test_an_inclusion_proof_by_a_message_id_that_is_no_id_is_refused(fed: Federation) -> None:
    """A NUL or a 300 KB "message id" never reaches the database (PostgreSQL refuses NUL)."""
    for message_id in ("\x00", "x" * 300_000):
        logged = len(audit_events(fed.target))
        with channel(fed) as ch:
            stub = audit_pb2_grpc.AuditStub(ch)
            request = audit_pb2.InclusionProofRequest(message_id=message_id)
            error = refusal(lambda r=request, s=stub: s.GetInclusionProof(r, timeout=TIMEOUT))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "is not a message id" in error.details()
        assert len(error.details().encode()) < 300
        [entry] = entries_after(fed, logged)
        assert (entry["event"], entry["peer"]) == ("audit_query", POLICE)
        assert len(entry["detail"].encode()) < 600
    assert_healthy_and_open(fed)


def test_health_list_answers_every_service(fed: Federation) -> None:
    """grpc.health.v1.Health/List (which the health library leaves unimplemented) answers."""
    with channel(fed) as ch:
        answer = health_pb2_grpc.HealthStub(ch).List(
            health_pb2.HealthListRequest(), timeout=TIMEOUT
        )
    serving = health_pb2.HealthCheckResponse.SERVING
    assert answer.statuses[""].status == serving
    assert answer.statuses["liandong.v1.Exchange"].status == serving


def test_a_batch_of_millions_of_requests_is_refused_before_they_are_read(
    fed: Federation,
) -> None:
    """Four million empty requests fit in one 8 MB message: refused by count, at once, with
    one answer (seq 0) and one entry, and the stream goes on."""
    key = signing_key(fed.setups[POLICE])
    good = exchange_pb2.DeliveryBatch(
        requests=[
            exchange_pb2.DeliveryRequest(
                seq=7, envelope=sign(clue_message(POLICE, [PROCURATORATE]), key)
            )
        ]
    ).SerializeToString()
    logged = len(audit_events(fed.target))
    path = "/liandong.v1.Exchange/Deliver"
    with channel(fed) as ch:
        deliver = ch.stream_stream(path, request_serializer=_raw, response_deserializer=_raw)
        answers = [
            exchange_pb2.DeliveryResults.FromString(a)
            for a in deliver(iter([b"\x0a\x00" * 4_000_000, good]), timeout=TIMEOUT)
        ]
    results = sorted((r.seq, r.code) for a in answers for r in a.results)
    assert results == [(0, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]), (7, 0)]
    [refused] = [r for a in answers for r in a.results if r.seq == 0]
    assert "a batch of 4000000 messages is over the limit of 256" in refused.message
    entries = entries_after(fed, logged)
    assert sorted(e["event"] for e in entries) == ["received", "rejected"]
    assert_healthy_and_open(fed)


def test_a_flood_of_refusals_is_counted_not_written_one_by_one(fed: Federation) -> None:
    """A stranger's certificate refused 400 times in a row: every refusal is accounted for in
    the audit log, most of them in one counted entry, not 400 entries."""
    from node.audit.refusals import COUNTED

    credentials = stranger_credentials(fed.target, "urn:liandong:agency:140400/water")
    envelope = sign(clue_message(POLICE, [PROCURATORATE]), signing_key(fed.setups[POLICE]))
    logged = len(audit_events(fed.target))
    with channel(fed, credentials) as ch:
        stub = exchange_pb2_grpc.ExchangeStub(ch)
        for _ in range(400):
            with pytest.raises(grpc.RpcError):
                stub.TransferClue(envelope, timeout=TIMEOUT)

    def accounted() -> tuple[int, int]:
        mine = [
            e
            for e in audit_events(fed.target)[logged:]
            if e["event"] == "rejected" and e["peer"] == "140400/water"
        ]
        counted = [int(m.group(1)) for e in mine if (m := COUNTED.match(e["detail"]))]
        return len(mine) - len(counted), sum(counted)

    wait_for(lambda: sum(accounted()) == 400, seconds=30, what="every refusal accounted for")
    singles, counted = accounted()
    assert counted > 0 and singles < 400
    assert_healthy_and_open(fed)
