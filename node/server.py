"""Builds the node's two gRPC servers.

* the peer server: mutual TLS on the configured endpoint; Exchange, health, reflection;
* the admin server: a unix socket in the data directory; LocalAdmin and health.

Services are registered per server, not per port, so the admin API can never be
reached from the network.
"""

from __future__ import annotations

from functools import partial

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from node._pb.liandong.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    exchange_pb2,
    exchange_pb2_grpc,
)
from node.audit.service import AuditLog
from node.config import Limits
from node.exchange.errors import ExchangeError
from node.exchange.inbound import PeerIdentity, Receiver
from node.services.admin import LocalAdminServicer
from node.services.audit import AuditServicer
from node.services.exchange import ExchangeServicer
from node.services.gate import PeerGate

UNIX_SOCKET_PATH_MAX = 107
# A last resort only: the gate bounds each caller's share, refusing at once what is over it,
# so this is reached only if hundreds of members each held their whole share.
MAX_PEER_RPCS = 4096
# HTTP/2 streams one connection may open; above one member's whole share (calls + checks).
MAX_STREAMS_PER_CONNECTION = 128
EXCHANGE_SERVICE = exchange_pb2.DESCRIPTOR.services_by_name["Exchange"].full_name
AUDIT_SERVICE = audit_pb2.DESCRIPTOR.services_by_name["Audit"].full_name
MIN_MESSAGE_BYTES = 8 * 1024 * 1024  # an attachment chunk (1 MiB) must always fit


def server_options(max_envelope_bytes: int) -> list[tuple[str, int]]:
    """gRPC's own size cap sits well above the node's limit, so an envelope somewhat too
    large meets the node's check (a precise message and an audit entry); only one far too
    large is cut off by gRPC before it is read."""
    size = max(2 * max_envelope_bytes, MIN_MESSAGE_BYTES)
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 0),
    ]


async def record_refusal(
    receiver: Receiver, audit_log: AuditLog, method: str, peer: PeerIdentity, error: ExchangeError
) -> None:
    """The audit entry of a refusal at the gate: an Audit service call is an `audit_query`
    like every call to that service (docs/protocol.md 12.2), any other a `rejected`."""
    service, _, name = method.strip("/").partition("/")
    if service == AUDIT_SERVICE:
        await audit_log.record_refused_query(peer.agency_id, name, error)
    else:
        await receiver.record_rejections([(None, error)], peer)


def peer_gate(exchange: ExchangeServicer, audit: AuditServicer, limits: Limits) -> PeerGate:
    def audit_admission(peer: PeerIdentity) -> None:
        audit.log.authorize(peer.agency_id, peer.certificate_sha256)

    return PeerGate(
        limits,
        admissions={
            EXCHANGE_SERVICE: exchange.receiver.admit,
            AUDIT_SERVICE: audit_admission,
        },
        is_member=exchange.receiver.is_member,
        record_refusal=partial(record_refusal, exchange.receiver, audit.log),
        tolerant=frozenset({f"/{EXCHANGE_SERVICE}/Deliver"}),
    )


class ServerBuildError(Exception):
    pass


def build_peer_server(
    exchange: ExchangeServicer,
    audit: AuditServicer,
    health_servicer: health.aio.HealthServicer,
    listen: str,
    *,
    limits: Limits,
    ca_pem: bytes,
    key_pem: bytes,
    cert_pem: bytes,
) -> grpc.aio.Server:
    server = grpc.aio.server(
        interceptors=[peer_gate(exchange, audit, limits)],
        options=[
            *server_options(limits.max_envelope_bytes),
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ],
        maximum_concurrent_rpcs=MAX_PEER_RPCS,
    )
    exchange_pb2_grpc.add_ExchangeServicer_to_server(exchange, server)
    audit_pb2_grpc.add_AuditServicer_to_server(audit, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            exchange_pb2.DESCRIPTOR.services_by_name["Exchange"].full_name,
            audit_pb2.DESCRIPTOR.services_by_name["Audit"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    credentials = grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )
    try:
        server.add_secure_port(listen, credentials)
    except RuntimeError as error:
        raise ServerBuildError(f"cannot listen on {listen}: {error}") from None
    return server


def build_admin_server(
    admin: LocalAdminServicer,
    health_servicer: health.aio.HealthServicer,
    socket_path: str,
    *,
    max_envelope_bytes: int,
) -> grpc.aio.Server:
    if len(socket_path) > UNIX_SOCKET_PATH_MAX:
        raise ServerBuildError(
            f"admin socket path {socket_path} is longer than {UNIX_SOCKET_PATH_MAX} characters; "
            "set node.admin_socket to a shorter path"
        )
    server = grpc.aio.server(options=server_options(max_envelope_bytes))
    admin_pb2_grpc.add_LocalAdminServicer_to_server(admin, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (admin_pb2.DESCRIPTOR.services_by_name["LocalAdmin"].full_name, reflection.SERVICE_NAME),
        server,
    )
    try:
        server.add_insecure_port(f"unix:{socket_path}")
    except RuntimeError as error:
        raise ServerBuildError(f"cannot open admin socket {socket_path}: {error}") from None
    return server
