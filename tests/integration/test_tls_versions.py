"""The peer port speaks TLS 1.3 only (docs/protocol.md section 3).

A member's client certificate gets through with TLS 1.3 and is refused with TLS 1.2 or older;
checked with `openssl s_client` against a real `liandong serve`.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from node.federation_setup import NodeProcess, NodeSetup
from tests.conftest import ECOLOGY, POLICE

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def handshake(caller: NodeSetup, target: NodeSetup, *versions: str) -> tuple[int, str]:
    """`openssl s_client` with `caller`'s certificate; its exit status and output."""
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-brief",
            "-connect",
            target.endpoint,
            *versions,
            "-cert",
            str(caller.directory / "tls.crt"),
            "-key",
            str(caller.directory / "keys" / "tls.key"),
            "-CAfile",
            str(caller.directory / "ca.crt"),
            "-verify_return_error",
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=10,
    )
    return result.returncode, result.stdout + result.stderr


def test_peer_port_refuses_tls_older_than_1_3(
    make_federation: Callable[..., dict[str, NodeProcess]],
) -> None:
    nodes = make_federation((ECOLOGY, POLICE))
    ecology = nodes[ECOLOGY].start().setup
    police = nodes[POLICE].setup  # not started: only its certificate is used

    # Once the handshake is done the node may close the idle connection first, so
    # s_client's exit status says nothing here; its report of the handshake does.
    _, output = handshake(police, ecology, "-tls1_3")
    assert "Protocol version: TLSv1.3" in output, output
    assert "Verification: OK" in output, output

    # The same certificate, key and CA file, offering only TLS 1.2 (or 1.1, at a security
    # level that lets OpenSSL offer it): the node ends the handshake.
    for versions in (("-tls1_2",), ("-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")):
        status, output = handshake(police, ecology, *versions)
        assert status != 0, (versions, output)
        assert "Protocol version" not in output, (versions, output)

    # A gRPC client (TLS 1.3) with the member's certificate is served as before.
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(police.directory / "ca.crt").read_bytes(),
        private_key=(police.directory / "keys" / "tls.key").read_bytes(),
        certificate_chain=(police.directory / "tls.crt").read_bytes(),
    )
    with grpc.secure_channel(ecology.endpoint, credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
