"""The federation registry: members, their keys and endpoints, and who may send what to whom.

This is the only module that verifies a registry. The registry travels as a DSSE JSON
envelope signed by the federation operator; a node trusts nothing in it until the
signature, serial (rollback) and expiry checks in verify_registry have passed.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from node.audit.checkpoint import log_origin
from node.audit.note import COSIGNATURE_V1, Verifier, parse_vkey, vkey
from node.envelope import (
    REGISTRY_PAYLOAD_TYPE,
    EnvelopeError,
    envelope_from_json,
    envelope_to_json,
    sign_envelope,
    verify_envelope,
)
from node.identity import (
    AGENCY_KINDS,
    IdentityError,
    SigningKey,
    key_id_for,
    validate_agency_id,
)

FAMILIES: tuple[str, ...] = (
    "clue",
    "crime_transfer",
    "notice",
    "evidence_request",
    "recommendation",
    "reply",
)

_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")


class RegistryError(Exception):
    """A registry that must not be used; str() starts with where it came from."""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 hosts in brackets); ValueError says what is wrong."""
    if not isinstance(endpoint, str) or ":" not in endpoint:
        raise ValueError(f"endpoint {endpoint!r} must have the form host:port, e.g. 10.0.0.5:7443")
    host, _, port_text = endpoint.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError(f"endpoint {endpoint!r} has no usable host; the form is host:port")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"endpoint {endpoint!r} has port {port_text!r}, expected 1-65535")
    return host, int(port_text)


def format_time(when: datetime) -> str:
    """RFC 3339 in UTC with a 'Z' suffix, the only time form in registry JSON."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise RegistryError(f"time {when!r} has no time zone; registry times must be UTC-aware")
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class MemberKey:
    key_id: str
    public_key: bytes
    not_before: datetime
    not_after: datetime | None

    def valid_at(self, when: datetime) -> bool:
        """Half-open window [not_before, not_after): a rotated-out key stops at not_after."""
        if when < self.not_before:
            return False
        return self.not_after is None or when < self.not_after


@dataclass(frozen=True)
class Member:
    agency_id: str
    name: str
    endpoint: str
    signing_keys: tuple[MemberKey, ...]
    tls_fingerprints: tuple[str, ...]
    # The agency that escalation notices (督办) about this member go to, e.g. the discipline
    # commission (001 §五); "" when the registry names none.
    supervisor: str = ""
    # An auditor (the discipline commission, an upper procuratorate) reads every entry of
    # every member's audit log; any other member only the entries it is a party to.
    auditor: bool = False


@dataclass(frozen=True)
class Permission:
    """`sender` and `recipient` are fnmatch patterns (case-sensitive; '*' also matches '/').

    A pattern matches an agency id when it matches the whole id or the id's
    "<region>/<kind>" prefix, so "*/police" also covers "140400/police/unit".
    """

    family: str
    sender: str
    recipient: str


def _pattern_matches(pattern: str, agency_id: str) -> bool:
    office = "/".join(agency_id.split("/")[:2])
    return fnmatchcase(agency_id, pattern) or fnmatchcase(office, pattern)


# crime_transfer: administrative enforcement agencies hand suspected crimes to the police
# and copy the transfer letter to the procuratorate. Police and procuratorates are
# excluded as senders by listing every other kind explicitly, which keeps Permission a
# plain (family, sender, recipient) triple that any implementation can evaluate.
_CRIME_TRANSFER_SENDER_KINDS = tuple(sorted(AGENCY_KINDS - {"police", "procuratorate"}))

DEFAULT_PERMISSIONS: tuple[Permission, ...] = (
    Permission("clue", "*", "*/procuratorate"),
    *(
        Permission("crime_transfer", f"*/{kind}", recipient)
        for kind in _CRIME_TRANSFER_SENDER_KINDS
        for recipient in ("*/police", "*/procuratorate")
    ),
    Permission("notice", "*", "*"),
    Permission("evidence_request", "*/procuratorate", "*"),
    Permission("evidence_request", "*/police", "*"),
    Permission("recommendation", "*/procuratorate", "*"),
    Permission("reply", "*", "*"),
)


@dataclass(frozen=True)
class Registry:
    federation: str
    serial: int
    issued_at: datetime
    expires_at: datetime
    members: tuple[Member, ...]
    permissions: tuple[Permission, ...]

    def member(self, agency_id: str) -> Member | None:
        return self._members_by_id.get(agency_id)

    @cached_property
    def _members_by_id(self) -> dict[str, Member]:
        # Asked for every message a node receives and an auditor checks.
        return {m.agency_id: m for m in self.members}

    def is_auditor(self, agency_id: str) -> bool:
        """Whether the registry names ``agency_id`` an auditor: it may read whole audit logs."""
        member = self.member(agency_id)
        return member is not None and member.auditor

    @property
    def auditors(self) -> tuple[str, ...]:
        return tuple(m.agency_id for m in self.members if m.auditor)

    def supervisor_of(self, agency_id: str) -> str:
        """The agency escalations about ``agency_id`` go to, or "" when the registry names none."""
        member = self.member(agency_id)
        return member.supervisor if member is not None else ""

    def public_keys(self, agency_id: str) -> dict[str, Ed25519PublicKey]:
        """Every key ever listed for the member; validity is checked by key_valid_at."""
        return dict(self._parsed_keys.get(agency_id, {}))

    @cached_property
    def _parsed_keys(self) -> dict[str, dict[str, Ed25519PublicKey]]:
        # Parsed once per registry: every inbound message and every receipt needs them.
        return {
            m.agency_id: {
                k.key_id: Ed25519PublicKey.from_public_bytes(k.public_key) for k in m.signing_keys
            }
            for m in self.members
        }

    def key_valid_at(self, agency_id: str, key_id: str, when: datetime) -> bool:
        m = self.member(agency_id)
        if m is None:
            return False
        return any(k.key_id == key_id and k.valid_at(when) for k in m.signing_keys)

    def is_permitted(self, family: str, sender: str, recipient: str) -> bool:
        # Asked for every message sent and received, with few distinct triples: remembered.
        triple = (family, sender, recipient)
        answer = self._permitted.get(triple)
        if answer is None:
            answer = any(
                p.family == family
                and _pattern_matches(p.sender, sender)
                and _pattern_matches(p.recipient, recipient)
                for p in self.permissions
            )
            if len(self._permitted) < 4096:
                self._permitted[triple] = answer
        return answer

    @cached_property
    def _permitted(self) -> dict[tuple[str, str, str], bool]:
        return {}

    def log_origin(self, agency_id: str) -> str:
        """The origin (and key name) of a member's audit log: <federation>/<agency id>."""
        return log_origin(self.federation, agency_id)

    def log_verifiers(self, agency_id: str) -> list[Verifier]:
        """Verifier keys of a member's checkpoints, one per signing key it ever had (the
        registry publishes them as `log_vkey`; they are checked against the keys on load)."""
        # Asked for every receiver's proof a verifier checks: made once per member.
        verifiers = self._log_verifiers.get(agency_id)
        if verifiers is None:
            m = self.member(agency_id)
            if m is None:
                return []
            origin = self.log_origin(agency_id)
            verifiers = [parse_vkey(vkey(origin, k.public_key)) for k in m.signing_keys]
            self._log_verifiers[agency_id] = verifiers
        return list(verifiers)

    @cached_property
    def _log_verifiers(self) -> dict[str, list[Verifier]]:
        return {}

    def cosigner_verifiers(self, agency_id: str) -> list[Verifier]:
        """Verifier keys of a member's tlog-cosignatures as a witness (signature type 0x04)."""
        m = self.member(agency_id)
        if m is None:
            return []
        origin = self.log_origin(agency_id)
        return [parse_vkey(vkey(origin, k.public_key, COSIGNATURE_V1)) for k in m.signing_keys]

    def to_json_bytes(self) -> bytes:
        doc = {
            "federation": self.federation,
            "serial": self.serial,
            "issued_at": format_time(self.issued_at),
            "expires_at": format_time(self.expires_at),
            "members": [member_to_json(m, self.federation) for m in self.members],
            "permissions": [
                {"family": p.family, "sender": p.sender, "recipient": p.recipient}
                for p in self.permissions
            ],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8"
        )

    @classmethod
    def from_json_bytes(cls, data: bytes) -> Registry:
        return _parse_registry(data, "registry")


def member_to_json(m: Member, federation: str = "") -> dict[str, Any]:
    """The JSON form of a member, shared by the registry and the operator's state file.

    With `federation` (in the registry), each signing key also carries `log_vkey`: the C2SP
    verifier key of the member's audit-log checkpoints under that key (node.audit).
    """
    data = _member_json(m)
    if federation:
        origin = log_origin(federation, m.agency_id)
        for key, listed in zip(m.signing_keys, data["signing_keys"], strict=True):
            listed["log_vkey"] = vkey(origin, key.public_key)
    return data


def _member_json(m: Member) -> dict[str, Any]:
    return {
        "agency_id": m.agency_id,
        "name": m.name,
        "endpoint": m.endpoint,
        "signing_keys": [
            {
                "key_id": k.key_id,
                "public_key": base64.b64encode(k.public_key).decode("ascii"),
                "not_before": format_time(k.not_before),
                "not_after": None if k.not_after is None else format_time(k.not_after),
            }
            for k in m.signing_keys
        ],
        "tls_fingerprints": list(m.tls_fingerprints),
        # Only when set: a registry without supervisors (auditors) keeps its bytes.
        **({"supervisor": m.supervisor} if m.supervisor else {}),
        **({"auditor": True} if m.auditor else {}),
    }


class _Malformed(Exception):
    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")


def _get(obj: dict[str, Any], key: str, field: str) -> Any:
    if key not in obj:
        raise _Malformed(f"{field}.{key}" if field else key, "missing")
    return obj[key]


def _str(value: Any, field: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise _Malformed(field, f"expected a string, got {json.dumps(value)[:60]}")
    if not value and not empty_ok:
        raise _Malformed(field, "must not be empty")
    return value


def _list(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Malformed(field, f"expected a list, got {type(value).__name__}")
    return value


def _obj(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed(field, f"expected an object, got {type(value).__name__}")
    return value


def _time(value: Any, field: str) -> datetime:
    text = _str(value, field)
    if not text.endswith("Z"):
        raise _Malformed(field, f"{text!r} must be RFC 3339 UTC ending in 'Z'")
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise _Malformed(field, f"{text!r} is not an RFC 3339 time") from None


def member_from_json(value: Any, field: str) -> Member:
    """Parse one member; raises ValueError naming `field` and the bad sub-field."""
    try:
        return _member(value, field)
    except _Malformed as exc:
        raise ValueError(str(exc)) from None


def _member(value: Any, field: str) -> Member:
    obj = _obj(value, field)
    agency_id = _str(_get(obj, "agency_id", field), f"{field}.agency_id")
    try:
        validate_agency_id(agency_id)
    except IdentityError as exc:
        raise _Malformed(f"{field}.agency_id", str(exc)) from None
    name = _str(_get(obj, "name", field), f"{field}.name")
    endpoint = _str(_get(obj, "endpoint", field), f"{field}.endpoint")
    try:
        parse_endpoint(endpoint)
    except ValueError as exc:
        raise _Malformed(f"{field}.endpoint", str(exc)) from None
    keys: list[MemberKey] = []
    raw_keys = _list(_get(obj, "signing_keys", field), f"{field}.signing_keys")
    if not raw_keys:
        raise _Malformed(f"{field}.signing_keys", "a member needs at least one signing key")
    for j, raw in enumerate(raw_keys):
        kf = f"{field}.signing_keys[{j}]"
        k = _obj(raw, kf)
        key_id = _str(_get(k, "key_id", kf), f"{kf}.key_id")
        b64 = _str(_get(k, "public_key", kf), f"{kf}.public_key")
        try:
            public = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise _Malformed(f"{kf}.public_key", "not valid base64") from None
        if len(public) != 32:
            raise _Malformed(f"{kf}.public_key", f"an Ed25519 key is 32 bytes, got {len(public)}")
        if key_id_for(public) != key_id:
            raise _Malformed(
                f"{kf}.key_id",
                f"{key_id!r} does not match the public key (expected {key_id_for(public)!r})",
            )
        not_before = _time(_get(k, "not_before", kf), f"{kf}.not_before")
        raw_after = k.get("not_after")
        not_after = None if raw_after is None else _time(raw_after, f"{kf}.not_after")
        if not_after is not None and not_after < not_before:
            raise _Malformed(f"{kf}.not_after", "is before not_before")
        keys.append(MemberKey(key_id, public, not_before, not_after))
    fingerprints: list[str] = []
    raw_fps = _list(_get(obj, "tls_fingerprints", field), f"{field}.tls_fingerprints")
    for j, raw in enumerate(raw_fps):
        fp = _str(raw, f"{field}.tls_fingerprints[{j}]")
        if not _FINGERPRINT_RE.fullmatch(fp):
            raise _Malformed(
                f"{field}.tls_fingerprints[{j}]",
                f"{fp!r} is not a SHA-256 fingerprint (64 lower-case hex digits)",
            )
        fingerprints.append(fp)
    supervisor = ""
    if "supervisor" in obj:
        supervisor = _str(obj["supervisor"], f"{field}.supervisor")
        try:
            validate_agency_id(supervisor)
        except IdentityError as exc:
            raise _Malformed(f"{field}.supervisor", str(exc)) from None
        if supervisor == agency_id:
            raise _Malformed(f"{field}.supervisor", "a member cannot supervise itself")
    auditor = obj.get("auditor", False)
    if not isinstance(auditor, bool):  # "yes", 1 or null are no answer to whether it audits
        raise _Malformed(
            f"{field}.auditor", f"expected true or false, got {json.dumps(auditor)[:60]}"
        )
    return Member(agency_id, name, endpoint, tuple(keys), tuple(fingerprints), supervisor, auditor)


def _check_log_vkeys(raw: dict[str, Any], member: Member, federation: str, field: str) -> None:
    """A published log_vkey must be exactly the one the key and the origin give."""
    for j, (key, listed) in enumerate(zip(member.signing_keys, raw["signing_keys"], strict=True)):
        if "log_vkey" not in listed:
            continue  # registries from before the audit tree: derived from the key
        expected = vkey(log_origin(federation, member.agency_id), key.public_key)
        if listed["log_vkey"] != expected:
            raise _Malformed(
                f"{field}.signing_keys[{j}].log_vkey",
                f"{str(listed['log_vkey'])[:80]!r} is not the verifier key of this signing key "
                f"for the log {log_origin(federation, member.agency_id)!r} (expected {expected!r})",
            )


def _parse_registry(data: bytes, source: str) -> Registry:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{source}: malformed: not valid UTF-8 JSON ({exc})") from None
    try:
        obj = _obj(doc, "(top level)")
        federation = _str(_get(obj, "federation", ""), "federation")
        serial = _get(obj, "serial", "")
        # bool is an int subclass in Python; `true` is not a serial number.
        if not isinstance(serial, int) or isinstance(serial, bool) or serial < 0:
            raise _Malformed("serial", f"expected a non-negative integer, got {serial!r}")
        issued_at = _time(_get(obj, "issued_at", ""), "issued_at")
        expires_at = _time(_get(obj, "expires_at", ""), "expires_at")
        if expires_at <= issued_at:
            raise _Malformed("expires_at", "is not after issued_at")
        members: list[Member] = []
        seen: set[str] = set()
        for i, raw in enumerate(_list(_get(obj, "members", ""), "members")):
            m = _member(raw, f"members[{i}]")
            _check_log_vkeys(raw, m, federation, f"members[{i}]")
            if m.agency_id in seen:
                raise _Malformed(f"members[{i}].agency_id", f"{m.agency_id!r} is listed twice")
            seen.add(m.agency_id)
            members.append(m)
        for i, m in enumerate(members):
            if m.supervisor and m.supervisor not in seen:
                raise _Malformed(
                    f"members[{i}].supervisor",
                    f"{m.supervisor!r} is not a member: escalations could not be delivered",
                )
        permissions: list[Permission] = []
        for i, raw in enumerate(_list(_get(obj, "permissions", ""), "permissions")):
            pf = f"permissions[{i}]"
            p = _obj(raw, pf)
            family = _str(_get(p, "family", pf), f"{pf}.family")
            if family not in FAMILIES:
                raise _Malformed(
                    f"{pf}.family", f"unknown family {family!r} (expected one of {FAMILIES})"
                )
            permissions.append(
                Permission(
                    family,
                    _str(_get(p, "sender", pf), f"{pf}.sender"),
                    _str(_get(p, "recipient", pf), f"{pf}.recipient"),
                )
            )
    except _Malformed as exc:
        raise RegistryError(f"{source}: malformed: {exc}") from None
    return Registry(federation, serial, issued_at, expires_at, tuple(members), tuple(permissions))


def sign_registry(registry: Registry, operator_key: SigningKey) -> bytes:
    return envelope_to_json(
        sign_envelope(registry.to_json_bytes(), REGISTRY_PAYLOAD_TYPE, operator_key)
    )


def verify_registry(
    data: bytes,
    operator_public_key: Ed25519PublicKey,
    *,
    now: datetime | None,
    grace: timedelta = timedelta(0),
    min_serial: int = 0,
    source: str = "registry",
) -> Registry:
    """Verify signature, then content, serial and expiry; return the registry or raise.

    `min_serial` is the serial already accepted; an equal serial is allowed so a node
    can reload the file it is running on. `now` None skips the expiry check: an auditor
    checks, years later, the registry that was in force when the log was written.
    """
    try:
        envelope = envelope_from_json(data)
    except EnvelopeError as exc:
        raise RegistryError(
            f"{source}: not a signed registry (DSSE JSON envelope): {exc}"
        ) from None
    raw = operator_public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    try:
        verify_envelope(envelope, REGISTRY_PAYLOAD_TYPE, {key_id_for(raw): operator_public_key})
    except EnvelopeError as exc:
        raise RegistryError(
            f"{source}: signature invalid (not signed by the federation operator key): {exc}"
        ) from None
    registry = _parse_registry(envelope.payload, source)
    if registry.serial < min_serial:
        raise RegistryError(
            f"{source}: serial {registry.serial} is older than serial {min_serial} "
            "already accepted (rollback refused)"
        )
    if now is not None and now > registry.expires_at + grace:
        raise RegistryError(
            f"{source}: expired at {format_time(registry.expires_at)} (grace {grace}); "
            "ask the federation operator for a newer registry"
        )
    return registry
