"""The sender's check of a receipt and of the receiver's proof (protocol.md section 6.1, 6.3):
every way a receiving peer can answer falsely is refused, saying why in bounded words."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from node._pb.liandong.v1 import envelope_pb2
from node.audit.checkpoint import Checkpoint, log_origin
from node.audit.log import encode_entry, format_time
from node.audit.merkle import leaf_hash
from node.audit.proof import LogProof, OpenedCheckpoints
from node.envelope import RECEIPT_PAYLOAD_TYPE, sign_envelope, sign_note
from node.exchange.delivery import Due, bounded, check_receiver_proof, verify_receipt
from node.exchange.errors import ExchangeError, Reason
from node.exchange.messages import set_timestamp
from node.federation import MemberKey, Registry
from node.identity import SigningKey
from tests.unit.test_federation import T0, member, new_key, registry

ECOLOGY, POLICE, PROCURATORATE = "140400/ecology", "140400/police", "140400/procuratorate"
NOW = T0 + timedelta(days=1)
SKEW = 300.0
DIGEST = hashlib.sha256(b"the envelope that was sent").digest()


def make_receipt(
    key: SigningKey,
    *,
    message_id: str,
    envelope_sha256: bytes,
    sender: str = ECOLOGY,
    receiver: str = PROCURATORATE,
    received_at: datetime | None,
    log_index: int = 0,
) -> envelope_pb2.Envelope:
    """A receipt signed with `key`, saying what the arguments say (true or not)."""
    body = envelope_pb2.Receipt(
        message_id=message_id,
        envelope_sha256=envelope_sha256,
        sender=sender,
        receiver=receiver,
        log_index=log_index,
    )
    if received_at is not None:
        set_timestamp(body.received_at, received_at)
    return sign_envelope(body.SerializeToString(deterministic=True), RECEIPT_PAYLOAD_TYPE, key)


def received_entry(receiver: str, sender: str, message_id: str, envelope_sha256: str) -> bytes:
    """A "received" audit entry as a receiving node writes it (node.audit.log)."""
    return encode_entry(
        {
            "v": 1,
            "event": "received",
            "node": receiver,
            "time": format_time(datetime.now(UTC)),
            "message_id": message_id,
            "envelope_sha256": envelope_sha256,
            "peer": sender,
            "family": "clue",
        }
    )


def make_proof(
    key: SigningKey,
    federation: str,
    receiver: str,
    entry: bytes,
    *,
    root: bytes | None = None,
) -> bytes:
    """A tlog-proof of `entry` as entry 0 of a one-entry log, under a checkpoint `key` signs
    (with `root` instead of the true one: a proof that does not verify)."""
    origin = log_origin(federation, receiver)
    checkpoint = Checkpoint(origin, 1, leaf_hash(entry) if root is None else root)
    note = sign_note(checkpoint.body(), origin, key)
    return LogProof(0, (), note, entry).text()


@pytest.fixture
def receiver_key() -> SigningKey:
    return new_key()


@pytest.fixture
def federation(receiver_key: SigningKey) -> Registry:
    """The procuratorate's key is valid from T0 for 60 days."""
    window = MemberKey(
        receiver_key.key_id, receiver_key.public_bytes(), T0, T0 + timedelta(days=60)
    )
    return registry(members=(member(ECOLOGY), member(POLICE), member(PROCURATORATE, window)))


def check(
    federation: Registry, receipt: envelope_pb2.Envelope, message_id: str
) -> envelope_pb2.Receipt:
    return verify_receipt(
        federation,
        PROCURATORATE,
        receipt,
        message_id,
        DIGEST,
        sender=ECOLOGY,
        now=NOW,
        clock_skew_seconds=SKEW,
    )


def refusal(federation: Registry, receipt: envelope_pb2.Envelope, message_id: str) -> str:
    with pytest.raises(ExchangeError) as caught:
        check(federation, receipt, message_id)
    assert len(caught.value.message) < 1500
    return caught.value.message


def test_a_true_receipt_is_accepted(federation: Registry, receiver_key: SigningKey) -> None:
    message_id = str(uuid.uuid4())
    for received_at in (T0, NOW, NOW + timedelta(seconds=SKEW - 1)):
        receipt = make_receipt(
            receiver_key, message_id=message_id, envelope_sha256=DIGEST, received_at=received_at
        )
        assert check(federation, receipt, message_id).message_id == message_id


def test_a_receipt_naming_another_sender_is_refused(
    federation: Registry, receiver_key: SigningKey
) -> None:
    message_id = str(uuid.uuid4())
    receipt = make_receipt(
        receiver_key,
        message_id=message_id,
        envelope_sha256=DIGEST,
        sender=POLICE,
        received_at=NOW,
    )
    assert f"names sender '{POLICE}', not this node ({ECOLOGY})" in refusal(
        federation, receipt, message_id
    )


@pytest.mark.parametrize(
    "received_at",
    [
        datetime(2001, 1, 1, tzinfo=UTC),  # long before the key's not_before
        T0 - timedelta(microseconds=1),
        T0 + timedelta(days=60),  # not_after: the window is half-open
    ],
    ids=["2001", "just-before", "at-not-after"],
)
def test_a_receipt_outside_the_receivers_key_window_is_refused(
    federation: Registry, receiver_key: SigningKey, received_at: datetime
) -> None:
    message_id = str(uuid.uuid4())
    receipt = make_receipt(
        receiver_key, message_id=message_id, envelope_sha256=DIGEST, received_at=received_at
    )
    now = max(NOW, received_at)  # not refused for lying in the future instead
    with pytest.raises(ExchangeError) as caught:
        verify_receipt(
            federation,
            PROCURATORATE,
            receipt,
            message_id,
            DIGEST,
            sender=ECOLOGY,
            now=now,
            clock_skew_seconds=SKEW,
        )
    assert caught.value.reason == Reason.UNAUTHENTICATED
    assert f"the key '{receiver_key.key_id}' that signed it was not valid" in caught.value.message
    assert received_at.isoformat() in caught.value.message


def test_a_receipt_without_a_usable_time_is_refused(
    federation: Registry, receiver_key: SigningKey
) -> None:
    message_id = str(uuid.uuid4())
    absent = make_receipt(
        receiver_key, message_id=message_id, envelope_sha256=DIGEST, received_at=None
    )
    assert "it has no received_at" in refusal(federation, absent, message_id)
    ahead = make_receipt(
        receiver_key,
        message_id=message_id,
        envelope_sha256=DIGEST,
        received_at=NOW + timedelta(seconds=SKEW + 1),
    )
    assert "more than 300 s ahead of this node's clock" in refusal(federation, ahead, message_id)
    absurd = envelope_pb2.Receipt(
        message_id=message_id, envelope_sha256=DIGEST, sender=ECOLOGY, receiver=PROCURATORATE
    )
    absurd.received_at.seconds = 2**62
    signed = sign_envelope(absurd.SerializeToString(), RECEIPT_PAYLOAD_TYPE, receiver_key)
    assert "is no valid time" in refusal(federation, signed, message_id)


def test_a_receipt_for_another_envelope_or_message_is_refused_in_bounded_words(
    federation: Registry, receiver_key: SigningKey
) -> None:
    message_id = str(uuid.uuid4())
    other = make_receipt(
        receiver_key,
        message_id=message_id,
        envelope_sha256=hashlib.sha256(b"another").digest(),
        received_at=NOW,
    )
    text = refusal(federation, other, message_id)
    assert f"its envelope digest '{hashlib.sha256(b'another').hexdigest()}' differs" in text
    # Peer strings of any length are cut; control characters are escaped.
    huge = make_receipt(
        receiver_key,
        message_id="\x1b[31m" + "x" * 100_000,
        envelope_sha256=b"\xff" * 50_000,
        receiver="y" * 100_000,
        received_at=NOW,
    )
    text = refusal(federation, huge, message_id)
    assert "it names message '\\x1b[31mxxx" in text
    assert "\x1b" not in text
    assert "it is signed as receiver 'yyy" in text
    assert text.count("…[") == 3
    assert len(text.encode()) <= 1024


def test_a_receipt_that_is_not_signed_by_the_receiver_is_refused(
    federation: Registry, receiver_key: SigningKey
) -> None:
    message_id = str(uuid.uuid4())
    receipt = make_receipt(
        receiver_key, message_id=message_id, envelope_sha256=DIGEST, received_at=NOW
    )
    receipt.signatures[0].sig = (
        bytes([receipt.signatures[0].sig[0] ^ 1]) + (receipt.signatures[0].sig[1:])
    )
    with pytest.raises(ExchangeError) as caught:
        check(federation, receipt, message_id)
    assert caught.value.reason == Reason.UNAUTHENTICATED
    assert "does not verify" in caught.value.message
    stranger = make_receipt(
        new_key(), message_id=message_id, envelope_sha256=DIGEST, received_at=NOW
    )
    assert "not a key of this sender" in refusal(federation, stranger, message_id)
    # A flood of unknown key ids is named in bounded words.
    flood = envelope_pb2.Envelope(payload=receipt.payload, payload_type=RECEIPT_PAYLOAD_TYPE)
    for n in range(30_000):
        flood.signatures.add(keyid=f"{n:016x}", sig=bytes(64))
    assert len(refusal(federation, flood, message_id)) < 400
    not_a_receipt = sign_envelope(b"\xff\xff\xff", RECEIPT_PAYLOAD_TYPE, receiver_key)
    assert "not a liandong.v1.Receipt" in refusal(federation, not_a_receipt, message_id)


def due(message_id: str) -> Due:
    return Due(PROCURATORATE, message_id, "clue", b"", DIGEST.hex(), 0)


def test_a_receivers_proof_is_kept_when_true_and_refused_when_not(
    federation: Registry, receiver_key: SigningKey
) -> None:
    message_id = str(uuid.uuid4())
    entry = received_entry(PROCURATORATE, ECOLOGY, message_id, DIGEST.hex())
    good = make_proof(receiver_key, federation.federation, PROCURATORATE, entry)
    opened = OpenedCheckpoints()

    def proof_check(text: bytes, log_index: int = 0) -> bytes:
        return check_receiver_proof(
            federation, PROCURATORATE, text, log_index, due(message_id), opened
        )

    assert proof_check(b"") == b""  # a repeat, or a receiver just restarted: allowed
    assert proof_check(good) == good
    cases = {
        "proves entry 0, the receipt names 5": (good, 5),
        "tlog-proof for index 0": (
            make_proof(receiver_key, federation.federation, PROCURATORATE, entry, root=bytes(32)),
            0,
        ),
        "the note is not signed by": (  # a checkpoint signed by another key
            make_proof(new_key(), federation.federation, PROCURATORATE, entry),
            0,
        ),
        "does not record receiving this envelope": (
            make_proof(
                receiver_key,
                federation.federation,
                PROCURATORATE,
                received_entry(PROCURATORATE, ECOLOGY, str(uuid.uuid4()), DIGEST.hex()),
            ),
            0,
        ),
        "tlog-proof: the first line": (b"x" * 100_000 + b"\n\nnote", 0),
    }
    for phrase, (text, log_index) in cases.items():
        with pytest.raises(ExchangeError) as caught:
            proof_check(text, log_index)
        message = caught.value.message
        assert phrase in message, message
        assert message.startswith(f"the proof {PROCURATORATE} sent with its receipt for")
        assert len(message) < 500


def test_bounded_escapes_and_cuts() -> None:
    assert bounded("短文本 plain") == "短文本 plain"
    assert bounded("a\nb\x00c") == "a\\nb\\x00c"
    assert len(bounded("x" * 300, 256).encode()) <= 256
    assert bounded("x" * 300, 256).endswith("…[300 bytes]")
    assert len(bounded("\x01" * 300, 256).encode()) <= 256
    assert len(bounded("证" * 10_000).encode()) <= 1024
