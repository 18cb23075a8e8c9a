from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.envelope import envelope_from_json, envelope_to_json, sign_envelope
from node.federation import (
    DEFAULT_PERMISSIONS,
    FAMILIES,
    Member,
    MemberKey,
    Permission,
    Registry,
    RegistryError,
    sign_registry,
    verify_registry,
)
from node.identity import AGENCY_KINDS, SigningKey

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def new_key() -> SigningKey:
    return SigningKey.from_private_key(Ed25519PrivateKey.generate())


def member(agency_id: str, *keys: MemberKey) -> Member:
    if not keys:
        k = new_key()
        keys = (MemberKey(k.key_id, k.public_bytes(), T0 - timedelta(days=30), None),)
    return Member(agency_id, f"{agency_id} bureau", "10.0.0.1:7443", keys, ("ab" * 32,))


def registry(serial: int = 5, **changes: Any) -> Registry:
    base = Registry(
        federation="changzhi",
        serial=serial,
        issued_at=T0,
        expires_at=T0 + timedelta(days=30),
        members=(member("140400/ecology"), member("140400/police"), member("140400/procuratorate")),
        permissions=DEFAULT_PERMISSIONS,
    )
    return replace(base, **changes)


@pytest.fixture
def operator() -> SigningKey:
    return new_key()


def test_json_round_trip() -> None:
    reg = registry()
    data = reg.to_json_bytes()
    assert Registry.from_json_bytes(data) == reg
    # Canonical: compact, sorted keys, 'Z' times.
    assert b": " not in data
    assert b", " not in data
    doc = json.loads(data)
    assert list(doc) == sorted(doc)
    assert doc["expires_at"] == "2026-01-31T00:00:00Z"
    assert base64.b64decode(doc["members"][0]["signing_keys"][0]["public_key"]) == (
        reg.members[0].signing_keys[0].public_key
    )
    assert Registry.from_json_bytes(data).to_json_bytes() == data


def test_non_ascii_names_are_kept_verbatim() -> None:
    m = replace(member("140400/ecology"), name="长治市生态环境局")
    data = registry(members=(m,)).to_json_bytes()
    assert "长治市生态环境局".encode() in data


def test_sign_and_verify(operator: SigningKey) -> None:
    reg = registry()
    data = sign_registry(reg, operator)
    got = verify_registry(data, operator.private_key.public_key(), now=T0 + timedelta(days=1))
    assert got == reg


def test_bad_signature(operator: SigningKey) -> None:
    data = sign_registry(registry(), operator)
    with pytest.raises(
        RegistryError,
        match=r"^/etc/reg.json: signature invalid \(not signed by the federation operator key\)",
    ):
        verify_registry(data, new_key().private_key.public_key(), now=T0, source="/etc/reg.json")


def test_altered_payload(operator: SigningKey) -> None:
    env = envelope_from_json(sign_registry(registry(), operator))
    env.payload = env.payload.replace(b'"serial":5', b'"serial":9')
    with pytest.raises(RegistryError, match="signature invalid"):
        verify_registry(envelope_to_json(env), operator.private_key.public_key(), now=T0)


def test_not_an_envelope(operator: SigningKey) -> None:
    with pytest.raises(RegistryError, match=r"^reg: not a signed registry"):
        verify_registry(b"{}", operator.private_key.public_key(), now=T0, source="reg")


def test_expired_with_and_without_grace(operator: SigningKey) -> None:
    data = sign_registry(registry(), operator)
    pub = operator.private_key.public_key()
    later = T0 + timedelta(days=30, hours=1)
    with pytest.raises(RegistryError) as info:
        verify_registry(data, pub, now=later, source="r.json")
    assert str(info.value) == (
        "r.json: expired at 2026-01-31T00:00:00Z (grace 0:00:00); "
        "ask the federation operator for a newer registry"
    )
    assert verify_registry(data, pub, now=later, grace=timedelta(hours=2)).serial == 5
    with pytest.raises(RegistryError, match=r"grace 2:00:00"):
        verify_registry(data, pub, now=later + timedelta(hours=2), grace=timedelta(hours=2))
    # Exactly at expiry is still acceptable.
    assert verify_registry(data, pub, now=T0 + timedelta(days=30)).serial == 5


def test_rollback(operator: SigningKey) -> None:
    data = sign_registry(registry(serial=3), operator)
    pub = operator.private_key.public_key()
    with pytest.raises(
        RegistryError,
        match=r"^r: serial 3 is older than serial 5 already accepted \(rollback refused\)$",
    ):
        verify_registry(data, pub, now=T0, min_serial=5, source="r")
    assert verify_registry(data, pub, now=T0, min_serial=3).serial == 3


def _signed_doc(doc: dict[str, Any], operator: SigningKey) -> bytes:
    payload = json.dumps(doc).encode()
    from node.envelope import REGISTRY_PAYLOAD_TYPE

    return envelope_to_json(sign_envelope(payload, REGISTRY_PAYLOAD_TYPE, operator))


def test_malformed_field_is_named(operator: SigningKey) -> None:
    doc = json.loads(registry().to_json_bytes())
    doc["members"][2]["agency_id"] = "140400/procurator"
    with pytest.raises(RegistryError) as info:
        verify_registry(
            _signed_doc(doc, operator), operator.private_key.public_key(), now=T0, source="reg.json"
        )
    message = str(info.value)
    assert message.startswith("reg.json: malformed: members[2].agency_id")
    assert "unknown kind 'procurator'" in message


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.pop("serial"), "serial: missing"),
        (lambda d: d.update(serial=True), "serial: expected a non-negative integer"),
        (lambda d: d.update(serial=-1), "serial: expected a non-negative integer"),
        (lambda d: d.update(expires_at="2026-02-01"), "expires_at: '2026-02-01' must be RFC 3339"),
        (lambda d: d.update(expires_at="2025-01-01T00:00:00Z"), "expires_at: is not after"),
        (lambda d: d["members"][0].update(endpoint="nohost"), "members[0].endpoint"),
        (lambda d: d["members"][0].update(endpoint="h:99999"), "port '99999'"),
        (
            lambda d: d["members"][1]["signing_keys"][0].update(key_id="ffff"),
            "members[1].signing_keys[0].key_id: 'ffff' does not match",
        ),
        (
            lambda d: d["members"][1]["signing_keys"][0].update(public_key="AAAA"),
            "members[1].signing_keys[0].public_key: an Ed25519 key is 32 bytes",
        ),
        (lambda d: d["members"][0].update(signing_keys=[]), "at least one signing key"),
        (lambda d: d["members"][0].update(tls_fingerprints=["XYZ"]), "tls_fingerprints[0]"),
        (
            lambda d: d["members"].append(d["members"][0]),
            "members[3].agency_id: '140400/ecology' is listed twice",
        ),
        (
            lambda d: d["members"][0].update(supervisor="140400/discipline"),
            "members[0].supervisor: '140400/discipline' is not a member",
        ),
        (
            lambda d: d["members"][0].update(supervisor="140400/ecology"),
            "members[0].supervisor: a member cannot supervise itself",
        ),
        (lambda d: d["members"][0].update(supervisor="纪委"), "members[0].supervisor: agency id"),
        (
            lambda d: d["members"][0].update(supervisor=7),
            "members[0].supervisor: expected a string",
        ),
        (
            lambda d: d["members"][1].update(auditor="yes"),
            'members[1].auditor: expected true or false, got "yes"',
        ),
        (lambda d: d["members"][1].update(auditor=1), "members[1].auditor: expected true or false"),
        (
            lambda d: d["members"][1].update(auditor=None),
            "members[1].auditor: expected true or false, got null",
        ),
        (
            lambda d: d["permissions"][0].update(family="gossip"),
            "permissions[0].family: unknown family 'gossip'",
        ),
        (
            lambda d: d["permissions"][0].update(sender=""),
            "permissions[0].sender: must not be empty",
        ),
    ],
)
def test_malformed_variants(mutate: Any, fragment: str) -> None:
    doc = json.loads(registry().to_json_bytes())
    mutate(doc)
    with pytest.raises(RegistryError) as info:
        Registry.from_json_bytes(json.dumps(doc).encode())
    assert fragment in str(info.value)
    assert str(info.value).startswith("registry: malformed: ")


def test_a_members_supervisor_round_trips_and_is_absent_when_unset() -> None:
    plain = registry()
    assert b"supervisor" not in plain.to_json_bytes()  # older registries keep their bytes
    assert plain.supervisor_of("140400/ecology") == ""
    members = (replace(plain.members[0], supervisor="140400/procuratorate"), *plain.members[1:])
    supervised = registry(members=members)
    parsed = Registry.from_json_bytes(supervised.to_json_bytes())
    assert parsed == supervised
    assert parsed.supervisor_of("140400/ecology") == "140400/procuratorate"
    assert parsed.supervisor_of("140400/police") == ""
    assert parsed.supervisor_of("140400/unknown") == ""


def test_a_members_auditor_flag_round_trips_and_is_absent_when_unset() -> None:
    plain = registry()
    assert b"auditor" not in plain.to_json_bytes()  # older registries keep their bytes
    assert plain.auditors == ()
    assert not plain.is_auditor("140400/police")
    members = (plain.members[0], replace(plain.members[1], auditor=True), plain.members[2])
    audited = registry(members=members)
    data = audited.to_json_bytes()
    assert data.count(b'"auditor":true') == 1
    parsed = Registry.from_json_bytes(data)
    assert parsed == audited
    assert parsed.auditors == ("140400/police",)
    assert parsed.is_auditor("140400/police")
    assert not parsed.is_auditor("140400/ecology")
    assert not parsed.is_auditor("140400/discipline")  # not a member: never an auditor
    # `false` written by another tool reads as no auditor, and is not written back.
    doc = json.loads(data)
    doc["members"][0]["auditor"] = False
    again = Registry.from_json_bytes(json.dumps(doc).encode())
    assert again == audited
    assert again.to_json_bytes() == data


def test_only_a_member_can_be_an_auditor() -> None:
    """The role is a member's own field, so a registry cannot name a non-member; a
    top-level list (an unknown field, which readers ignore) names nobody."""
    doc = json.loads(registry().to_json_bytes())
    doc["auditors"] = ["140400/police", "140400/discipline"]
    parsed = Registry.from_json_bytes(json.dumps(doc).encode())
    assert parsed.auditors == ()
    assert not parsed.is_auditor("140400/discipline")


def test_naive_time_is_rejected() -> None:
    with pytest.raises(RegistryError, match="no time zone"):
        registry(issued_at=datetime(2026, 1, 1)).to_json_bytes()


@pytest.mark.parametrize(
    ("family", "sender", "recipient", "allowed"),
    [
        ("crime_transfer", "140400/ecology", "140400/police", True),
        ("crime_transfer", "140400/ecology", "140400/procuratorate", True),
        ("crime_transfer", "140400/natural_resources", "610900/police", True),
        ("crime_transfer", "140400/ecology", "140400/water", False),
        ("crime_transfer", "140400/police", "140400/procuratorate", False),
        ("crime_transfer", "140400/procuratorate", "140400/police", False),
        ("recommendation", "140400/procuratorate", "140400/ecology", True),
        ("recommendation", "140400/procuratorate/civil", "140400/ecology", True),
        ("recommendation", "140400/police", "140400/ecology", False),
        ("recommendation", "140400/ecology", "140400/water", False),
        ("clue", "140400/ecology", "140400/procuratorate", True),
        ("clue", "140400/ecology/lab", "140400/procuratorate/civil", True),
        ("clue", "140400/ecology", "140400/police", False),
        ("notice", "140400/water", "610900/forestry", True),
        ("evidence_request", "140400/police", "140400/ecology", True),
        ("evidence_request", "140400/procuratorate", "140400/ecology", True),
        ("evidence_request", "140400/ecology", "140400/police", False),
        ("reply", "140400/ecology", "140400/procuratorate", True),
        ("gossip", "140400/ecology", "140400/procuratorate", False),
    ],
)
def test_default_permissions(family: str, sender: str, recipient: str, allowed: bool) -> None:
    assert registry().is_permitted(family, sender, recipient) is allowed


def test_every_non_police_kind_may_transfer_crimes() -> None:
    reg = registry()
    for kind in AGENCY_KINDS - {"police", "procuratorate"}:
        assert reg.is_permitted("crime_transfer", f"140400/{kind}", "140400/police")
    assert {p.family for p in DEFAULT_PERMISSIONS} == set(FAMILIES)


def test_custom_permission_patterns() -> None:
    reg = registry(permissions=(Permission("notice", "140400/*", "610900/ecology"),))
    assert reg.is_permitted("notice", "140400/water", "610900/ecology")
    assert not reg.is_permitted("notice", "140500/water", "610900/ecology")
    assert not reg.is_permitted("clue", "140400/water", "610900/ecology")


def test_key_rotation_windows() -> None:
    old, new = new_key(), new_key()
    rotated = T0 + timedelta(days=10)
    m = member(
        "140400/ecology",
        MemberKey(old.key_id, old.public_bytes(), T0, rotated),
        MemberKey(new.key_id, new.public_bytes(), rotated, None),
    )
    reg = registry(members=(m,))
    reg = Registry.from_json_bytes(reg.to_json_bytes())
    before, during, after = (
        T0 - timedelta(seconds=1),
        T0 + timedelta(days=5),
        T0 + timedelta(days=20),
    )
    assert not reg.key_valid_at("140400/ecology", old.key_id, before)
    assert reg.key_valid_at("140400/ecology", old.key_id, during)
    assert not reg.key_valid_at("140400/ecology", old.key_id, rotated)
    assert not reg.key_valid_at("140400/ecology", old.key_id, after)
    assert not reg.key_valid_at("140400/ecology", new.key_id, during)
    assert reg.key_valid_at("140400/ecology", new.key_id, rotated)
    assert reg.key_valid_at("140400/ecology", new.key_id, after)
    assert not reg.key_valid_at("140400/police", new.key_id, after)
    # Old keys remain available so messages they signed still verify.
    keys = reg.public_keys("140400/ecology")
    assert set(keys) == {old.key_id, new.key_id}
    assert keys[old.key_id].public_bytes_raw() == old.public_bytes()
    assert reg.public_keys("999999/ecology") == {}


def test_member_lookup() -> None:
    reg = registry()
    found = reg.member("140400/police")
    assert found is not None
    assert found.agency_id == "140400/police"
    assert reg.member("140400/water") is None


def test_the_registry_publishes_each_members_log_verifier_key(operator: SigningKey) -> None:
    from node.audit.note import verify_note
    from node.envelope import sign_note

    key = new_key()
    listed = MemberKey(key.key_id, key.public_bytes(), T0 - timedelta(days=1), None)
    reg = registry(members=(member("140400/ecology", listed), member("140400/police")))
    doc = json.loads(reg.to_json_bytes())
    published = doc["members"][0]["signing_keys"][0]["log_vkey"]
    assert published.startswith("changzhi/140400/ecology+")
    [verifier] = Registry.from_json_bytes(reg.to_json_bytes()).log_verifiers("140400/ecology")
    assert verifier.name == "changzhi/140400/ecology"
    text = b"changzhi/140400/ecology\n1\n" + base64.b64encode(bytes(32)) + b"\n"
    assert verify_note(sign_note(text, verifier.name, key), verifier) == text
    # A log_vkey that is not the one its key and origin give is refused, naming the field.
    doc["members"][0]["signing_keys"][0]["log_vkey"] = published.replace("ecology", "police")
    with pytest.raises(RegistryError) as info:
        verify_registry(
            _signed_doc(doc, operator), operator.private_key.public_key(), now=T0, source="r.json"
        )
    assert "members[0].signing_keys[0].log_vkey" in str(info.value)
    assert "is not the verifier key of this signing key" in str(info.value)
    # Registries from before the audit tree carry none; the keys give them.
    del doc["members"][0]["signing_keys"][0]["log_vkey"]
    older = verify_registry(_signed_doc(doc, operator), operator.private_key.public_key(), now=T0)
    assert older.log_verifiers("140400/ecology") == [verifier]
