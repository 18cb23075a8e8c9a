"""Federation operator and agency setup: the CA, enrolment requests, member records, publishing.

Layout of a federation directory (operator side):
    ca.key, ca.crt          EC P-256 CA that issues every node's mutual-TLS certificate
    operator.key/.pub       Ed25519 key that signs the registry
    federation.json         operator state: name, last published serial, members
    issued/<slug>.crt       certificates issued by add_member
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node import ed25519
from node.federation import (
    DEFAULT_PERMISSIONS,
    Member,
    MemberKey,
    Registry,
    member_from_json,
    member_to_json,
    parse_endpoint,
    sign_registry,
)
from node.identity import (
    IdentityError,
    agency_slug,
    generate_signing_key,
    key_id_for,
    load_signing_key,
    validate_agency_id,
    write_public_key,
)

URI_SAN_PREFIX = "urn:liandong:agency:"
_CA_VALIDITY = timedelta(days=3650)
# Issued certificates start slightly in the past so a peer whose clock lags a little
# does not reject a freshly issued certificate as not yet valid.
_BACKDATE = timedelta(minutes=5)


class SetupError(Exception):
    """A setup step that cannot proceed; str() names the file and the problem."""


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    # Write-then-rename so a reader never sees half a file (registries are read by nodes).
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SetupError(
            f"{path}: file already exists; refusing to overwrite a private key"
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)


def certificate_fingerprint(cert_der: bytes) -> str:
    return hashlib.sha256(cert_der).hexdigest()


def agency_from_certificate(cert: x509.Certificate) -> str:
    """The agency id named by the certificate's urn:liandong:agency: URI SAN."""
    subject = cert.subject.rfc4514_string()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise SetupError(
            f"certificate {subject!r} has no subjectAltName; expected a URI {URI_SAN_PREFIX}<id>"
        ) from None
    uris = [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(URI_SAN_PREFIX)
    ]
    if len(uris) != 1:
        raise SetupError(
            f"certificate {subject!r} must carry exactly one URI SAN {URI_SAN_PREFIX}<id>, "
            f"found {len(uris)}"
        )
    agency_id = uris[0][len(URI_SAN_PREFIX) :]
    try:
        return validate_agency_id(agency_id)
    except IdentityError as exc:
        raise SetupError(f"certificate {subject!r}: URI SAN {uris[0]!r}: {exc}") from None


def init_federation(directory: Path, name: str) -> None:
    directory = Path(directory)
    if not name.strip():
        raise SetupError("federation name must not be empty")
    targets = ["ca.key", "ca.crt", "operator.key", "operator.pub", "federation.json"]
    existing = [t for t in targets if (directory / t).exists()]
    if existing:
        raise SetupError(
            f"{directory}: a federation already exists here ({', '.join(existing)}); "
            "refusing to overwrite it"
        )
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    _write_private_key(directory / "ca.key", ca_key)
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} federation CA"),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_atomic(directory / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    operator = generate_signing_key(directory / "operator.key")
    write_public_key(directory / "operator.pub", operator.private_key.public_key())
    _save_state(directory, {"name": name, "serial": 0, "members": []})


def init_agency(agency_id: str, endpoint: str, data_dir: Path, name: str | None = None) -> Path:
    try:
        validate_agency_id(agency_id)
        parse_endpoint(endpoint)
    except ValueError as exc:
        raise SetupError(str(exc)) from None
    data_dir = Path(data_dir)
    keys = data_dir / "keys"
    existing = [p for p in (keys / "signing.key", keys / "tls.key") if p.exists()]
    if existing:
        raise SetupError(
            f"{existing[0]}: file already exists; this data directory is already "
            "initialised, refusing to overwrite its keys"
        )
    try:
        signing = generate_signing_key(keys / "signing.key")
    except IdentityError as exc:
        raise SetupError(str(exc)) from None
    tls_key = ec.generate_private_key(ec.SECP256R1())
    _write_private_key(keys / "tls.key", tls_key)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agency_id)]))
        .sign(tls_key, hashes.SHA256())
    )
    request = {
        "agency": agency_id,
        "name": name or agency_id,
        "endpoint": endpoint,
        "signing_key": {
            "key_id": signing.key_id,
            "public_key": base64.b64encode(signing.public_bytes()).decode("ascii"),
        },
        "tls_csr": csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
    }
    path = data_dir / "request.json"
    _write_atomic(path, json.dumps(request, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
    return path


def _load_state(federation_dir: Path) -> dict[str, Any]:
    path = federation_dir / "federation.json"
    try:
        state = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise SetupError(
            f"{path.resolve()}: file not found; is --dir the operator directory? (create one "
            "with: liandong federation init --dir DIR --name NAME)"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SetupError(f"{path}: not valid JSON ({exc})") from None
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("members"), list)
        or not isinstance(state.get("serial"), int)
        or not isinstance(state.get("name"), str)
    ):
        raise SetupError(f"{path}: expected an object with 'name', 'serial' and 'members'")
    return state


def _save_state(federation_dir: Path, state: dict[str, Any]) -> None:
    data = json.dumps(state, indent=2, ensure_ascii=False, sort_keys=True).encode("utf-8")
    _write_atomic(federation_dir / "federation.json", data + b"\n")


def _state_members(federation_dir: Path, state: dict[str, Any]) -> list[Member]:
    path = federation_dir / "federation.json"
    members = []
    for i, raw in enumerate(state["members"]):
        try:
            members.append(member_from_json(raw, f"members[{i}]"))
        except ValueError as exc:
            raise SetupError(f"{path}: {exc}") from None
    return members


def _read_request(path: Path) -> dict[str, Any]:
    try:
        req = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise SetupError(f"enrolment request {path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SetupError(f"enrolment request {path}: not valid JSON ({exc})") from None
    if not isinstance(req, dict):
        raise SetupError(f"enrolment request {path}: expected a JSON object")
    for field in ("agency", "name", "endpoint", "tls_csr"):
        if not isinstance(req.get(field), str) or not req[field]:
            raise SetupError(f"enrolment request {path}: field {field!r} missing or not a string")
    if not isinstance(req.get("signing_key"), dict):
        raise SetupError(f"enrolment request {path}: field 'signing_key' missing")
    return req


def _load_ca(federation_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    crt_path, key_path = federation_dir / "ca.crt", federation_dir / "ca.key"
    try:
        cert = x509.load_pem_x509_certificate(crt_path.read_bytes())
    except FileNotFoundError:
        raise SetupError(f"{crt_path}: file not found; is this a federation directory?") from None
    except ValueError:
        raise SetupError(f"{crt_path}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise SetupError(f"{key_path}: file not found; is this a federation directory?") from None
    except (ValueError, TypeError):
        raise SetupError(f"{key_path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SetupError(f"{key_path}: not an EC private key")
    return cert, key


def add_member(
    federation_dir: Path,
    request_path: Path,
    *,
    valid_days: int = 365,
    now: datetime | None = None,
) -> Path:
    """Issue the TLS certificate for an enrolment request and record the member.

    `now` exists for tests and for back-filling; it defaults to the current time.
    """
    federation_dir, request_path = Path(federation_dir), Path(request_path)
    when = now or _now()
    state = _load_state(federation_dir)
    members = _state_members(federation_dir, state)
    ca_cert, ca_key = _load_ca(federation_dir)
    req = _read_request(request_path)
    where = f"enrolment request {request_path}"

    agency_id = req["agency"]
    try:
        validate_agency_id(agency_id)
        host, _ = parse_endpoint(req["endpoint"])
    except ValueError as exc:
        raise SetupError(f"{where}: {exc}") from None

    sk = req["signing_key"]
    try:
        public = base64.b64decode(str(sk.get("public_key", "")), validate=True)
    except (binascii.Error, ValueError):
        raise SetupError(f"{where}: signing_key.public_key is not valid base64") from None
    if len(public) != 32:
        raise SetupError(f"{where}: signing_key.public_key must be 32 bytes, got {len(public)}")
    if not ed25519.usable_public_key(public):
        raise SetupError(
            f"{where}: signing_key.public_key is not a usable Ed25519 key (a small-order or "
            "non-canonical point, with which no signature verifies); the agency should make a "
            "new request with 'liandong init'"
        )
    key_id = key_id_for(public)
    if sk.get("key_id") != key_id:
        raise SetupError(
            f"{where}: signing_key.key_id {sk.get('key_id')!r} does not match the public key "
            f"(expected {key_id!r})"
        )

    try:
        csr = x509.load_pem_x509_csr(req["tls_csr"].encode("ascii"))
    except ValueError:
        raise SetupError(f"{where}: tls_csr is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise SetupError(f"{where}: tls_csr signature does not verify (request altered?)")
    cns = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [agency_id]:
        raise SetupError(f"{where}: tls_csr common name is {cns!r}, expected [{agency_id!r}]")
    csr_key = csr.public_key()
    if not isinstance(csr_key, ec.EllipticCurvePublicKey):
        raise SetupError(f"{where}: tls_csr key must be EC P-256, got {type(csr_key).__name__}")

    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(URI_SAN_PREFIX + agency_id)]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agency_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(csr_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(when - _BACKDATE)
        .not_valid_after(when + timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    out = federation_dir / "issued" / f"{agency_slug(agency_id)}.crt"
    _write_atomic(out, cert.public_bytes(serialization.Encoding.PEM))

    previous = next((m for m in members if m.agency_id == agency_id), None)
    if previous is None:
        signing_keys: tuple[MemberKey, ...] = (MemberKey(key_id, public, when, None),)
    elif any(k.key_id == key_id for k in previous.signing_keys):
        signing_keys = previous.signing_keys
    else:
        # Rotation: old keys stay listed so messages they signed still verify, but their
        # window closes now so they cannot sign anything newer.
        closed = tuple(
            MemberKey(k.key_id, k.public_key, k.not_before, when)
            if k.not_after is None or k.not_after > when
            else k
            for k in previous.signing_keys
        )
        signing_keys = (*closed, MemberKey(key_id, public, when, None))
    # Only the newest TLS certificate is listed: the old TLS key is being replaced, and
    # unlike a signing key it has no past messages that need to stay verifiable.
    fingerprints = (certificate_fingerprint(der),)
    if previous is None:
        member = Member(agency_id, req["name"], req["endpoint"], signing_keys, fingerprints)
    else:  # what the operator set for the member (supervisor, auditor) stays
        member = replace(
            previous,
            name=req["name"],
            endpoint=req["endpoint"],
            signing_keys=signing_keys,
            tls_fingerprints=fingerprints,
        )
    members = [m for m in members if m.agency_id != agency_id] + [member]
    members.sort(key=lambda m: m.agency_id)
    state["members"] = [member_to_json(m) for m in members]
    _save_state(federation_dir, state)
    return out


def set_supervisor(federation_dir: Path, agency_id: str, supervisor: str) -> Member:
    """Record which agency escalation notices about ``agency_id`` go to ("" for none); the
    next published registry carries it."""
    federation_dir = Path(federation_dir)
    state = _load_state(federation_dir)
    members = _state_members(federation_dir, state)
    known = {m.agency_id for m in members}
    if agency_id not in known:
        raise SetupError(
            f"{agency_id!r} is not a member of the federation (members: {', '.join(sorted(known))})"
        )
    if supervisor and supervisor not in known:
        raise SetupError(
            f"supervisor {supervisor!r} is not a member of the federation: add it first "
            "(escalations to it could not be delivered)"
        )
    if supervisor == agency_id:
        raise SetupError(f"{agency_id!r} cannot supervise itself")
    updated = [
        replace(m, supervisor=supervisor) if m.agency_id == agency_id else m for m in members
    ]
    state["members"] = [member_to_json(m) for m in updated]
    _save_state(federation_dir, state)
    return next(m for m in updated if m.agency_id == agency_id)


def set_auditor(federation_dir: Path, agency_id: str, auditor: bool) -> Member:
    """Record whether the member ``agency_id`` is an auditor (it may read every entry of
    every member's audit log); the next published registry carries it."""
    federation_dir = Path(federation_dir)
    state = _load_state(federation_dir)
    members = _state_members(federation_dir, state)
    known = {m.agency_id for m in members}
    if agency_id not in known:
        raise SetupError(
            f"{agency_id!r} is not a member of the federation (members: "
            f"{', '.join(sorted(known))}); only a member can be an auditor: add it first"
        )
    updated = [replace(m, auditor=auditor) if m.agency_id == agency_id else m for m in members]
    state["members"] = [member_to_json(m) for m in updated]
    _save_state(federation_dir, state)
    return next(m for m in updated if m.agency_id == agency_id)


def publish(
    federation_dir: Path,
    out: Path,
    *,
    valid_days: int = 30,
    now: datetime | None = None,
) -> Registry:
    """Sign the next registry serial and write it to `out` atomically."""
    federation_dir, out = Path(federation_dir), Path(out)
    when = now or _now()
    state = _load_state(federation_dir)
    members = _state_members(federation_dir, state)
    try:
        operator = load_signing_key(federation_dir / "operator.key")
    except IdentityError as exc:
        raise SetupError(str(exc)) from None
    registry = Registry(
        federation=state["name"],
        serial=state["serial"] + 1,
        issued_at=when,
        expires_at=when + timedelta(days=valid_days),
        members=tuple(members),
        permissions=DEFAULT_PERMISSIONS,
    )
    _write_atomic(out, sign_registry(registry, operator))
    # Recorded only after the file is written: a failed write must not burn a serial
    # that no node has ever seen.
    state["serial"] = registry.serial
    _save_state(federation_dir, state)
    return registry


def check_node_tls(
    cert_pem: bytes,
    key_pem: bytes,
    ca_pem: bytes,
    agency_id: str,
    *,
    cert_path: Path,
    key_path: Path,
    ca_path: Path,
) -> str:
    """Check a node's own TLS files before serving; return the certificate's fingerprint.

    Catches at start-up what would otherwise surface as a bind failure or as every peer
    refusing the handshake: a certificate that does not match its key, was not issued by
    the federation CA, names another agency, or has expired.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise SetupError(f"TLS certificate {cert_path}: not a PEM certificate") from None
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise SetupError(f"federation CA certificate {ca_path}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise SetupError(f"TLS key {key_path}: not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, public) != (
        cert.public_key().public_bytes(serialization.Encoding.PEM, public)
    ):
        raise SetupError(
            f"TLS certificate {cert_path} does not match the TLS key (was it issued for "
            "another request.json?)"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise SetupError(
            f"TLS certificate {cert_path} was not issued by the federation CA in {ca_path}"
        ) from None
    named = agency_from_certificate(cert)
    if named != agency_id:
        raise SetupError(f"TLS certificate {cert_path} names '{named}', not '{agency_id}'")
    if cert.not_valid_before_utc > _now():
        raise SetupError(
            f"TLS certificate {cert_path} is not valid before "
            f"{cert.not_valid_before_utc.isoformat()}; check this host's clock"
        )
    if cert.not_valid_after_utc < _now():
        raise SetupError(
            f"TLS certificate {cert_path} expired at {cert.not_valid_after_utc.isoformat()}; "
            "ask the operator for a new one"
        )
    return certificate_fingerprint(cert.public_bytes(serialization.Encoding.DER))
