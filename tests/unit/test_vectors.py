"""Known-answer vectors: recompute every value from the seed, independently of node.envelope.

The PAE is built by hand here and the signature checked with `cryptography` directly, so
a bug in node/envelope.py cannot hide behind a vector it generated itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node._pb.liandong.v1 import envelope_pb2
from node.envelope import (
    MESSAGE_PAYLOAD_TYPE,
    RECEIPT_PAYLOAD_TYPE,
    envelope_digest,
    pae,
    sign_envelope,
    verify_envelope,
)
from node.exchange.messages import parse_message
from node.identity import SigningKey

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


def hand_pae(payload_type: str, payload: bytes) -> bytes:
    t = payload_type.encode("utf-8")
    return (
        b"DSSEv1 "
        + str(len(t)).encode("ascii")
        + b" "
        + t
        + b" "
        + str(len(payload)).encode("ascii")
        + b" "
        + payload
    )


@pytest.mark.parametrize(
    ("name", "payload_type"),
    [
        ("envelope.json", MESSAGE_PAYLOAD_TYPE),
        ("receipt.json", RECEIPT_PAYLOAD_TYPE),
        ("marked.json", MESSAGE_PAYLOAD_TYPE),
    ],
)
def test_vector_recomputes_from_seed(name: str, payload_type: str) -> None:
    v = load(name)
    assert v["payload_type"] == payload_type
    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["seed"]))
    public_raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert public_raw.hex() == v["public_key"]
    assert hashlib.sha256(public_raw).hexdigest()[:16] == v["key_id"]

    payload = bytes.fromhex(v["payload"])
    expected_pae = hand_pae(payload_type, payload)
    assert expected_pae.hex() == v["pae"]
    assert pae(payload_type, payload) == expected_pae

    # Ed25519 is deterministic: the same key and message give the same signature.
    signature = private.sign(expected_pae)
    assert signature.hex() == v["signature"]
    private.public_key().verify(bytes.fromhex(v["signature"]), expected_pae)

    # The envelope bytes, built field by field without node.envelope.
    env = envelope_pb2.Envelope(
        payload=payload,
        payload_type=payload_type,
        signatures=[envelope_pb2.Signature(keyid=v["key_id"], sig=signature)],
    )
    env_bytes = env.SerializeToString(deterministic=True)
    assert env_bytes.hex() == v["envelope"]
    assert hashlib.sha256(env_bytes).hexdigest() == v["envelope_sha256"]

    # And node.envelope agrees with all of it.
    key = SigningKey(key_id=v["key_id"], private_key=private)
    signed = sign_envelope(payload, payload_type, key)
    assert signed.SerializeToString(deterministic=True) == env_bytes
    assert envelope_digest(signed).hex() == v["envelope_sha256"]
    assert verify_envelope(signed, payload_type, {v["key_id"]: private.public_key()}) == v["key_id"]


def test_message_vector_payload_fields() -> None:
    msg = envelope_pb2.Message.FromString(bytes.fromhex(load("envelope.json")["payload"]))
    assert msg.sender == "140400/ecology"
    assert list(msg.recipients) == ["140400/procuratorate"]
    assert msg.created_at.seconds == 1740816000
    assert msg.WhichOneof("body") == "clue"


def test_marked_vector_payload_fields() -> None:
    payload = bytes.fromhex(load("marked.json")["payload"])
    # Field 10 (FieldMarking: field 1 "location", confidentiality 2 = 3), then field 11.
    assert bytes.fromhex("520c0a086c6f636174696f6e1003") in payload
    msg = parse_message(payload)  # passes every check of docs/protocol.md 5.3
    assert [(m.field, m.confidentiality) for m in msg.field_markings] == [("location", 3)]
    first = envelope_pb2.Message.FromString(bytes.fromhex(load("envelope.json")["payload"]))
    assert msg.version_of == first.message_id != msg.message_id
    # Field 12, all_recipients: both versions' recipients, sorted, one string each.
    assert bytes.fromhex("6211") + b"140400/discipline" in payload
    assert list(msg.all_recipients) == ["140400/discipline", *first.recipients]


def test_receipt_vector_names_the_message_envelope() -> None:
    receipt = envelope_pb2.Receipt.FromString(bytes.fromhex(load("receipt.json")["payload"]))
    assert receipt.envelope_sha256.hex() == load("envelope.json")["envelope_sha256"]
    assert (
        receipt.message_id
        == envelope_pb2.Message.FromString(
            bytes.fromhex(load("envelope.json")["payload"])
        ).message_id
    )


def test_generator_reproduces_committed_files() -> None:
    spec = importlib.util.spec_from_file_location("vectors_generate", VECTORS / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, doc in module.build().items():
        assert doc == load(name), f"tests/vectors/{name} is stale; run tests/vectors/generate.py"
