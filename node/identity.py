"""Agency identifiers and Ed25519 signing keys.

Signing itself lives in node.envelope only, so every signature in the system is
made over DSSE PAE bytes; SigningKey therefore deliberately has no sign method.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from node import ed25519


class IdentityError(ValueError):
    """A malformed agency id or an unusable key file; str() names the value or path."""


AGENCY_KINDS: frozenset[str] = frozenset(
    {
        "ecology",
        "police",
        "procuratorate",
        "natural_resources",
        "water",
        "forestry",
        "agriculture",
        "housing",
        "transport",
        "health",
        "emergency",
        "urban_management",
        "discipline",
    }
)

_REGION_RE = re.compile(r"[0-9]{6}")
_UNIT_RE = re.compile(r"[a-z0-9_-]{1,32}")
_FORM_HINT = "the form is <region>/<kind>[/<unit>], e.g. 140400/ecology"


def _malformed(value: str, reason: str) -> IdentityError:
    return IdentityError(f"agency id {value!r} is malformed: {reason}; {_FORM_HINT}")


def validate_agency_id(value: str) -> str:
    """Return `value` unchanged if it is a well-formed agency id, else raise IdentityError."""
    if not isinstance(value, str):
        raise IdentityError(f"agency id must be a string, got {type(value).__name__}")
    parts = value.split("/")
    if len(parts) not in (2, 3):
        raise _malformed(value, f"expected 2 or 3 parts separated by '/', got {len(parts)}")
    region, kind = parts[0], parts[1]
    if not _REGION_RE.fullmatch(region):
        raise _malformed(value, f"region {region!r} is not a 6-digit GB/T 2260 code")
    if region == "000000":
        raise _malformed(value, "region '000000' is not an administrative division")
    if kind not in AGENCY_KINDS:
        expected = ", ".join(sorted(AGENCY_KINDS))
        raise _malformed(value, f"unknown kind {kind!r} (expected one of {expected})")
    if len(parts) == 3 and not _UNIT_RE.fullmatch(parts[2]):
        raise _malformed(value, f"unit {parts[2]!r} must be 1-32 characters of [a-z0-9_-]")
    return value


def agency_kind(agency_id: str) -> str:
    """The kind part of a validated agency id, e.g. 'procuratorate'."""
    return validate_agency_id(agency_id).split("/")[1]


def agency_region(agency_id: str) -> str:
    """The region part of a validated agency id, e.g. '140400'."""
    return validate_agency_id(agency_id).split("/")[0]


def agency_slug(agency_id: str) -> str:
    """A file-name-safe form: '140400/ecology' -> '140400-ecology'."""
    return validate_agency_id(agency_id).replace("/", "-")


def key_id_for(public_raw: bytes) -> str:
    """Key id = first 16 hex digits of SHA-256 over the raw 32-byte Ed25519 public key."""
    if len(public_raw) != 32:
        raise IdentityError(f"an Ed25519 public key is 32 raw bytes, got {len(public_raw)} bytes")
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class SigningKey:
    key_id: str
    private_key: Ed25519PrivateKey
    # libsodium's form of the key, derived once (node.ed25519 signs with it).
    secret: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "secret", ed25519.secret_key(self.private_key))

    def public_bytes(self) -> bytes:
        return _raw_public(self.private_key.public_key())

    @classmethod
    def from_private_key(cls, private_key: Ed25519PrivateKey) -> SigningKey:
        return cls(
            key_id=key_id_for(_raw_public(private_key.public_key())), private_key=private_key
        )


def _write_exclusive(path: Path, data: bytes, mode: int, what: str) -> None:
    # O_EXCL makes "refuse to overwrite" atomic; the mode is set at creation so the
    # private key is never readable by others, not even briefly.
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise IdentityError(
            f"{what} {path}: file already exists; refusing to overwrite it "
            "(move it away first if you really mean to replace it)"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    # The umask may have narrowed the mode further; 0600 is exactly what we want.
    os.chmod(path, mode)


def generate_signing_key(path: Path) -> SigningKey:
    """Create a new Ed25519 key, store it as PKCS8 PEM with mode 0600 at `path`."""
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_exclusive(Path(path), pem, 0o600, "signing key")
    return SigningKey.from_private_key(private_key)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{what} {path}: file not found") from None
    except OSError as exc:
        raise IdentityError(f"{what} {path}: cannot read: {exc.strerror}") from None


def load_signing_key(path: Path) -> SigningKey:
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise IdentityError(
            f"signing key {path}: not an Ed25519 private key (expected unencrypted PKCS8 PEM)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(
            f"signing key {path}: not an Ed25519 private key (found {type(key).__name__})"
        )
    return SigningKey.from_private_key(key)


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise IdentityError(
            f"public key {path}: not a PEM SubjectPublicKeyInfo public key"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError(
            f"public key {path}: not an Ed25519 public key (found {type(key).__name__})"
        )
    return key


def write_public_key(path: Path, key: Ed25519PublicKey) -> None:
    """Write `key` as PEM SubjectPublicKeyInfo; replaces an existing file atomically."""
    path = Path(path)
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pem)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
