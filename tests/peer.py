"""Test helpers that act as a peer node by hand: real TLS, real keys, crafted envelopes."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from concurrent import futures
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import create_engine, text

from node._pb.liandong.v1 import envelope_pb2, exchange_pb2_grpc
from node.config import load_config
from node.envelope import MESSAGE_PAYLOAD_TYPE, sign_envelope
from node.exchange.messages import AttachmentInput, compose_message
from node.federation_setup import NodeSetup
from node.identity import SigningKey, load_signing_key


def exchange_stub(caller: NodeSetup, target: NodeSetup) -> exchange_pb2_grpc.ExchangeStub:
    """An Exchange client that authenticates with `caller`'s TLS certificate."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(caller.directory / "ca.crt").read_bytes(),
        private_key=(caller.directory / "keys" / "tls.key").read_bytes(),
        certificate_chain=(caller.directory / "tls.crt").read_bytes(),
    )
    channel = grpc.secure_channel(target.endpoint, credentials)
    return exchange_pb2_grpc.ExchangeStub(channel)


def signing_key(setup: NodeSetup) -> SigningKey:
    return load_signing_key(setup.directory / "keys" / "signing.key")


def clue_message(
    sender: str,
    recipients: list[str],
    *,
    created_at: datetime | None = None,
    message_id: str | None = None,
    family: str = "clue",
    body: dict[str, Any] | None = None,
    body_type: str = "",
) -> envelope_pb2.Message:
    return compose_message(
        sender=sender,
        family=family,
        recipients=recipients,
        body=body or {"title": "线索", "facts": "河道排污"},
        body_type=body_type,
        created_at=created_at or datetime.now(UTC),
        message_id=message_id,
        in_reply_to="01a2087f-397b-7d93-9e6b-dca9fcaac36a" if family == "reply" else "",
    )


def sign(message: envelope_pb2.Message, key: SigningKey) -> envelope_pb2.Envelope:
    return sign_envelope(message.SerializeToString(deterministic=True), MESSAGE_PAYLOAD_TYPE, key)


def database_rows(setup: NodeSetup, query: str) -> list[tuple[Any, ...]]:
    """Read a node's database directly, SQLite or PostgreSQL (to check what was stored)."""
    url = load_config(setup.config).database_url
    if url.startswith("sqlite"):
        with sqlite3.connect(setup.directory / "node.db") as connection:
            return connection.execute(query).fetchall()
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text(query)).all()
            return [
                tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows
            ]
    finally:
        engine.dispose()


def audit_events(setup: NodeSetup) -> list[dict[str, Any]]:
    return [
        json.loads(row[0])
        for row in database_rows(setup, "SELECT entry FROM audit_entries ORDER BY idx")
    ]


def attachment_message(
    sender: str,
    recipients: list[str],
    data: bytes,
    *,
    title: str,
    file_name: str = "file.bin",
    media_type: str = "application/octet-stream",
) -> tuple[envelope_pb2.Message, bytes]:
    """A clue that references `data` as its one attachment; returns (message, sha256)."""
    digest = hashlib.sha256(data).digest()
    message = compose_message(
        sender=sender,
        family="clue",
        recipients=recipients,
        body={"title": title},
        body_type="",
        created_at=datetime.now(UTC),
        attachments=[AttachmentInput(digest, len(data), media_type, file_name)],
    )
    return message, digest


def anonymous_credentials(setup: NodeSetup, uri: str | None = None) -> grpc.ChannelCredentials:
    """TLS client credentials issued by the federation CA (so TLS accepts them) for a
    certificate of no member: with no subjectAltName, or with the URI SAN `uri` (say, a
    malformed one, or one naming an agency that is not in the registry)."""
    operator = setup.directory.parent / "operator"
    ca_key = serialization.load_pem_private_key((operator / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((operator / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anonymous")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
    )
    if uri is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return grpc.ssl_channel_credentials(
        root_certificates=(operator / "ca.crt").read_bytes(),
        private_key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate_chain=cert.public_bytes(serialization.Encoding.PEM),
    )


def serve_as(setup: NodeSetup, add_servicer: Callable[[grpc.Server], None]) -> grpc.Server:
    """A fake peer on `setup`'s endpoint with its certificate and key: real mutual TLS.
    `add_servicer` registers the fake's servicers (e.g. a lying Exchange or Audit)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    add_servicer(server)
    credentials = grpc.ssl_server_credentials(
        [
            (
                (setup.directory / "keys" / "tls.key").read_bytes(),
                (setup.directory / "tls.crt").read_bytes(),
            )
        ],
        root_certificates=(setup.directory / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    server.add_secure_port(setup.endpoint, credentials)
    server.start()
    return server
