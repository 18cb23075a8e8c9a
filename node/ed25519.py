"""Ed25519 signing and verification, done by libsodium (PyNaCl).

Keys are created, stored and published as ``cryptography`` objects (PEM files, the
registry); only the two operations run in libsodium, because there they are much faster: on
the 2-core machine of 2026-11-24, 16.7 k verifications/s against OpenSSL's 9.1 k, and 44.8 k
signatures/s against 28.8 k (one process, 300-byte messages). Verification is what an
auditor's ``audit verify`` spends its time on, and signing and verifying are four of a
transfer's costs.

libsodium is also the stricter verifier: it rejects non-canonical encodings and small-order
points, which RFC 8032 lets OpenSSL accept. A signature an honest signer made verifies with
both (the known-answer vectors check this with OpenSSL's verify too); a crafted one that only
OpenSSL would accept is refused here.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.bindings import (
    crypto_core_ed25519_is_valid_point,
    crypto_sign,
    crypto_sign_open,
    crypto_sign_seed_keypair,
)
from nacl.exceptions import BadSignatureError

SIGNATURE_BYTES = 64


def secret_key(private_key: Ed25519PrivateKey) -> bytes:
    """libsodium's 64-byte secret key (seed and public key) for ``private_key``: derived once
    per key, since deriving it costs as much as a signature."""
    _public, secret = crypto_sign_seed_keypair(private_key.private_bytes_raw())
    return bytes(secret)


def sign(secret: bytes, message: bytes) -> bytes:
    """The Ed25519 signature of ``message`` by ``secret`` (from :func:`secret_key`)."""
    return bytes(crypto_sign(message, secret)[:SIGNATURE_BYTES])


def verify(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> None:
    """Raise ``cryptography``'s InvalidSignature unless ``signature`` is ``public_key``'s
    signature of ``message`` (the exception the callers already handle)."""
    verify_raw(public_key.public_bytes_raw(), signature, message)


def verify_raw(public_key: bytes, signature: bytes, message: bytes) -> None:
    """:func:`verify` with the key as its 32 bytes (as a C2SP verifier key holds it)."""
    if len(signature) != SIGNATURE_BYTES:
        raise InvalidSignature
    try:
        crypto_sign_open(signature + message, public_key)
    except BadSignatureError:
        raise InvalidSignature from None


def usable_public_key(public: bytes) -> bool:
    """Whether ``public`` (32 bytes) is a key :func:`verify` can verify anything with: a
    canonical point of the prime-order subgroup, as every key Ed25519 generates is. A
    small-order point (which OpenSSL accepts, and with it forged signatures) is not."""
    return len(public) == 32 and bool(crypto_core_ed25519_is_valid_point(public))
