"""Signed notes and checkpoints, against the published vectors of the Go implementation."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.audit import note
from node.audit.checkpoint import Checkpoint, log_origin, parse_checkpoint
from node.audit.merkle import leaf_hash
from node.audit.proof import LogProof, check_receipt_proof
from node.envelope import cosign_checkpoint, sign_note
from node.identity import SigningKey

# golang.org/x/mod/sumdb/note, note_test.go and the package documentation.
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_TEXT = (
    b"If you think cryptography is the answer to your problem,\n"
    b"then you don't know what your problem is.\n"
)
PETER_NOTE = (
    PETER_TEXT
    + "\n— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqd"
    "ngotpRZb6KE6RyyBwJnAM=\n".encode()
)
# C2SP signed-note's example, and a cosigner key (type 0x04) from transparency-dev/formats.
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = (
    b"This is an example message.\n\n"
    + "— example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3m"
    "FXmRKuwHjG1Yu72IneyaQM=\n".encode()
)
COSIGNER_VKEY = "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2"


def peter_key() -> SigningKey:
    seed = base64.b64decode(PETER_SKEY.split("+", 4)[4])[1:]
    return SigningKey.from_private_key(Ed25519PrivateKey.from_private_bytes(seed))


def test_signing_reproduces_the_published_note() -> None:
    """Ed25519 is deterministic: the same key and text give the very bytes Go published."""
    key = peter_key()
    assert note.vkey("PeterNeumann", key.public_bytes()) == PETER_VKEY
    assert sign_note(PETER_TEXT, "PeterNeumann", key) == PETER_NOTE


def test_published_notes_verify_and_altered_ones_do_not() -> None:
    assert note.verify_note(PETER_NOTE, note.parse_vkey(PETER_VKEY)) == PETER_TEXT
    spec_text = note.verify_note(SPEC_NOTE, note.parse_vkey(SPEC_VKEY))
    assert spec_text == b"This is an example message.\n"
    with pytest.raises(note.NoteError, match="does not verify"):
        note.verify_note(
            PETER_NOTE.replace(b"cryptography", b"cryptographY"), note.parse_vkey(PETER_VKEY)
        )
    with pytest.raises(note.NoteError, match="not signed by"):
        note.verify_note(SPEC_NOTE, note.parse_vkey(PETER_VKEY))


def test_verifier_keys_are_checked() -> None:
    cosigner = note.parse_vkey(COSIGNER_VKEY)  # the 0x04 key id formula matches theirs
    assert cosigner.signature_type == note.COSIGNATURE_V1
    for bad, problem in [
        ("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "does not match"),
        ("PeterNeumann+c74f20a3", "expected"),
        ("Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "without spaces"),
        ("PeterNeumann+c74f20a3+AhpjZA==", "not an Ed25519 key"),
        ("PeterNeumann+zz+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "hex/base64"),
    ]:
        with pytest.raises(note.NoteError, match=problem):
            note.parse_vkey(bad)


def test_malformed_notes_are_refused_with_the_reason() -> None:
    verifier = note.parse_vkey(PETER_VKEY)
    for data, problem in [
        (PETER_TEXT, "no blank line"),
        (PETER_TEXT + b"\n", "no signature"),
        (PETER_TEXT + b"\n- PeterNeumann AAAA\n", "does not start"),
        (PETER_TEXT + "\n— PeterNeumann !!!\n".encode(), "not '— <name> <base64>'"),
        (PETER_TEXT + "\n— PeterNeumann AAAA\n".encode(), "too short"),
    ]:
        with pytest.raises(note.NoteError, match=problem):
            note.verify_note(data, verifier)


def test_checkpoints_round_trip_and_cosignatures_verify() -> None:
    origin = log_origin("changzhi env", "140400/ecology")
    assert origin == "changzhi-env/140400/ecology"
    checkpoint = Checkpoint(origin, 20852163, bytes(range(32)))
    body = checkpoint.body()
    assert body == (
        b"changzhi-env/140400/ecology\n20852163\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
    )
    assert parse_checkpoint(body) == checkpoint
    witness = SigningKey.from_private_key(Ed25519PrivateKey.generate())
    line = cosign_checkpoint(body, "changzhi-env/140400/police", witness, 1679315147)
    _, [signature] = note.split_note(body + b"\n" + line)
    verifier = note.parse_vkey(
        note.vkey("changzhi-env/140400/police", witness.public_bytes(), note.COSIGNATURE_V1)
    )
    assert note.verify_cosignature(body, signature, verifier) == 1679315147
    other = Checkpoint(origin, 20852164, bytes(range(32))).body()
    with pytest.raises(note.NoteError, match="does not verify"):
        note.verify_cosignature(other, signature, verifier)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b"origin\n12\n", "needs origin"),
        (b"\n12\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n", "empty origin"),
        (b"o\n012\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n", "not a decimal"),
        (b"o\n12\nAAECAwQ=\n", "has 5 bytes"),
        (b"o\n12\n!!\n", "not base64"),
    ],
)
def test_malformed_checkpoints_are_refused(text: bytes, problem: str) -> None:
    with pytest.raises(note.NoteError, match=problem):
        parse_checkpoint(text)


@pytest.mark.parametrize("entry", [b"[]", b'"received"', b"not json", b"\xff\xfe"])
def test_a_receipt_proof_whose_entry_is_no_object_is_refused(entry: bytes) -> None:
    """Bytes from a peer: refused with a reason, never an AttributeError in the delivery path."""
    key = peter_key()
    body = Checkpoint("o/140400/police", 1, leaf_hash(entry)).body()
    proof = LogProof(0, (), sign_note(body, "o/140400/police", key), entry)
    verifier = note.parse_vkey(note.vkey("o/140400/police", key.public_bytes()))
    with pytest.raises(note.NoteError, match="entry"):
        check_receipt_proof(
            proof.text(), [verifier], log_index=0, message_id="m", envelope_sha256="00"
        )
