"""The Ed25519 primitive (node.ed25519, libsodium): its signatures are the standard ones, and
it refuses what OpenSSL would let through."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from node import ed25519

MESSAGE = "线索移送 2026".encode()


def test_signatures_are_interchangeable_with_openssl() -> None:
    private = Ed25519PrivateKey.generate()
    public = private.public_key()
    ours = ed25519.sign(ed25519.secret_key(private), MESSAGE)
    assert ours == private.sign(MESSAGE)  # Ed25519 signing is deterministic
    public.verify(ours, MESSAGE)
    ed25519.verify(public, private.sign(MESSAGE), MESSAGE)


@pytest.mark.parametrize(
    "change",
    [
        lambda sig, msg: (sig, msg + b"!"),
        lambda sig, msg: (bytes([sig[0] ^ 1]) + sig[1:], msg),
        lambda sig, msg: (sig[:63], msg),
        lambda sig, msg: (sig + b"\0", msg),
    ],
    ids=["message altered", "signature altered", "signature short", "signature long"],
)
def test_anything_altered_does_not_verify(change) -> None:  # type: ignore[no-untyped-def]
    private = Ed25519PrivateKey.generate()
    signature, message = change(ed25519.sign(ed25519.secret_key(private), MESSAGE), MESSAGE)
    with pytest.raises(InvalidSignature):
        ed25519.verify(private.public_key(), signature, message)


def test_a_small_order_key_verifies_nothing_though_openssl_accepts_it() -> None:
    """The identity point as public key and as R, with S = 0, satisfies the verification
    equation for every message: OpenSSL accepts it, libsodium refuses small-order points."""
    identity = bytes([1]) + bytes(31)
    public = Ed25519PublicKey.from_public_bytes(identity)
    forged = identity + bytes(32)
    public.verify(forged, MESSAGE)  # OpenSSL: "valid"
    with pytest.raises(InvalidSignature):
        ed25519.verify(public, forged, MESSAGE)
