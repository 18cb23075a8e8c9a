"""Checkpoints of the audit log in the C2SP tlog-checkpoint format (https://c2sp.org/tlog-checkpoint).

A checkpoint's body is three lines: the origin (which log), the tree size in decimal, and the
root hash in standard base64; it is signed as a C2SP signed note (node.audit.note) with the
node's Ed25519 key under the key name = origin. The origin of a node's log is
``<federation>/<agency id>``, e.g. ``changzhi-env/140400/ecology``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

from node.audit.merkle import HASH_SIZE
from node.audit.note import NoteError, Verifier, check_key_name, verify_note_by_any

_DECIMAL = re.compile(r"^(0|[1-9][0-9]*)$")
MAX_SIZE = (1 << 63) - 1  # what SQLite and PostgreSQL integers hold
_UNSAFE_IN_NAME = re.compile(r"[\s+]+")  # key names have no spaces and no '+'


def log_origin(federation: str, agency: str) -> str:
    """The origin line (and key name) of an agency's audit log."""
    federation_part = _UNSAFE_IN_NAME.sub("-", federation.strip())
    origin = f"{federation_part}/{agency}"
    check_key_name(origin)
    return origin


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    def body(self) -> bytes:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n".encode()


def open_checkpoint(note: bytes, verifiers: Sequence[Verifier]) -> Checkpoint:
    """The checkpoint in a signed note, checked: signed by one of `verifiers` (a log's keys,
    all under its origin), and naming that origin. NoteError otherwise."""
    checkpoint = parse_checkpoint(verify_note_by_any(note, verifiers))
    if verifiers and checkpoint.origin != verifiers[0].name:
        raise NoteError(f"checkpoint of '{checkpoint.origin}', expected '{verifiers[0].name}'")
    return checkpoint


def parse_checkpoint(text: bytes) -> Checkpoint:
    """The checkpoint in a note's text (extension lines are allowed and ignored)."""
    try:
        lines = text.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise NoteError("checkpoint is not UTF-8") from None
    if len(lines) < 4 or lines[-1] != "":
        raise NoteError("checkpoint needs origin, size and root hash lines, each ending in \\n")
    origin, size, root = lines[0], lines[1], lines[2]
    if not origin:
        raise NoteError("checkpoint has an empty origin line")
    if not _DECIMAL.match(size) or int(size) > MAX_SIZE:
        raise NoteError(f"checkpoint size {size[:30]!r} is not a decimal number below 2^63")
    try:
        digest = base64.b64decode(root, validate=True)
    except (ValueError, binascii.Error):
        raise NoteError("checkpoint root hash is not base64") from None
    if len(digest) != HASH_SIZE:
        raise NoteError(f"checkpoint root hash has {len(digest)} bytes, not {HASH_SIZE}")
    return Checkpoint(origin, int(size), digest)
