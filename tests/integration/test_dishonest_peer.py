"""A dishonest receiving peer: a real sending node delivers to a fake receiver (a gRPC server on
loopback with the procuratorate's own certificate, TLS key and signing key) that answers with
receipts and proofs that do not hold, or lies about the bytes of an attachment it holds.

For each lie the sender refuses the answer: the delivery stays pending, `last_error` says why,
the audit log gets one `answer_refused` entry per refused answer, and the delivery is retried —
the fake answers truthfully from its third attempt on (held back until the test has looked),
and the message is then delivered once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from node._pb.liandong.v1 import envelope_pb2, exchange_pb2, exchange_pb2_grpc
from node.envelope import envelope_digest
from node.federation_setup import NodeSetup
from tests.conftest import ECOLOGY, PROCURATORATE, NodeProcess, wait_for
from tests.integration.test_audit_log import rewrite_bundle, verify
from tests.integration.test_exchange import cli
from tests.peer import audit_events, database_rows, serve_as, signing_key
from tests.unit.test_receipts import make_proof, make_receipt, received_entry

MakeFederation = Callable[..., dict[str, NodeProcess]]
POLICE = "140400/police"
FEDERATION = "demo-federation"  # node.federation_setup.create_federation's
FAST = (
    "\n[delivery]\ninitial_backoff_seconds = 0.1\nmax_backoff_seconds = 0.3\n"
    "rpc_timeout_seconds = 3\n"
)
# (receipt, receiver_proof) for an envelope: what the fake answers.
Answer = tuple[envelope_pb2.Envelope, bytes]


@dataclass
class Upload:
    offset: int
    data: bytes


@dataclass
class FakeReceiver(exchange_pb2_grpc.ExchangeServicer):
    """The procuratorate, as a dishonest node would play it.

    `lie` makes the answer to the first `lies` deliveries; later ones wait for `release`, then
    get a true receipt and proof. `query` answers QueryAttachment (by how many came before);
    `upload` takes an UploadAttachment stream. `stream=False`: Deliver is UNIMPLEMENTED, so
    the sender falls back to the unary RPC.
    """

    setup: NodeSetup
    lie: Callable[[FakeReceiver, envelope_pb2.Envelope], Answer] | None = None
    lies: int = 2
    stream: bool = True
    content: bytes = b""  # the attachment the sender will upload
    query: Callable[[FakeReceiver, int], int] = lambda fake, n: fake.held()
    upload: Callable[[FakeReceiver, int, Iterator[exchange_pb2.AttachmentChunk], Any], int] = (
        lambda fake, n, chunks, context: fake.take(chunks)
    )
    deliveries: list[envelope_pb2.Envelope] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)  # each QueryAttachment's answer
    uploads: list[Upload] = field(default_factory=list)
    stored: bytes = b""  # what it holds of the attachment
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.key = signing_key(self.setup)

    # -- answers -------------------------------------------------------------------------

    def truthful(
        self, envelope: envelope_pb2.Envelope, **changes: Any
    ) -> tuple[envelope_pb2.Envelope, bytes]:
        """A receipt (and proof of entry 0) as an honest node makes it, but for `changes`."""
        message = envelope_pb2.Message.FromString(envelope.payload)
        digest = envelope_digest(envelope)
        fields: dict[str, Any] = {
            "message_id": message.message_id,
            "envelope_sha256": digest,
            "sender": message.sender,
            "receiver": self.setup.agency,
            "received_at": datetime.now(UTC),
            "log_index": 0,
        }
        fields.update(changes)
        entry = received_entry(self.setup.agency, message.sender, message.message_id, digest.hex())
        proof = make_proof(self.key, FEDERATION, self.setup.agency, entry)
        return make_receipt(self.key, **fields), proof

    def answer(self, envelope: envelope_pb2.Envelope) -> Answer:
        with self.lock:
            self.deliveries.append(envelope)
            attempt = len(self.deliveries)
        if self.lie is not None and attempt <= self.lies:
            return self.lie(self, envelope)
        self.release.wait(20)
        return self.truthful(envelope)

    def held(self) -> int:
        return len(self.stored)

    def take(self, chunks: Iterator[exchange_pb2.AttachmentChunk]) -> int:
        """Append an upload stream as an honest receiver does; the bytes held after."""
        first = next(chunks)
        upload = Upload(first.offset, first.data + b"".join(c.data for c in chunks))
        self.uploads.append(upload)
        assert upload.offset <= len(self.stored)
        self.stored = self.stored[: upload.offset] + upload.data
        return len(self.stored)

    # -- the Exchange service ------------------------------------------------------------

    def Deliver(self, request_iterator, context):  # type: ignore[no-untyped-def]
        if not self.stream:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node predates Deliver")
        for batch in request_iterator:
            results = exchange_pb2.DeliveryResults()
            for request in batch.requests:
                receipt, proof = self.answer(request.envelope)
                results.results.add(seq=request.seq, receipt=receipt, receiver_proof=proof)
            yield results

    def TransferClue(self, request, context):  # type: ignore[no-untyped-def]
        receipt, proof = self.answer(request)
        return exchange_pb2.DeliveryReceipt(receipt=receipt, receiver_proof=proof)

    def QueryAttachment(self, request, context):  # type: ignore[no-untyped-def]
        with self.lock:
            number = len(self.queries)
        received = self.query(self, number)
        self.queries.append(received)
        return exchange_pb2.AttachmentStatus(
            sha256=request.sha256, received=received, complete=self.complete()
        )

    def UploadAttachment(self, request_iterator, context):  # type: ignore[no-untyped-def]
        held = self.upload(self, len(self.uploads), request_iterator, context)
        return exchange_pb2.AttachmentStatus(received=held, complete=self.complete())

    def complete(self) -> bool:
        return bool(self.content) and self.stored == self.content


def serve(fake: FakeReceiver) -> grpc.Server:
    """The fake on the procuratorate's endpoint, with its certificate: real mutual TLS."""
    return serve_as(fake.setup, partial(exchange_pb2_grpc.add_ExchangeServicer_to_server, fake))


@pytest.fixture
def federation(make_federation: MakeFederation) -> dict[str, NodeProcess]:
    """Ecology's node, started; the procuratorate's node is never started (the fake is it)."""
    nodes = make_federation((ECOLOGY, PROCURATORATE), extra_config=FAST)
    nodes[ECOLOGY].start()
    return nodes


def send_clue(sender: NodeProcess, attachment: Path | None = None) -> str:
    with sender.client() as client:
        return client.submit(
            family="clue",
            recipients=[PROCURATORATE],
            body_json=json.dumps({"title": "线索", "facts": "河道排污"}),
            attachment_paths=[str(attachment)] if attachment else (),
        )


def delivery(sender: NodeProcess, message_id: str) -> tuple[str, int, str]:
    [row] = database_rows(
        sender.setup,
        "SELECT state, attempts, last_error FROM deliveries "
        f"WHERE message_id = '{message_id}' AND recipient = '{PROCURATORATE}'",
    )
    return row  # type: ignore[return-value]


def events(sender: NodeProcess, event: str, message_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in audit_events(sender.setup)
        if e["event"] == event and e.get("message_id") == message_id
    ]


def envelope_sha256(sender: NodeProcess, message_id: str) -> str:
    [(digest,)] = database_rows(
        sender.setup,
        f"SELECT envelope_sha256 FROM messages WHERE message_id = '{message_id}' "
        "AND direction = 'out'",
    )
    return str(digest)


def assert_refused_twice_then_delivered(
    sender: NodeProcess, fake: FakeReceiver, message_id: str, phrase: str
) -> None:
    """Two lies refused and recorded; the third attempt (held back until now) delivers."""
    wait_for(lambda: len(fake.deliveries) >= 3, seconds=20, what="a third attempt")
    state, attempts, last_error = delivery(sender, message_id)
    assert (state, attempts) == ("pending", 2)
    assert phrase in last_error, last_error
    refused = events(sender, "answer_refused", message_id)
    assert len(refused) == 2  # one per refused answer
    for entry in refused:
        assert entry["peer"] == PROCURATORATE
        assert entry["envelope_sha256"] == envelope_sha256(sender, message_id)
        assert phrase in entry["detail"]
        assert len(entry["detail"]) <= 1024
    assert events(sender, "receipt_received", message_id) == []
    fake.release.set()
    wait_for(lambda: delivery(sender, message_id)[0] == "delivered", seconds=20, what="delivery")
    assert delivery(sender, message_id) == ("delivered", 3, "")
    assert len(events(sender, "receipt_received", message_id)) == 1
    assert len(events(sender, "answer_refused", message_id)) == 2


def other_sender(fake: FakeReceiver, envelope: envelope_pb2.Envelope) -> Answer:
    return fake.truthful(envelope, sender=POLICE)


def before_the_keys_not_before(fake: FakeReceiver, envelope: envelope_pb2.Envelope) -> Answer:
    return fake.truthful(envelope, received_at=datetime(2001, 1, 1, tzinfo=UTC))


def index_disagrees_with_proof(fake: FakeReceiver, envelope: envelope_pb2.Envelope) -> Answer:
    return fake.truthful(envelope, log_index=5)  # the proof is of entry 0


def proof_does_not_verify(fake: FakeReceiver, envelope: envelope_pb2.Envelope) -> Answer:
    receipt, _ = fake.truthful(envelope)
    message = envelope_pb2.Message.FromString(envelope.payload)
    entry = received_entry(
        fake.setup.agency, message.sender, message.message_id, envelope_digest(envelope).hex()
    )
    return receipt, make_proof(fake.key, FEDERATION, fake.setup.agency, entry, root=bytes(32))


def wrong_digest(fake: FakeReceiver, envelope: envelope_pb2.Envelope) -> Answer:
    return fake.truthful(envelope, envelope_sha256=hashlib.sha256(b"another").digest())


def bad_signature(fake: FakeReceiver, envelope: envelope_pb2.Envelope) -> Answer:
    receipt, proof = fake.truthful(envelope)
    signature = receipt.signatures[0]
    signature.sig = bytes([signature.sig[0] ^ 1]) + signature.sig[1:]
    return receipt, proof


@pytest.mark.parametrize(
    ("lie", "phrase", "stream"),
    [
        (other_sender, f"names sender '{POLICE}', not this node ({ECOLOGY})", True),
        (other_sender, f"names sender '{POLICE}', not this node ({ECOLOGY})", False),
        (before_the_keys_not_before, "was not valid at its received_at 2001-01-01", True),
        (index_disagrees_with_proof, "it proves entry 0, the receipt names 5", True),
        (proof_does_not_verify, "does not hold: tlog-proof for index 0", True),
        (wrong_digest, f"its envelope digest '{hashlib.sha256(b'another').hexdigest()}'", True),
        (bad_signature, "does not verify", True),
    ],
    ids=[
        "other-sender",
        "other-sender-unary",
        "received-before-not-before",
        "index-disagrees-with-proof",
        "proof-does-not-verify",
        "wrong-digest",
        "bad-signature",
    ],
)
def test_a_false_answer_is_refused_recorded_and_retried(
    federation: dict[str, NodeProcess],
    lie: Callable[[FakeReceiver, envelope_pb2.Envelope], Answer],
    phrase: str,
    stream: bool,
) -> None:
    sender = federation[ECOLOGY]
    fake = FakeReceiver(federation[PROCURATORATE].setup, lie=lie, stream=stream)
    server = serve(fake)
    try:
        message_id = send_clue(sender)
        assert_refused_twice_then_delivered(sender, fake, message_id, phrase)
    finally:
        fake.release.set()
        server.stop(None)


def attachment(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    content = hashlib.sha256(b"seed").digest() * (size // 32) + b"tail"[: size % 32]
    content = content[:size]
    path = tmp_path / "现场照片.bin"
    path.write_bytes(content)
    return path, content


def test_an_upload_offset_beyond_the_file_is_refused_recorded_and_retried(
    federation: dict[str, NodeProcess], tmp_path: Path
) -> None:
    sender = federation[ECOLOGY]
    path, content = attachment(tmp_path, 300_000)

    def beyond_the_end(fake: FakeReceiver, number: int) -> int:
        if number < 2:
            return len(content) + 1  # the first two answers lie
        fake.release.wait(20)
        return fake.held()

    fake = FakeReceiver(federation[PROCURATORATE].setup, content=content, query=beyond_the_end)
    server = serve(fake)
    try:
        message_id = send_clue(sender, path)
        wait_for(lambda: len(fake.queries) >= 2, seconds=20, what="two queries")
        # The third query is held back: the two lies are recorded by now.
        wait_for(lambda: delivery(sender, message_id)[1] == 2, seconds=20, what="two attempts")
        state, _, last_error = delivery(sender, message_id)
        assert state == "pending"
        phrase = f"answered that it holds {len(content) + 1} bytes of attachment '现场照片.bin'"
        assert phrase in last_error
        refused = events(sender, "answer_refused", message_id)
        assert len(refused) == 2
        assert all(phrase in e["detail"] and e["peer"] == PROCURATORATE for e in refused)
        assert fake.uploads == [] and fake.deliveries == []  # nothing sent on a lie
        fake.release.set()
        wait_for(
            lambda: delivery(sender, message_id)[0] == "delivered", seconds=20, what="delivery"
        )
        assert [(u.offset, u.data) for u in fake.uploads] == [(0, content)]
        assert len(events(sender, "answer_refused", message_id)) == 2
    finally:
        fake.release.set()
        server.stop(None)


def test_the_sender_resumes_an_upload_from_the_offset_the_receiver_holds(
    federation: dict[str, NodeProcess], tmp_path: Path
) -> None:
    """The receiver holds N bytes: the upload starts at N. It then answers FAILED_PRECONDITION
    (it lost bytes: resume from M); the next attempt asks again and sends exactly from M."""
    sender = federation[ECOLOGY]
    path, content = attachment(tmp_path, 2_500_000)  # three chunks of up to 1 MiB
    first, then = 1_048_583, 300_001

    def holds(fake: FakeReceiver, number: int) -> int:
        fake.stored = content[: first if number == 0 else then]
        return fake.held()

    def lose_bytes_once(fake: FakeReceiver, number: int, chunks: Any, context: Any) -> int:
        if number > 0:
            return fake.take(chunks)
        chunk = next(chunks)
        fake.uploads.append(Upload(chunk.offset, chunk.data))
        context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"upload offset {chunk.offset} is beyond the {then} bytes held; resume from {then}",
        )
        raise AssertionError("abort returns no answer")

    fake = FakeReceiver(
        federation[PROCURATORATE].setup,
        content=content,
        query=holds,
        upload=lose_bytes_once,
    )
    fake.release.set()  # no lies about receipts here
    server = serve(fake)
    try:
        message_id = send_clue(sender, path)
        wait_for(
            lambda: delivery(sender, message_id)[0] == "delivered", seconds=20, what="delivery"
        )
        resumed_at_first, resumed_at_then = fake.uploads
        assert resumed_at_first.offset == first
        assert resumed_at_first.data == content[first : first + len(resumed_at_first.data)]
        assert len(resumed_at_first.data) > 0
        assert resumed_at_then.offset == then
        assert resumed_at_then.data == content[then:]  # exactly the rest, nothing more
        assert fake.stored == content
        assert fake.queries == [first, then]
        assert delivery(sender, message_id) == ("delivered", 2, "")
        # A peer's refusal is no false answer: nothing to record as refused.
        assert events(sender, "answer_refused", message_id) == []
    finally:
        server.stop(None)


def test_an_upload_the_receiver_stalls_is_given_up_and_resumed(
    federation: dict[str, NodeProcess], tmp_path: Path
) -> None:
    """A receiver that takes the first chunk and then never answers does not hold the
    sender's delivery for ever: the attempt fails after the RPC timeout and is retried."""
    sender = federation[ECOLOGY]
    path, content = attachment(tmp_path, 100_000)
    stalled = threading.Event()

    def stall_once(fake: FakeReceiver, number: int, chunks: Any, context: Any) -> int:
        if number > 0:
            return fake.take(chunks)
        chunk = next(chunks)
        fake.uploads.append(Upload(chunk.offset, chunk.data))
        stalled.wait(30)
        return 0

    fake = FakeReceiver(federation[PROCURATORATE].setup, content=content, upload=stall_once)
    fake.release.set()
    server = serve(fake)
    try:
        message_id = send_clue(sender, path)
        wait_for(lambda: delivery(sender, message_id)[1] >= 1, seconds=20, what="an attempt")
        assert "made no progress for 3 s" in delivery(sender, message_id)[2]
        wait_for(
            lambda: delivery(sender, message_id)[0] == "delivered", seconds=20, what="delivery"
        )
        assert [u.offset for u in fake.uploads] == [0, 0]
        assert fake.stored == content
    finally:
        stalled.set()
        server.stop(None)


# -- the same lies in the sender's audit bundle: `audit verify` of that bundle alone -------


def test_audit_verify_flags_the_receipts_a_dishonest_receiver_could_sign(
    make_federation: MakeFederation, tmp_path: Path
) -> None:
    """Receipts re-signed with the receiver's own key (so every signature holds) that name
    another sender, a time before the receiver's key was valid, or another log index than
    the receiver's proof the sender kept: each is named by message, and the exit status is 1."""
    nodes = make_federation((ECOLOGY, PROCURATORATE))
    sender, receiver = nodes[ECOLOGY].start(), nodes[PROCURATORATE].start()
    for _ in range(4):
        send_clue(sender)
    wait_for(lambda: sender.client().node_info().pending_deliveries == 0, what="deliveries")
    bundle = tmp_path / "ecology.bundle"
    exported = cli("audit", "export", "--out", str(bundle), config=sender.setup.config)
    assert exported.returncode == 0, exported.stderr
    code, report = verify(bundle)
    assert code == 0, report

    key = signing_key(receiver.setup)
    lies: dict[str, dict[str, Any]] = {}
    changes: list[dict[str, Any]] = [
        {"sender": POLICE},
        {"received_at": datetime(2001, 1, 1, tzinfo=UTC)},
        {"log_index": None},  # the proof's index + 1
    ]

    def resign(name: str, content: bytes) -> bytes:
        if name != "messages.jsonl":
            return content
        lines = []
        for line in content.splitlines():
            item = json.loads(line)
            if item["direction"] == "out" and len(lies) < len(changes):
                change = dict(changes[len(lies)])
                raw = base64.b64decode(item["receipts"][PROCURATORATE])
                body = envelope_pb2.Receipt.FromString(
                    envelope_pb2.Envelope.FromString(raw).payload
                )
                assert item["proofs"][PROCURATORATE]  # the receiver's proof was kept
                if "log_index" in change:
                    change["log_index"] = body.log_index + 1
                fields: dict[str, Any] = {
                    "message_id": body.message_id,
                    "envelope_sha256": body.envelope_sha256,
                    "sender": body.sender,
                    "receiver": body.receiver,
                    "received_at": body.received_at.ToDatetime(UTC),
                    "log_index": body.log_index,
                    **change,
                }
                receipt = make_receipt(key, **fields)
                item["receipts"][PROCURATORATE] = base64.b64encode(
                    receipt.SerializeToString()
                ).decode()
                lies[item["message_id"]] = fields
            lines.append(json.dumps(item).encode())
        return b"\n".join(lines) + b"\n"

    rewrite_bundle(bundle, resign)
    assert len(lies) == 3
    other_sender, too_early, other_index = lies
    expected = {
        other_sender: f"names sender '{POLICE}', not {ECOLOGY}",
        too_early: "not valid at its received_at 2001-01-01",
        other_index: f"the receipt names {lies[other_index]['log_index']}",
    }
    for workers in (0, 2):
        code, report = verify(bundle, workers=workers)
        assert code == 1
        problems = [p["problem"] for p in report["problems"]]
        assert len(problems) == 3, problems
        for message_id, phrase in expected.items():
            assert any(p.startswith(f"message {message_id}: ") and phrase in p for p in problems), (
                phrase,
                problems,
            )
