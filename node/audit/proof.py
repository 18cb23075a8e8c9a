"""Offline proofs that an entry is in a node's log: the C2SP tlog-proof text format.

https://c2sp.org/tlog-proof: a header line, an optional ``extra`` line (here: the entry
itself, base64, so the proof stands alone), ``index N``, the inclusion proof one base64 hash
per line, an empty line, then the signed checkpoint (with any cosignatures) verbatim.
Anyone holding the node's verifier key can check it with nothing else.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from node.audit.checkpoint import Checkpoint, open_checkpoint, parse_checkpoint
from node.audit.merkle import ProofError, ProvenNodes, leaf_hash, verify_inclusion
from node.audit.note import NoteError, Verifier, split_note

HEADER = b"c2sp.org/tlog-proof@v1"


@dataclass(frozen=True)
class LogProof:
    index: int
    hashes: tuple[bytes, ...]
    checkpoint_note: bytes  # the signed checkpoint, as the log served it
    entry: bytes | None = None  # carried as the proof's extra data

    @property
    def size(self) -> int:
        """The tree size of the checkpoint it is against (as written, not yet verified)."""
        text, _signatures = split_note(self.checkpoint_note)
        return parse_checkpoint(text).size

    def text(self) -> bytes:
        lines = [HEADER]
        if self.entry is not None:
            lines.append(b"extra " + base64.b64encode(self.entry))
        lines.append(b"index %d" % self.index)
        lines.extend(base64.b64encode(h) for h in self.hashes)
        return b"\n".join(lines) + b"\n\n" + self.checkpoint_note


class OpenedCheckpoints:
    """One log's checkpoints already opened with its keys, by note, for checking many proofs:
    a batch of receipts shares a checkpoint, whose signature is then checked once, and their
    proofs share upper paths, hashed once (``merkle.verify_inclusion``). Only the latest
    checkpoint's nodes are kept: proofs come in batches, and a log's would fill memory."""

    def __init__(self) -> None:
        self._by_note: dict[bytes, Checkpoint] = {}
        self._latest = b""
        self._proven: ProvenNodes = {}

    def __len__(self) -> int:
        return len(self._by_note)

    def get(self, note: bytes) -> Checkpoint | None:
        return self._by_note.get(note)

    def add(self, note: bytes, checkpoint: Checkpoint) -> None:
        self._by_note[note] = checkpoint

    def proven(self, note: bytes) -> ProvenNodes:
        """The nodes proofs under ``note``'s checkpoint have shown so far."""
        if note != self._latest:
            self._latest, self._proven = note, {}
        return self._proven


def parse_proof(data: bytes) -> LogProof:
    head, separator, note = data.partition(b"\n\n")
    if not separator:
        raise NoteError("tlog-proof: no empty line before the checkpoint")
    lines = head.split(b"\n")
    if lines[0] != HEADER:
        raise NoteError(f"tlog-proof: the first line must be {HEADER.decode()}")
    position = 1
    entry = None
    try:
        if len(lines) > position and lines[position].startswith(b"extra "):
            entry = base64.b64decode(lines[position][6:], validate=True)
            position += 1
        if len(lines) <= position or not lines[position].startswith(b"index "):
            raise NoteError("tlog-proof: no 'index N' line")
        number = lines[position][6:].decode("ascii")
        if not number.isdigit() or (number.startswith("0") and number != "0"):
            raise NoteError(f"tlog-proof: index {number!r} is not a decimal number")
        # binascii directly: base64.b64decode's checks cost more than the decoding here.
        decode = binascii.a2b_base64
        hashes = tuple(decode(line, strict_mode=True) for line in lines[position + 1 :])
    except (ValueError, binascii.Error) as error:
        if isinstance(error, NoteError):
            raise
        raise NoteError("tlog-proof: a line is not valid base64") from None
    return LogProof(int(number), hashes, note, entry)


def check_receipt_proof(
    proof_text: bytes,
    verifiers: Sequence[Verifier],
    *,
    log_index: int,
    message_id: str,
    envelope_sha256: str,
    opened: OpenedCheckpoints | None = None,
) -> LogProof:
    """A receiver's proof that its log holds the "received" entry of this message (this
    envelope) at the index its receipt names, under a checkpoint it signed. NoteError
    otherwise. `opened`: this receiver's checkpoints already checked, so a batch costs one
    signature check (never share one between logs: a note is trusted once opened)."""
    proof = parse_proof(proof_text)
    if proof.index != log_index or proof.entry is None:
        raise NoteError(f"it proves entry {proof.index}, the receipt names {log_index}")
    try:
        fields = orjson.loads(proof.entry)
    except ValueError:
        raise NoteError("its entry is not JSON") from None
    if not isinstance(fields, dict) or (
        fields.get("event"),
        fields.get("message_id"),
        fields.get("envelope_sha256"),
    ) != ("received", message_id, envelope_sha256):
        raise NoteError("its entry does not record receiving this envelope")
    if opened is None:
        verify_proof(proof, verifiers)
        return proof
    note = proof.checkpoint_note
    checkpoint = verify_proof(
        proof, verifiers, checkpoint=opened.get(note), proven=opened.proven(note)
    )
    opened.add(note, checkpoint)
    return proof


def verify_proof(
    proof: LogProof,
    verifiers: Verifier | Sequence[Verifier],
    entry: bytes | None = None,
    checkpoint: Checkpoint | None = None,
    proven: ProvenNodes | None = None,
) -> Checkpoint:
    """Check a proof of `entry` (default: the one it carries) against the log's keys; return
    the checkpoint it is in. A caller checking many proofs under one checkpoint may pass the
    checkpoint it already opened (from this proof's note) to skip its signature check, and
    the nodes earlier proofs under it showed (``merkle.verify_inclusion``)."""
    entry = proof.entry if entry is None else entry
    if entry is None:
        raise NoteError("tlog-proof carries no entry and none was given to check it against")
    if checkpoint is None:
        keys = [verifiers] if isinstance(verifiers, Verifier) else list(verifiers)
        checkpoint = open_checkpoint(proof.checkpoint_note, keys)
    try:
        verify_inclusion(
            proof.index, checkpoint.size, leaf_hash(entry), proof.hashes, checkpoint.root, proven
        )
    except ProofError as error:
        raise NoteError(f"tlog-proof for index {proof.index}: {error}") from None
    return checkpoint
