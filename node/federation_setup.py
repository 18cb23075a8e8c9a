"""Build a working federation on one machine: used by the demo, the tests and the benchmark.

It performs exactly the steps docs/deploy.md asks of an operator and of each
agency (federation init, init, add-member, publish, copy the files back), so what
the demo exercises is what a deployment does.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from node import pki
from node.admin_client import AdminClient, AdminError
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
    witness_interval: float = 0.0,
    supervisors: Mapping[str, str] | None = None,
    auditors: Sequence[str] = (),
) -> list[NodeSetup]:
    """Operator + one node directory per agency, each ready for `liandong serve`.

    `supervisors` maps an agency to the member its escalations go to, in the registry (as
    `liandong federation supervise` records it); `auditors` are the members the registry
    names auditors (`liandong federation auditor`).

    Witnessing is off unless `witness_interval` is given: its rounds write the peers' audit
    logs (each query is logged), which tests and benchmarks that count entries do not want.
    """
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
        config = render_config(
            agency=agency, listen=endpoint, database_url=url, witness_interval=witness_interval
        )
        config = config.replace(
            'admin_socket = "admin.sock"',
            f'admin_socket = "admin.sock"\npoll_seconds = {poll_seconds}',
        )
        (directory / CONFIG_FILE_NAME).write_text(config + extra_config, encoding="utf-8")
        nodes.append(NodeSetup(agency, directory, endpoint))
    for agency, supervisor in (supervisors or {}).items():
        pki.set_supervisor(operator, agency, supervisor)
    for agency in auditors:
        pki.set_auditor(operator, agency, True)
    publish_registry(workdir, nodes, valid_days=registry_days)
    return nodes


def publish_registry(workdir: Path, nodes: Sequence[NodeSetup], *, valid_days: int = 30) -> None:
    operator = workdir / "operator"
    pki.publish(operator, operator / "registry.json", valid_days=valid_days)
    for node in nodes:
        for name in ("ca.crt", "operator.pub", "registry.json"):
            shutil.copy(operator / name, node.directory / name)


class NodeProcessError(RuntimeError):
    pass


class NodeProcess:
    """One `liandong serve` process on a prepared node directory: what the demo, the tests
    and the benchmarks run, exactly as an operator would."""

    def __init__(self, setup: NodeSetup) -> None:
        self.setup = setup
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def agency(self) -> str:
        return self.setup.agency

    @property
    def log_path(self) -> Path:
        return self.setup.directory / "node.log"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise NodeProcessError(f"{self.agency} was never started")
        return self.process.pid

    def start(self, wait: bool = True) -> NodeProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve", "--config", str(self.setup.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        if wait:
            self.wait_serving()
        return self

    def serving(self) -> bool:
        """True once the node answers on its admin socket."""
        try:
            with self.client() as client:
                client.node_info()
        except AdminError:
            return False
        return True

    def wait_serving(self, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise NodeProcessError(f"{self.agency} exited at start-up:\n{self.log_tail()}")
            if self.serving():
                return
            time.sleep(0.1)
        raise NodeProcessError(f"{self.agency} did not start:\n{self.log_tail()}")

    def client(self) -> AdminClient:
        return AdminClient(self.setup.admin_socket)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the node and wait; its exit code (None: it had to be killed)."""
        if self.process is None:
            return 0
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
