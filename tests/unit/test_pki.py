from __future__ import annotations

import base64
import ipaddress
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node.federation import DEFAULT_PERMISSIONS, verify_registry
from node.identity import agency_slug, key_id_for, load_public_key, load_signing_key
from node.pki import (
    URI_SAN_PREFIX,
    SetupError,
    add_member,
    agency_from_certificate,
    certificate_fingerprint,
    init_agency,
    init_federation,
    publish,
    set_supervisor,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def fed(tmp_path: Path) -> Path:
    d = tmp_path / "fed"
    init_federation(d, "Changzhi")
    return d


def test_init_federation(fed: Path) -> None:
    for name in ("ca.key", "ca.crt", "operator.key", "operator.pub", "federation.json"):
        assert (fed / name).is_file(), name
    assert mode(fed / "ca.key") == 0o600
    assert mode(fed / "operator.key") == 0o600
    ca = x509.load_pem_x509_certificate((fed / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca.verify_directly_issued_by(ca)
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > timedelta(days=3600)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    state = json.loads((fed / "federation.json").read_text())
    assert state == {"name": "Changzhi", "members": [], "serial": 0}
    op = load_signing_key(fed / "operator.key")
    assert load_public_key(fed / "operator.pub").public_bytes_raw() == op.public_bytes()


def test_init_federation_refuses_overwrite(fed: Path) -> None:
    before = (fed / "ca.key").read_bytes()
    with pytest.raises(SetupError, match="already exists"):
        init_federation(fed, "Again")
    assert (fed / "ca.key").read_bytes() == before


def test_init_agency(tmp_path: Path) -> None:
    data = tmp_path / "eco"
    req_path = init_agency("140400/ecology", "10.1.2.3:7443", data, name="长治市生态环境局")
    assert req_path == data / "request.json"
    assert mode(data / "keys" / "signing.key") == 0o600
    assert mode(data / "keys" / "tls.key") == 0o600
    text = req_path.read_text()
    assert "PRIVATE" not in text
    req = json.loads(text)
    assert set(req) == {"agency", "name", "endpoint", "signing_key", "tls_csr"}
    assert req["agency"] == "140400/ecology"
    assert req["name"] == "长治市生态环境局"
    signing = load_signing_key(data / "keys" / "signing.key")
    assert req["signing_key"] == {
        "key_id": signing.key_id,
        "public_key": base64.b64encode(signing.public_bytes()).decode(),
    }
    csr = x509.load_pem_x509_csr(req["tls_csr"].encode())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "140400/ecology"
    # No private key material at all: neither PEM nor the raw private bytes.
    tls_key = serialization.load_pem_private_key((data / "keys" / "tls.key").read_bytes(), None)
    assert isinstance(tls_key, ec.EllipticCurvePrivateKey)
    priv_raw = signing.private_key.private_bytes_raw()
    assert base64.b64encode(priv_raw).decode() not in text
    assert priv_raw.hex() not in text


def test_init_agency_validates_and_refuses_overwrite(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="unknown kind 'ecolgy'"):
        init_agency("140400/ecolgy", "h:1", tmp_path / "a")
    with pytest.raises(SetupError, match="endpoint 'h' must have the form host:port"):
        init_agency("140400/ecology", "h", tmp_path / "a")
    init_agency("140400/ecology", "h:1", tmp_path / "b")
    with pytest.raises(SetupError, match=r"signing\.key: file already exists"):
        init_agency("140400/ecology", "h:1", tmp_path / "b")


def test_end_to_end(fed: Path, tmp_path: Path) -> None:
    eco_req = init_agency("140400/ecology", "10.1.2.3:7443", tmp_path / "eco")
    pro_req = init_agency("140400/procuratorate", "jcy.example.cn:7443", tmp_path / "pro")
    eco_crt = add_member(fed, eco_req)
    pro_crt = add_member(fed, pro_req, valid_days=100)
    assert eco_crt == fed / "issued" / "140400-ecology.crt"

    ca = x509.load_pem_x509_certificate((fed / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate(eco_crt.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "140400/ecology"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        URI_SAN_PREFIX + "140400/ecology"
    ]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert san.get_values_for_type(x509.DNSName) == []
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert agency_from_certificate(cert) == "140400/ecology"
    # The certificate is for the agency's own TLS key.
    tls_key = serialization.load_pem_private_key(
        (tmp_path / "eco" / "keys" / "tls.key").read_bytes(), None
    )
    assert isinstance(tls_key, ec.EllipticCurvePrivateKey)
    assert cert.public_key() == tls_key.public_key()

    pro = x509.load_pem_x509_certificate(pro_crt.read_bytes())
    pro.verify_directly_issued_by(ca)
    pro_san = pro.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert pro_san.get_values_for_type(x509.DNSName) == ["jcy.example.cn"]
    assert pro.not_valid_after_utc - pro.not_valid_before_utc < timedelta(days=101)

    out = tmp_path / "registry.json"
    reg = publish(fed, out)
    assert reg.serial == 1
    assert reg.permissions == DEFAULT_PERMISSIONS
    verified = verify_registry(
        out.read_bytes(), load_public_key(fed / "operator.pub"), now=datetime.now(UTC)
    )
    assert verified == reg
    member = verified.member("140400/ecology")
    assert member is not None
    assert member.endpoint == "10.1.2.3:7443"
    der = cert.public_bytes(serialization.Encoding.DER)
    assert member.tls_fingerprints == (certificate_fingerprint(der),)
    signing = load_signing_key(tmp_path / "eco" / "keys" / "signing.key")
    assert set(verified.public_keys("140400/ecology")) == {signing.key_id}
    assert verified.is_permitted("clue", "140400/ecology", "140400/procuratorate")

    assert publish(fed, out).serial == 2
    assert json.loads((fed / "federation.json").read_text())["serial"] == 2


def test_reenrolment_rotates_signing_key(fed: Path, tmp_path: Path) -> None:
    t1 = datetime(2026, 1, 1, tzinfo=UTC)
    t2 = datetime(2026, 6, 1, tzinfo=UTC)
    first = init_agency("140400/ecology", "10.1.2.3:7443", tmp_path / "one")
    add_member(fed, first, now=t1)
    old_id = load_signing_key(tmp_path / "one" / "keys" / "signing.key").key_id
    second = init_agency("140400/ecology", "10.1.2.4:7443", tmp_path / "two")
    add_member(fed, second, now=t2)
    new_id = load_signing_key(tmp_path / "two" / "keys" / "signing.key").key_id

    reg = publish(fed, tmp_path / "r.json", now=t2)
    member = reg.member("140400/ecology")
    assert member is not None
    assert len(reg.members) == 1
    assert member.endpoint == "10.1.2.4:7443"
    assert [k.key_id for k in member.signing_keys] == [old_id, new_id]
    assert member.signing_keys[0].not_after == t2
    assert reg.key_valid_at("140400/ecology", old_id, t2 - timedelta(days=1))
    assert not reg.key_valid_at("140400/ecology", old_id, t2)
    assert reg.key_valid_at("140400/ecology", new_id, t2)
    new_cert = x509.load_pem_x509_certificate((fed / "issued" / "140400-ecology.crt").read_bytes())
    assert member.tls_fingerprints == (
        certificate_fingerprint(new_cert.public_bytes(serialization.Encoding.DER)),
    )
    # Re-submitting the same request keeps the key list unchanged.
    add_member(fed, second, now=t2 + timedelta(days=1))
    again = publish(fed, tmp_path / "r.json", now=t2 + timedelta(days=1)).member("140400/ecology")
    assert again is not None
    assert [k.key_id for k in again.signing_keys] == [old_id, new_id]


def test_the_operator_names_each_members_supervisor(fed: Path, tmp_path: Path) -> None:
    for agency in ("140400/ecology", "140400/discipline"):
        add_member(fed, init_agency(agency, "10.1.2.3:7443", tmp_path / agency_slug(agency)))
    assert set_supervisor(fed, "140400/ecology", "140400/discipline").supervisor == (
        "140400/discipline"
    )
    reg = publish(fed, tmp_path / "r.json")
    assert reg.supervisor_of("140400/ecology") == "140400/discipline"
    verified = verify_registry(
        (tmp_path / "r.json").read_bytes(), load_public_key(fed / "operator.pub"), now=None
    )
    assert verified.supervisor_of("140400/ecology") == "140400/discipline"
    # Re-enrolling (a new key, a new endpoint) keeps what the operator decided.
    again = init_agency("140400/ecology", "10.1.2.4:7443", tmp_path / "again")
    add_member(fed, again)
    assert publish(fed, tmp_path / "r.json").supervisor_of("140400/ecology") == (
        "140400/discipline"
    )
    with pytest.raises(SetupError, match="'140400/police' is not a member"):
        set_supervisor(fed, "140400/police", "140400/discipline")
    with pytest.raises(SetupError, match="supervisor '140400/court' is not a member"):
        set_supervisor(fed, "140400/ecology", "140400/court")
    with pytest.raises(SetupError, match="cannot supervise itself"):
        set_supervisor(fed, "140400/ecology", "140400/ecology")
    set_supervisor(fed, "140400/ecology", "")
    assert publish(fed, tmp_path / "r.json").supervisor_of("140400/ecology") == ""


def test_add_member_rejects_tampered_request(fed: Path, tmp_path: Path) -> None:
    req_path = init_agency("140400/ecology", "10.1.2.3:7443", tmp_path / "eco")
    req = json.loads(req_path.read_text())

    renamed = dict(req, agency="140400/police")
    bad = tmp_path / "renamed.json"
    bad.write_text(json.dumps(renamed))
    with pytest.raises(
        SetupError, match=r"renamed.json: tls_csr common name is \['140400/ecology'\]"
    ):
        add_member(fed, bad)

    wrong_id = dict(req, signing_key=dict(req["signing_key"], key_id="0000000000000000"))
    bad.write_text(json.dumps(wrong_id))
    with pytest.raises(SetupError, match=r"signing_key\.key_id '0000000000000000' does not match"):
        add_member(fed, bad)

    # A CSR whose signature does not match its content.
    other = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "140400/ecology")]))
        .sign(other, hashes.SHA256())
    )
    der = bytearray(forged.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    pem = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der))
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    bad.write_text(json.dumps(dict(req, tls_csr=pem.decode())))
    with pytest.raises(SetupError, match="tls_csr"):
        add_member(fed, bad)

    # The identity point: OpenSSL would take any message as "signed" by it; libsodium, which
    # the node verifies with, takes nothing, so the member could never send. Said at once.
    identity = bytes([1]) + bytes(31)
    small_order = {
        "key_id": key_id_for(identity),
        "public_key": base64.b64encode(identity).decode(),
    }
    bad.write_text(json.dumps(dict(req, signing_key=small_order)))
    with pytest.raises(SetupError, match=r"signing_key\.public_key is not a usable Ed25519 key"):
        add_member(fed, bad)

    with pytest.raises(SetupError, match="file not found"):
        add_member(fed, tmp_path / "missing.json")
    assert json.loads((fed / "federation.json").read_text())["members"] == []


def test_add_member_needs_a_federation(tmp_path: Path) -> None:
    req_path = init_agency("140400/ecology", "10.1.2.3:7443", tmp_path / "eco")
    with pytest.raises(SetupError, match=r"federation\.json: file not found"):
        add_member(tmp_path / "nofed", req_path)


def _self_signed(san: list[x509.GeneralName] | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_agency_from_certificate_errors() -> None:
    with pytest.raises(SetupError, match="no subjectAltName"):
        agency_from_certificate(_self_signed(None))
    with pytest.raises(SetupError, match="found 0"):
        agency_from_certificate(_self_signed([x509.DNSName("a.example")]))
    with pytest.raises(SetupError, match="unknown kind 'nope'"):
        agency_from_certificate(
            _self_signed([x509.UniformResourceIdentifier(URI_SAN_PREFIX + "140400/nope")])
        )


def test_certificate_fingerprint() -> None:
    assert certificate_fingerprint(b"") == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
