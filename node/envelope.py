"""DSSE v1 envelopes, and C2SP signed notes: the only module in Liandong that signs.

Protocol: https://github.com/secure-systems-lab/dsse/blob/master/protocol.md
The signature covers PAE(payload_type, payload), so the receiver verifies the exact
bytes it received before parsing them; nothing is ever re-serialized for checking.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from node import ed25519
from node._pb.liandong.v1 import envelope_pb2
from node.audit import note
from node.exchange.errors import shown, shown_list
from node.identity import SigningKey

MESSAGE_PAYLOAD_TYPE = "application/vnd.liandong.message+protobuf"
RECEIPT_PAYLOAD_TYPE = "application/vnd.liandong.receipt+protobuf"
REGISTRY_PAYLOAD_TYPE = "application/vnd.liandong.registry+json"


# Signatures one envelope may carry (docs/protocol.md 4.4): Liandong signs with one key, a
# few allow for several signers; 30,000 must not be read at all.
MAX_SIGNATURES = 4


class EnvelopeError(Exception):
    """An envelope that cannot be accepted; str() says what is wrong and what to check."""


class TooManySignatures(EnvelopeError):
    """More signatures than MAX_SIGNATURES: a size limit, refused before any is verified."""


def check_signature_count(envelope: envelope_pb2.Envelope) -> None:
    if len(envelope.signatures) > MAX_SIGNATURES:
        raise TooManySignatures(
            f"envelope carries {len(envelope.signatures)} signatures; at most "
            f"{MAX_SIGNATURES} are accepted"
        )


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: "DSSEv1" SP len(type) SP type SP len(body) SP body."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def sign_envelope(payload: bytes, payload_type: str, key: SigningKey) -> envelope_pb2.Envelope:
    signature = ed25519.sign(key.secret, pae(payload_type, payload))
    return envelope_pb2.Envelope(
        payload=payload,
        payload_type=payload_type,
        signatures=[envelope_pb2.Signature(keyid=key.key_id, sig=signature)],
    )


def sign_note(text: bytes, name: str, key: SigningKey) -> bytes:
    """A C2SP signed note of `text` (which must end in a newline) by `key` under `name`."""
    if not text.endswith(b"\n"):
        raise ValueError("a note's text ends in a newline")
    public = key.public_bytes()
    signature = ed25519.sign(key.secret, text)
    return (
        text + b"\n" + note.signature_line(name, note.key_id(name, note.ED25519, public), signature)
    )


def cosign_checkpoint(body: bytes, name: str, key: SigningKey, timestamp: int) -> bytes:
    """A tlog-cosignature/v1 signature line for checkpoint `body`, as witness `name`."""
    public = key.public_bytes()
    signature = ed25519.sign(key.secret, note.cosigned_message(body, timestamp))
    return note.signature_line(
        name,
        note.key_id(name, note.COSIGNATURE_V1, public),
        timestamp.to_bytes(8, "big") + signature,
    )


def verify_envelope(
    envelope: envelope_pb2.Envelope,
    payload_type: str,
    public_keys: Mapping[str, Ed25519PublicKey],
) -> str:
    """Return the key id of a signature that verifies, or raise EnvelopeError.

    `public_keys` are the sender's keys from the registry; signatures by other key ids
    are ignored as DSSE allows, but at least one must be known and valid. Each known key is
    tried once, with the first signature naming it, and more than MAX_SIGNATURES
    signatures is TooManySignatures: the work is bounded by the sender's keys.
    """
    check_signature_count(envelope)
    if envelope.payload_type != payload_type:
        raise EnvelopeError(
            f"envelope payload type is {shown(envelope.payload_type, 80)}, "
            f"expected {payload_type!r}"
        )
    if not envelope.signatures:
        raise EnvelopeError("envelope has no signature")
    first_by_key: dict[str, bytes] = {}
    for signature in envelope.signatures:
        if signature.keyid in public_keys:
            first_by_key.setdefault(signature.keyid, signature.sig)
    if not first_by_key:
        ids = [s.keyid for s in envelope.signatures]
        noun = "key id" if len(ids) == 1 else "key ids"
        which = "which is not a key" if len(ids) == 1 else "none of which is a key"
        raise EnvelopeError(
            f"envelope signed with {noun} {shown_list(ids)}, {which} of this sender in the "
            "federation registry"
        )
    message = pae(envelope.payload_type, envelope.payload)
    for key_id, sig in first_by_key.items():
        try:
            ed25519.verify(public_keys[key_id], sig, message)
        except InvalidSignature:
            continue
        return key_id
    tried = ", ".join(repr(key_id) for key_id in first_by_key)
    raise EnvelopeError(
        f"envelope signature does not verify with key {tried} (payload altered or wrong key)"
    )


def envelope_digest(envelope: envelope_pb2.Envelope) -> bytes:
    """SHA-256 of the deterministic serialization; the value receipts and the audit log name."""
    return hashlib.sha256(envelope.SerializeToString(deterministic=True)).digest()


def serialize_envelope(envelope: envelope_pb2.Envelope) -> tuple[bytes, bytes]:
    """The deterministic serialization and its digest (as envelope_digest), in one pass."""
    data = envelope.SerializeToString(deterministic=True)
    return data, hashlib.sha256(data).digest()


def envelope_to_json(envelope: envelope_pb2.Envelope) -> bytes:
    """Standard DSSE JSON form (base64 with padding, as in the DSSE spec)."""
    doc = {
        "payload": base64.b64encode(envelope.payload).decode("ascii"),
        "payloadType": envelope.payload_type,
        "signatures": [
            {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")}
            for s in envelope.signatures
        ],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"


def _b64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise EnvelopeError(f"DSSE JSON field {field!r} must be a base64 string")
    # DSSE allows both standard and URL-safe base64; padding may be omitted.
    text = value.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError(f"DSSE JSON field {field!r} is not valid base64") from None


def envelope_from_json(data: bytes) -> envelope_pb2.Envelope:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvelopeError(f"DSSE envelope is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise EnvelopeError("DSSE envelope JSON must be an object")
    for field in ("payload", "payloadType", "signatures"):
        if field not in doc:
            raise EnvelopeError(f"DSSE envelope JSON lacks the field {field!r}")
    payload_type = doc["payloadType"]
    if not isinstance(payload_type, str):
        raise EnvelopeError("DSSE JSON field 'payloadType' must be a string")
    signatures = doc["signatures"]
    if not isinstance(signatures, list):
        raise EnvelopeError("DSSE JSON field 'signatures' must be a list")
    envelope = envelope_pb2.Envelope(
        payload=_b64(doc["payload"], "payload"), payload_type=payload_type
    )
    for i, item in enumerate(signatures):
        if not isinstance(item, dict):
            raise EnvelopeError(f"DSSE JSON field 'signatures[{i}]' must be an object")
        keyid = item.get("keyid", "")
        if not isinstance(keyid, str):
            raise EnvelopeError(f"DSSE JSON field 'signatures[{i}].keyid' must be a string")
        if "sig" not in item:
            raise EnvelopeError(f"DSSE JSON field 'signatures[{i}].sig' is missing")
        envelope.signatures.append(
            envelope_pb2.Signature(keyid=keyid, sig=_b64(item["sig"], f"signatures[{i}].sig"))
        )
    return envelope
