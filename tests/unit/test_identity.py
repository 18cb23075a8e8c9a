from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.identity import (
    AGENCY_KINDS,
    IdentityError,
    SigningKey,
    agency_kind,
    agency_slug,
    generate_signing_key,
    key_id_for,
    load_public_key,
    load_signing_key,
    validate_agency_id,
    write_public_key,
)


@pytest.mark.parametrize(
    "value",
    [
        "140400/ecology",
        "140400/police",
        "610900/procuratorate",
        "110000/water/unit_1",
        "140400/urban_management/a-b",
        "140400/discipline/" + "x" * 32,
    ],
)
def test_valid_agency_ids(value: str) -> None:
    assert validate_agency_id(value) == value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("140400/ecolgy", "unknown kind 'ecolgy'"),
        ("000000/ecology", "'000000'"),
        ("14040/ecology", "region '14040'"),
        ("1404000/ecology", "region '1404000'"),
        ("abcdef/ecology", "region 'abcdef'"),
        ("140400", "expected 2 or 3 parts"),
        ("140400/ecology/a/b", "expected 2 or 3 parts"),
        ("140400/ecology/", "unit ''"),
        ("140400/ecology/Unit", "unit 'Unit'"),
        ("140400/ecology/" + "x" * 33, "1-32 characters"),
        ("140400/Ecology", "unknown kind 'Ecology'"),
        (" 140400/ecology", "region ' 140400'"),
        ("", "expected 2 or 3 parts"),
    ],
)
def test_invalid_agency_ids(value: str, fragment: str) -> None:
    with pytest.raises(IdentityError) as info:
        validate_agency_id(value)
    message = str(info.value)
    assert fragment in message
    assert repr(value) in message
    assert "e.g. 140400/ecology" in message


def test_error_message_lists_kinds() -> None:
    with pytest.raises(IdentityError, match=r"expected one of agriculture, .*water"):
        validate_agency_id("140400/ecolgy")


def test_kind_and_slug() -> None:
    assert agency_kind("140400/procuratorate/civil") == "procuratorate"
    assert agency_slug("140400/ecology") == "140400-ecology"
    assert agency_slug("140400/ecology/lab") == "140400-ecology-lab"
    assert "ecology" in AGENCY_KINDS
    assert len(AGENCY_KINDS) == 13
    with pytest.raises(IdentityError):
        agency_slug("../etc/passwd")


def test_key_id_is_sha256_prefix() -> None:
    assert key_id_for(bytes(32)) == "66687aadf862bd77"
    with pytest.raises(IdentityError, match="32 raw bytes"):
        key_id_for(b"short")


def test_generate_and_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.key"
    key = generate_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_signing_key(path)
    assert loaded.key_id == key.key_id == key_id_for(key.public_bytes())
    assert loaded.public_bytes() == key.public_bytes()
    assert len(key.public_bytes()) == 32
    assert not hasattr(SigningKey, "sign")


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    generate_signing_key(path)
    before = path.read_bytes()
    with pytest.raises(IdentityError, match=str(path)):
        generate_signing_key(path)
    assert path.read_bytes() == before


def test_load_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(IdentityError, match=rf"signing key {path}: file not found"):
        load_signing_key(path)


def test_load_wrong_key_type(tmp_path: Path) -> None:
    path = tmp_path / "ec.key"
    path.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(IdentityError, match=rf"{path}: not an Ed25519 private key"):
        load_signing_key(path)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"hello")
    with pytest.raises(IdentityError, match=rf"{garbage}: not an Ed25519 private key"):
        load_signing_key(garbage)


def test_public_key_round_trip(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    path = tmp_path / "op.pub"
    write_public_key(path, private.public_key())
    assert path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    loaded = load_public_key(path)
    assert loaded.public_bytes_raw() == private.public_key().public_bytes_raw()


def test_load_public_key_errors(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match=rf"public key {tmp_path / 'x.pub'}: file not found"):
        load_public_key(tmp_path / "x.pub")
    bad = tmp_path / "bad.pub"
    bad.write_bytes(b"not pem")
    with pytest.raises(IdentityError, match=str(bad)):
        load_public_key(bad)
    ec_pub = tmp_path / "ec.pub"
    ec_pub.write_bytes(
        generate_private_key(SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(IdentityError, match="not an Ed25519 public key"):
        load_public_key(ec_pub)
