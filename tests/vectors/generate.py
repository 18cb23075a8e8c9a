"""Regenerate the known-answer vectors in this directory.

Run from the repository root:  .venv/bin/python tests/vectors/generate.py
Every value is derived from fixed inputs (Ed25519 is deterministic), so running this
again must reproduce the committed files byte for byte; a diff means the wire changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.timestamp_pb2 import Timestamp

from node._pb.liandong.v1 import envelope_pb2
from node.envelope import (
    MESSAGE_PAYLOAD_TYPE,
    RECEIPT_PAYLOAD_TYPE,
    envelope_digest,
    pae,
    sign_envelope,
)
from node.identity import SigningKey

SEED = bytes(range(32))
MESSAGE_ID = "01956b2e-4c00-7000-8000-000000000001"
SENDER = "140400/ecology"
RECIPIENT = "140400/procuratorate"
CREATED_AT = Timestamp(seconds=1740816000)  # 2025-03-01T08:00:00Z
RECEIVED_AT = Timestamp(seconds=1740816005)  # five seconds later


def fixed_message() -> envelope_pb2.Message:
    return envelope_pb2.Message(
        message_id=MESSAGE_ID,
        sender=SENDER,
        recipients=[RECIPIENT],
        created_at=CREATED_AT,
        case_ref="CZ-2025-0001",
        confidentiality=envelope_pb2.CONFIDENTIALITY_INTERNAL,
        clue=envelope_pb2.ClueTransfer(
            title="某化工企业偷排废水",
            facts="2025年2月在浊漳河排污口发现超标排放。",
            subject="长治市某化工有限公司",
            location="山西省长治市",
            legal_basis="《中华人民共和国水污染防治法》第三十九条",
            evidence=["现场监测报告"],
        ),
    )


def marked_version() -> envelope_pb2.Message:
    """A redacted version (docs/protocol.md 5.3): internal, with one field marked
    confidential, naming the first version in version_of and every recipient of both
    versions in all_recipients."""
    message = fixed_message()
    message.message_id = "01956b2e-4c00-7000-8000-000000000002"
    message.recipients[:] = ["140400/discipline"]
    message.clue.ClearField("subject")
    message.field_markings.add(
        field="location", confidentiality=envelope_pb2.CONFIDENTIALITY_CONFIDENTIAL
    )
    message.version_of = MESSAGE_ID
    message.all_recipients[:] = sorted([RECIPIENT, "140400/discipline"])
    return message


def fixed_receipt(message_envelope_sha256: bytes) -> envelope_pb2.Receipt:
    return envelope_pb2.Receipt(
        message_id=MESSAGE_ID,
        envelope_sha256=message_envelope_sha256,
        sender=SENDER,
        receiver=RECIPIENT,
        received_at=RECEIVED_AT,
        log_index=7,
    )


def vector(description: str, payload: bytes, payload_type: str, key: SigningKey) -> dict[str, Any]:
    envelope = sign_envelope(payload, payload_type, key)
    return {
        "description": description,
        "seed": SEED.hex(),
        "public_key": key.public_bytes().hex(),
        "key_id": key.key_id,
        "payload_type": payload_type,
        "payload": payload.hex(),
        "pae": pae(payload_type, payload).hex(),
        "signature": envelope.signatures[0].sig.hex(),
        "envelope": envelope.SerializeToString(deterministic=True).hex(),
        "envelope_sha256": envelope_digest(envelope).hex(),
    }


def build() -> dict[str, dict[str, Any]]:
    key = SigningKey.from_private_key(Ed25519PrivateKey.from_private_bytes(SEED))
    message_payload = fixed_message().SerializeToString(deterministic=True)
    message_vector = vector(
        "Message (ClueTransfer) from 140400/ecology to 140400/procuratorate",
        message_payload,
        MESSAGE_PAYLOAD_TYPE,
        key,
    )
    receipt_payload = fixed_receipt(bytes.fromhex(message_vector["envelope_sha256"]))
    receipt_vector = vector(
        "Receipt for the envelope in envelope.json (signed with the same seed for brevity)",
        receipt_payload.SerializeToString(deterministic=True),
        RECEIPT_PAYLOAD_TYPE,
        key,
    )
    marked_vector = vector(
        "Message with a field marking (location: CONFIDENTIAL), version_of and all_recipients: "
        "a version of envelope.json's message redacted for 140400/discipline",
        marked_version().SerializeToString(deterministic=True),
        MESSAGE_PAYLOAD_TYPE,
        key,
    )
    return {
        "envelope.json": message_vector,
        "receipt.json": receipt_vector,
        "marked.json": marked_vector,
    }


def main() -> None:
    here = Path(__file__).resolve().parent
    for name, doc in build().items():
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
        (here / name).write_text(text, encoding="utf-8")
        print(f"wrote {here / name}")


if __name__ == "__main__":
    main()
