"""C2SP signed notes (https://c2sp.org/signed-note): key ids, verifier keys, parsing, checks.

A signed note is UTF-8 text ending in a newline, a blank line, then one signature line per
signer: ``— <key name> <base64(4-byte key id || signature)>`` (U+2014 em dash). The key id
is the first four bytes of SHA-256(key name || "\\n" || signature type || public key). This
module only reads and checks notes; making signatures is node.envelope's job, the only
module that signs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature

from node import ed25519

ED25519 = 0x01  # signature type of an Ed25519 note signature (a log's checkpoint)
COSIGNATURE_V1 = 0x04  # signature type of a tlog-cosignature/v1 Ed25519 cosignature
SIGNATURE_PREFIX = "— ".encode()
MAX_SIGNATURES = 100


class NoteError(ValueError):
    """A note or key that is malformed or does not verify; str() says which and why."""


def key_id(name: str, signature_type: int, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([signature_type]) + public_key).digest()[:4]


def check_key_name(name: str) -> None:
    if not name or any(ch.isspace() or ch == "+" for ch in name):
        raise NoteError(f"key name {name!r} must be non-empty, without spaces or '+'")


def vkey(name: str, public_key: bytes, signature_type: int = ED25519) -> str:
    """The verifier key string: <name>+<hex key id>+<base64(type || public key)>."""
    check_key_name(name)
    material = base64.b64encode(bytes([signature_type]) + public_key).decode()
    return f"{name}+{key_id(name, signature_type, public_key).hex()}+{material}"


@dataclass(frozen=True)
class Verifier:
    name: str
    key_id: bytes
    signature_type: int
    public_key: bytes


def parse_vkey(text: str) -> Verifier:
    parts = text.split("+", 2)  # the base64 key may itself contain "+"
    if len(parts) != 3:
        raise NoteError(f"verifier key {text[:60]!r}: expected <name>+<key id>+<key>")
    name, hex_id, material = parts
    check_key_name(name)
    try:
        expected_id = bytes.fromhex(hex_id)
        raw = base64.b64decode(material, validate=True)
    except (ValueError, binascii.Error):
        raise NoteError(f"verifier key for {name!r}: key id or key is not hex/base64") from None
    if len(raw) != 33 or raw[0] not in (ED25519, COSIGNATURE_V1):
        raise NoteError(f"verifier key for {name!r}: not an Ed25519 key (type 0x01 or 0x04)")
    if key_id(name, raw[0], raw[1:]) != expected_id:
        raise NoteError(f"verifier key for {name!r}: the key id does not match the key")
    return Verifier(name, expected_id, raw[0], raw[1:])


def signature_line(name: str, key: bytes, signature: bytes) -> bytes:
    return SIGNATURE_PREFIX + f"{name} ".encode() + base64.b64encode(key + signature) + b"\n"


@dataclass(frozen=True)
class NoteSignature:
    name: str
    key_id: bytes
    signature: bytes  # after the key id: for a cosignature, timestamp then signature

    def line(self) -> bytes:
        return signature_line(self.name, self.key_id, self.signature)


def parse_signature_line(line: bytes, number: int = 1) -> NoteSignature:
    """One signature line (with or without its newline), or NoteError."""
    line = line.rstrip(b"\n")
    if not line.startswith(SIGNATURE_PREFIX) or b"\n" in line:
        raise NoteError(f"signature line {number} does not start with '— '")
    try:
        name, encoded = line[len(SIGNATURE_PREFIX) :].decode().split(" ")
        raw = base64.b64decode(encoded, validate=True)
    except (UnicodeDecodeError, ValueError, binascii.Error):
        raise NoteError(f"signature line {number} is not '— <name> <base64>'") from None
    if len(raw) < 5:
        raise NoteError(f"signature line {number} is too short")
    return NoteSignature(name, raw[:4], raw[4:])


def split_note(data: bytes) -> tuple[bytes, list[NoteSignature]]:
    """(text, signatures) of a signed note, or NoteError; signatures are not checked here."""
    cut = data.rfind(b"\n\n")
    if cut < 0 or not data.endswith(b"\n"):
        raise NoteError("not a signed note: no blank line before the signatures")
    text, lines = data[: cut + 1], data[cut + 2 :].splitlines()
    if not lines:
        raise NoteError("signed note has no signature")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"signed note has more than {MAX_SIGNATURES} signatures")
    return text, [parse_signature_line(line, n) for n, line in enumerate(lines, 1)]


def verify_note(data: bytes, verifier: Verifier) -> bytes:
    """The note's text if `verifier` signed it (Ed25519 note signature), else NoteError."""
    text, signatures = split_note(data)
    for signature in signatures:
        if signature.name == verifier.name and signature.key_id == verifier.key_id:
            try:
                ed25519.verify_raw(verifier.public_key, signature.signature, text)
            except InvalidSignature:
                raise NoteError(f"signature by {verifier.name} does not verify") from None
            return text
    raise NoteError(f"the note is not signed by {verifier.name} (key {verifier.key_id.hex()})")


def verify_note_by_any(data: bytes, verifiers: Sequence[Verifier]) -> bytes:
    """verify_note with each key a signer had (key rotation): the text, or the last failure."""
    failure = "no verifier key to check it with"
    for verifier in verifiers:
        try:
            return verify_note(data, verifier)
        except NoteError as error:
            failure = str(error)
    raise NoteError(failure)


def cosigned_message(body: bytes, timestamp: int) -> bytes:
    """What a tlog-cosignature/v1 Ed25519 cosigner signs for checkpoint `body`."""
    return b"cosignature/v1\ntime %d\n" % timestamp + body


def verify_cosignature(body: bytes, signature: NoteSignature, verifier: Verifier) -> int:
    """The cosignature's timestamp if `verifier` cosigned checkpoint `body`, else NoteError."""
    if signature.name != verifier.name or signature.key_id != verifier.key_id:
        raise NoteError(f"cosignature is not by {verifier.name}")
    if len(signature.signature) != 8 + 64:
        raise NoteError(f"cosignature by {verifier.name} is not a timestamped Ed25519 signature")
    timestamp = int.from_bytes(signature.signature[:8], "big")
    if timestamp >= 1 << 63:
        raise NoteError(f"cosignature by {verifier.name} has an impossible timestamp")
    try:
        ed25519.verify_raw(
            verifier.public_key, signature.signature[8:], cosigned_message(body, timestamp)
        )
    except InvalidSignature:
        raise NoteError(f"cosignature by {verifier.name} does not verify") from None
    return timestamp


def verify_cosignature_by_any(
    body: bytes, signature: NoteSignature, verifiers: Sequence[Verifier]
) -> int:
    """verify_cosignature with each key the witness had: the timestamp, or the last failure."""
    failure = "no verifier key to check it with"
    for verifier in verifiers:
        try:
            return verify_cosignature(body, signature, verifier)
        except NoteError as error:
            failure = str(error)
    raise NoteError(failure)
