"""`liandong serve`: refusing to start on a bad set-up, health and reflection, SIGTERM.

A node that cannot run must say so in one line naming the file and the problem, and exit 1
before it opens a port; a node that runs answers the standard health and reflection
services over mutual TLS, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from node import pki
from node.envelope import envelope_from_json
from node.federation import Registry, sign_registry
from node.federation_setup import NodeSetup, publish_registry
from node.identity import generate_signing_key, load_signing_key
from tests.conftest import ECOLOGY, POLICE, NodeProcess, wait_for
from tests.integration.test_exchange import cli
from tests.peer import audit_events

MakeFederation = Callable[..., dict[str, NodeProcess]]


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    """Run `liandong serve` expecting it to refuse; a node that starts fails the timeout."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


def assert_refused_to_start(config: Path, *phrases: str) -> str:
    result = serve(config)
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("liandong: error: "), line
    for phrase in phrases:
        assert phrase in line, f"{phrase!r} not in {line!r}"
    return line


def registry_of(path: Path) -> Registry:
    return Registry.from_json_bytes(envelope_from_json(path.read_bytes()).payload)


def operator_dir(setup: NodeSetup) -> Path:
    return setup.directory.parent / "operator"


# -- one broken thing at a time ----------------------------------------------------------


def remove_signing_key(setup: NodeSetup) -> tuple[str, ...]:
    path = setup.directory / "keys" / "signing.key"
    path.unlink()
    return (f"signing key {path.resolve()}", "file not found")


def alter_registry_payload(setup: NodeSetup) -> tuple[str, ...]:
    path = setup.directory / "registry.json"
    document = json.loads(path.read_bytes())
    payload = bytearray(base64.b64decode(document["payload"]))
    at = payload.index(b"demo-federation")
    payload[at] ^= 0x20  # "Demo-federation": still valid JSON, no longer what was signed
    document["payload"] = base64.b64encode(bytes(payload)).decode("ascii")
    path.write_text(json.dumps(document), encoding="utf-8")
    return (f"federation registry {path.resolve()}", "signature invalid")


def expire_registry(setup: NodeSetup) -> tuple[str, ...]:
    path = setup.directory / "registry.json"
    now = datetime.now(UTC)
    current = registry_of(path)
    expired = Registry(
        federation=current.federation,
        serial=current.serial,
        issued_at=now - timedelta(days=40),
        expires_at=now - timedelta(days=10),
        members=current.members,
        permissions=current.permissions,
    )
    operator_key = load_signing_key(operator_dir(setup) / "operator.key")
    path.write_bytes(sign_registry(expired, operator_key))
    return (f"federation registry {path.resolve()}", "expired at", "newer registry")


def _edit_config(setup: NodeSetup, old: str, new: str) -> None:
    text = setup.config.read_text(encoding="utf-8")
    assert old in text
    setup.config.write_text(text.replace(old, new, 1), encoding="utf-8")


def malformed_agency(setup: NodeSetup) -> tuple[str, ...]:
    _edit_config(setup, f'agency = "{ECOLOGY}"', 'agency = "140400/ecologie"')
    return (f"config {setup.config.resolve()}", "node.agency", "'140400/ecologie' is malformed")


def unknown_config_key(setup: NodeSetup) -> tuple[str, ...]:
    _edit_config(setup, "[node]\n", '[node]\nlisten_port = "7443"\n')
    return (f"config {setup.config.resolve()}", "unknown key 'node.listen_port'")


def foreign_tls_certificate(setup: NodeSetup) -> tuple[str, ...]:
    # Another agency's certificate: it chains to the CA but not to this node's key.
    other = setup.directory.parent / "other"
    request = pki.init_agency(POLICE, "127.0.0.1:1", other)
    (setup.directory / "tls.crt").write_bytes(
        pki.add_member(operator_dir(setup), request).read_bytes()
    )
    return (
        f"TLS certificate {(setup.directory / 'tls.crt').resolve()}",
        "does not match the TLS key",
    )


def unregistered_signing_key(setup: NodeSetup) -> tuple[str, ...]:
    path = setup.directory / "keys" / "signing.key"
    path.unlink()
    key = generate_signing_key(path)
    return (f"signing key {key.key_id}", "is not a valid key of '140400/ecology'")


def invalid_log_level(setup: NodeSetup) -> tuple[str, ...]:
    _edit_config(setup, 'format = "auto"', 'format = "auto"\nlevel = "loud"')
    return (f"config {setup.config.resolve()}", "'logging.level' must be")


BREAKAGES: dict[str, Callable[[NodeSetup], tuple[str, ...]]] = {
    "foreign-tls-certificate": foreign_tls_certificate,
    "unregistered-signing-key": unregistered_signing_key,
    "invalid-log-level": invalid_log_level,
    "missing-signing-key": remove_signing_key,
    "registry-signature-invalid": alter_registry_payload,
    "registry-expired": expire_registry,
    "malformed-agency-id": malformed_agency,
    "unknown-config-key": unknown_config_key,
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_serve_refuses_a_broken_setup(make_federation: MakeFederation, breakage: str) -> None:
    setup = make_federation((ECOLOGY,))[ECOLOGY].setup
    phrases = BREAKAGES[breakage](setup)
    assert_refused_to_start(setup.config, *phrases)
    assert not setup.admin_socket.exists()


def test_serve_refuses_a_registry_rollback(make_federation: MakeFederation) -> None:
    node = make_federation((ECOLOGY,))[ECOLOGY]
    setup = node.setup
    registry_path = setup.directory / "registry.json"
    serial_1 = registry_path.read_bytes()
    publish_registry(setup.directory.parent, [setup])
    assert registry_of(registry_path).serial == 2

    node.start()
    assert node.stop() == 0

    registry_path.write_bytes(serial_1)
    assert registry_of(registry_path).serial == 1
    assert_refused_to_start(
        setup.config,
        f"federation registry {registry_path.resolve()}",
        "serial 1 is older than serial 2",
        "rollback refused",
    )


def test_a_newly_published_registry_is_taken_without_a_restart(
    make_federation: MakeFederation,
) -> None:
    node = make_federation((ECOLOGY,))[ECOLOGY]
    setup = node.setup
    node.start()
    registry_path = setup.directory / "registry.json"
    registry_path.write_text("not a registry", encoding="utf-8")  # a botched copy is refused
    wait_for(lambda: "new registry file refused" in node.log_path.read_text(), what="refusal")
    with node.client() as client:
        assert client.node_info().registry_serial == 1
    publish_registry(setup.directory.parent, [setup])
    with node.client() as client:
        wait_for(lambda: client.node_info().registry_serial == 2, seconds=30, what="reload")
    # The swap is visible before its audit entry commits; the log line follows the commit.
    wait_for(lambda: "registry reloaded" in node.log_path.read_text(), what="reload logged")
    events = [e["event"] for e in audit_events(setup)]
    assert events.count("registry_accepted") == 2
    # Its audit bundle carries both registries it ran on, and verifies with them.
    bundle = setup.directory / "audit.bundle"
    exported = cli("audit", "export", "--out", str(bundle), config=setup.config)
    assert exported.returncode == 0, exported.stderr
    with zipfile.ZipFile(bundle) as archive:
        [earlier] = [n for n in archive.namelist() if n.startswith("registries/")]
        assert json.loads(envelope_from_json(archive.read(earlier)).payload)["serial"] == 1
    verified = subprocess.run(
        [sys.executable, "-m", "node.cli", "audit", "verify", str(bundle), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0, verified.stdout
    assert json.loads(verified.stdout)["bundles"][0]["registries"] == 2


def test_an_agency_without_a_builtin_plugin_starts(make_federation: MakeFederation) -> None:
    water = "140400/water"
    node = make_federation((water,))[water]
    node.start()
    with node.client() as client:
        assert client.node_info().agency == water


# -- a running node ------------------------------------------------------------------------


def member_channel(caller: NodeSetup, target: NodeSetup) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(caller.directory / "ca.crt").read_bytes(),
        private_key=(caller.directory / "keys" / "tls.key").read_bytes(),
        certificate_chain=(caller.directory / "tls.crt").read_bytes(),
    )
    return grpc.secure_channel(target.endpoint, credentials)


def test_health_reflection_and_sigterm(make_federation: MakeFederation) -> None:
    nodes = make_federation((ECOLOGY, POLICE))
    ecology = nodes[ECOLOGY].start()
    police = nodes[POLICE].setup  # not running: only its certificate is used

    with member_channel(police, ecology.setup) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "liandong.v1.Exchange"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
        services = {s.name for s in responses[0].list_services_response.service}
        assert {"liandong.v1.Exchange", "grpc.health.v1.Health"} <= services
        assert "liandong.v1.LocalAdmin" not in services  # the admin API stays on the socket

    socket_path = ecology.setup.admin_socket
    assert socket_path.exists()
    assert ecology.stop(signal.SIGTERM, timeout=30) == 0
    assert not socket_path.exists()
