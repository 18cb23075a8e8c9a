from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from node._pb.liandong.v1 import envelope_pb2
from node.envelope import (
    MESSAGE_PAYLOAD_TYPE,
    RECEIPT_PAYLOAD_TYPE,
    REGISTRY_PAYLOAD_TYPE,
    EnvelopeError,
    envelope_digest,
    envelope_from_json,
    envelope_to_json,
    pae,
    sign_envelope,
    verify_envelope,
)
from node.identity import SigningKey


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.from_private_key(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))


def keys_of(key: SigningKey) -> dict[str, Ed25519PublicKey]:
    return {key.key_id: key.private_key.public_key()}


def test_payload_types() -> None:
    assert MESSAGE_PAYLOAD_TYPE == "application/vnd.liandong.message+protobuf"
    assert RECEIPT_PAYLOAD_TYPE == "application/vnd.liandong.receipt+protobuf"
    assert REGISTRY_PAYLOAD_TYPE == "application/vnd.liandong.registry+json"


def test_pae_matches_dsse_spec_example() -> None:
    # The example from the DSSE protocol document.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("类型", b"") == b"DSSEv1 6 " + "类型".encode() + b" 0 "


def test_round_trip(key: SigningKey) -> None:
    env = sign_envelope(b"payload", MESSAGE_PAYLOAD_TYPE, key)
    assert env.payload == b"payload"
    assert [s.keyid for s in env.signatures] == [key.key_id]
    assert len(env.signatures[0].sig) == 64
    assert verify_envelope(env, MESSAGE_PAYLOAD_TYPE, keys_of(key)) == key.key_id


def test_tampered_payload(key: SigningKey) -> None:
    env = sign_envelope(b"payload", MESSAGE_PAYLOAD_TYPE, key)
    env.payload = b"paylo4d"
    with pytest.raises(EnvelopeError, match=r"does not verify with key .*payload altered"):
        verify_envelope(env, MESSAGE_PAYLOAD_TYPE, keys_of(key))


def test_payload_type_is_signed(key: SigningKey) -> None:
    env = sign_envelope(b"payload", MESSAGE_PAYLOAD_TYPE, key)
    env.payload_type = RECEIPT_PAYLOAD_TYPE
    with pytest.raises(EnvelopeError, match="does not verify"):
        verify_envelope(env, RECEIPT_PAYLOAD_TYPE, keys_of(key))


def test_wrong_payload_type(key: SigningKey) -> None:
    env = sign_envelope(b"payload", RECEIPT_PAYLOAD_TYPE, key)
    with pytest.raises(EnvelopeError) as info:
        verify_envelope(env, MESSAGE_PAYLOAD_TYPE, keys_of(key))
    assert RECEIPT_PAYLOAD_TYPE in str(info.value)
    assert MESSAGE_PAYLOAD_TYPE in str(info.value)


def test_unknown_keyid(key: SigningKey) -> None:
    env = sign_envelope(b"payload", MESSAGE_PAYLOAD_TYPE, key)
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(
        EnvelopeError,
        match=f"signed with key id '{key.key_id}', which is not a key of this sender",
    ):
        verify_envelope(env, MESSAGE_PAYLOAD_TYPE, {"0000000000000000": other})


def test_known_keyid_wrong_key(key: SigningKey) -> None:
    env = sign_envelope(b"payload", MESSAGE_PAYLOAD_TYPE, key)
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(EnvelopeError, match="does not verify"):
        verify_envelope(env, MESSAGE_PAYLOAD_TYPE, {key.key_id: other})


def test_no_signature(key: SigningKey) -> None:
    env = envelope_pb2.Envelope(payload=b"x", payload_type=MESSAGE_PAYLOAD_TYPE)
    with pytest.raises(EnvelopeError, match="envelope has no signature"):
        verify_envelope(env, MESSAGE_PAYLOAD_TYPE, keys_of(key))


def test_extra_unknown_signature_is_ignored(key: SigningKey) -> None:
    env = sign_envelope(b"payload", MESSAGE_PAYLOAD_TYPE, key)
    env.signatures.insert(0, envelope_pb2.Signature(keyid="stranger", sig=b"\0" * 64))
    assert verify_envelope(env, MESSAGE_PAYLOAD_TYPE, keys_of(key)) == key.key_id


def test_digest_is_sha256_of_serialization(key: SigningKey) -> None:
    import hashlib

    env = sign_envelope(b"payload", MESSAGE_PAYLOAD_TYPE, key)
    digest = envelope_digest(env)
    assert len(digest) == 32
    assert digest == hashlib.sha256(env.SerializeToString(deterministic=True)).digest()
    env.payload = b"other"
    assert envelope_digest(env) != digest


def test_json_round_trip(key: SigningKey) -> None:
    env = sign_envelope("数据".encode(), REGISTRY_PAYLOAD_TYPE, key)
    data = envelope_to_json(env)
    doc = json.loads(data)
    assert set(doc) == {"payload", "payloadType", "signatures"}
    assert base64.b64decode(doc["payload"]) == env.payload
    assert doc["signatures"][0]["keyid"] == key.key_id
    back = envelope_from_json(data)
    assert back == env
    assert verify_envelope(back, REGISTRY_PAYLOAD_TYPE, keys_of(key)) == key.key_id


def test_json_accepts_urlsafe_unpadded_base64(key: SigningKey) -> None:
    env = sign_envelope(b"\xfb\xff\xfe?", REGISTRY_PAYLOAD_TYPE, key)
    doc = {
        "payload": base64.urlsafe_b64encode(env.payload).decode().rstrip("="),
        "payloadType": env.payload_type,
        "signatures": [
            {"keyid": key.key_id, "sig": base64.urlsafe_b64encode(env.signatures[0].sig).decode()}
        ],
    }
    assert envelope_from_json(json.dumps(doc).encode()) == env


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"{", "not valid JSON"),
        (b"[]", "must be an object"),
        (b'{"payloadType": "x", "signatures": []}', "'payload'"),
        (
            b'{"payload": "!!", "payloadType": "x", "signatures": []}',
            "'payload' is not valid base64",
        ),
        (b'{"payload": "", "payloadType": 3, "signatures": []}', "'payloadType'"),
        (b'{"payload": "", "payloadType": "x", "signatures": {}}', "'signatures'"),
        (b'{"payload": "", "payloadType": "x", "signatures": [1]}', "signatures[0]"),
        (
            b'{"payload": "", "payloadType": "x", "signatures": [{"keyid": "a"}]}',
            "signatures[0].sig",
        ),
    ],
)
def test_json_malformed(data: bytes, fragment: str) -> None:
    with pytest.raises(EnvelopeError) as info:
        envelope_from_json(data)
    assert fragment in str(info.value)


def test_each_known_key_is_tried_once_however_many_signatures_name_it(
    key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad signatures under the sender's key id ahead of a good one cost one verification:
    the first signature naming a key is the one tried."""
    from node import ed25519

    envelope = sign_envelope(b"payload", MESSAGE_PAYLOAD_TYPE, key)
    bad = envelope_pb2.Signature(keyid=key.key_id, sig=b"\x01" * 64)
    flooded = envelope_pb2.Envelope(
        payload=envelope.payload,
        payload_type=envelope.payload_type,
        signatures=[bad] * 3 + list(envelope.signatures),
    )
    calls = []
    real_verify = ed25519.verify

    def counting(*args: object) -> None:
        calls.append(1)
        real_verify(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(ed25519, "verify", counting)
    with pytest.raises(EnvelopeError, match="does not verify"):
        verify_envelope(flooded, MESSAGE_PAYLOAD_TYPE, keys_of(key))
    assert len(calls) == 1


def test_refusals_quote_at_most_a_few_bounded_key_ids(key: SigningKey) -> None:
    envelope = sign_envelope(b"payload", MESSAGE_PAYLOAD_TYPE, key)
    strangers = envelope_pb2.Envelope(
        payload=envelope.payload,
        payload_type=envelope.payload_type,
        signatures=[envelope_pb2.Signature(keyid=f"{n:0>5}" * 2000, sig=b"") for n in range(4)],
    )
    with pytest.raises(EnvelopeError) as caught:
        verify_envelope(strangers, MESSAGE_PAYLOAD_TYPE, keys_of(key))
    text = str(caught.value)
    assert "and 1 more" in text
    assert len(text) < 400


def test_a_huge_payload_type_is_not_echoed(key: SigningKey) -> None:
    envelope = sign_envelope(b"payload", MESSAGE_PAYLOAD_TYPE, key)
    envelope.payload_type = "x" * 3_000_000
    with pytest.raises(EnvelopeError) as caught:
        verify_envelope(envelope, MESSAGE_PAYLOAD_TYPE, keys_of(key))
    assert len(str(caught.value)) < 300


def test_more_than_four_signatures_are_refused_before_any_is_verified(key: SigningKey) -> None:
    from node.envelope import TooManySignatures

    envelope = sign_envelope(b"payload", MESSAGE_PAYLOAD_TYPE, key)
    flooded = envelope_pb2.Envelope(
        payload=envelope.payload,
        payload_type=envelope.payload_type,
        signatures=list(envelope.signatures) * 30_000,
    )
    with pytest.raises(TooManySignatures, match="carries 30000 signatures; at most 4"):
        verify_envelope(flooded, MESSAGE_PAYLOAD_TYPE, keys_of(key))
