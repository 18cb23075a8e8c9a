"""Build a working federation on one machine: used by the demo, the tests and the benchmark.

It performs exactly the steps docs/deploy.md asks of an operator and of each
agency (federation init, init, add-member, publish, copy the files back), so what
the demo exercises is what a deployment does.
"""

from __future__ import annotations

import random
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from node import pki
from node.config import CONFIG_FILE_NAME, render_config
from node.identity import agency_kind


@dataclass(frozen=True)
class NodeSetup:
    agency: str
    directory: Path
    endpoint: str

    @property
    def config(self) -> Path:
        return self.directory / CONFIG_FILE_NAME

    @property
    def admin_socket(self) -> Path:
        return self.directory / "admin.sock"

    @property
    def local_folder(self) -> Path:
        return self.directory / "local"


def free_port() -> int:
    """A free loopback port below the ephemeral range.

    Port 0 would hand out an ephemeral port, which outgoing connections also draw from: a
    node restarted after a crash could then find its port taken by a peer's reconnect.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randint(10000, max(low - 1, 10001))  # noqa: S311 (not security)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def create_federation(
    workdir: Path,
    agencies: Sequence[str],
    *,
    names: dict[str, str] | None = None,
    database_urls: dict[str, str] | None = None,
    poll_seconds: float = 0.2,
    extra_config: str = "",
    registry_days: int = 30,
) -> list[NodeSetup]:
    """Operator + one node directory per agency, each ready for `liandong serve`."""
    operator = workdir / "operator"
    pki.init_federation(operator, "demo-federation")
    nodes = []
    for agency in agencies:
        directory = workdir / agency_kind(agency)
        endpoint = f"127.0.0.1:{free_port()}"
        request = pki.init_agency(agency, endpoint, directory, (names or {}).get(agency))
        certificate = pki.add_member(operator, request)
        shutil.copy(certificate, directory / "tls.crt")
        url = (database_urls or {}).get(agency, "")
        config = render_config(agency=agency, listen=endpoint, database_url=url)
        config = config.replace(
            'admin_socket = "admin.sock"',
            f'admin_socket = "admin.sock"\npoll_seconds = {poll_seconds}',
        )
        (directory / CONFIG_FILE_NAME).write_text(config + extra_config, encoding="utf-8")
        nodes.append(NodeSetup(agency, directory, endpoint))
    publish_registry(workdir, nodes, valid_days=registry_days)
    return nodes


def publish_registry(workdir: Path, nodes: Sequence[NodeSetup], *, valid_days: int = 30) -> None:
    operator = workdir / "operator"
    pki.publish(operator, operator / "registry.json", valid_days=valid_days)
    for node in nodes:
        for name in ("ca.crt", "operator.pub", "registry.json"):
            shutil.copy(operator / name, node.directory / name)
