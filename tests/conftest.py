"""Shared fixtures: real federations on disk, real node processes, real databases.

Nodes run as separate `liandong serve` processes (as in production) so tests can
SIGKILL them. PostgreSQL tests create a database of their own on the local server
and drop it afterwards.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable

import pytest

from node.federation_setup import NodeProcess, create_federation

ECOLOGY, POLICE, PROCURATORATE = "140400/ecology", "140400/police", "140400/procuratorate"
POSTGRES_ADMIN_URL = os.environ.get(
    "LIANDONG_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


def wait_for(condition: Callable[[], bool], seconds: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def create_postgres_database(request: pytest.FixtureRequest) -> str:
    """A fresh database on the local PostgreSQL server, dropped when the test ends."""
    import psycopg

    name = f"liandong_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    request.addfinalizer(drop)
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


@pytest.fixture
def postgres_database(request: pytest.FixtureRequest) -> str:
    return create_postgres_database(request)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_federation(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Callable[..., dict[str, NodeProcess]]:
    """Create a federation; returns {agency: NodeProcess} (not started). Stops them after."""
    started: list[NodeProcess] = []

    def make(
        agencies: tuple[str, ...] = (ECOLOGY, POLICE, PROCURATORATE),
        backend: str = "sqlite",
        **options: object,
    ) -> dict[str, NodeProcess]:
        # Short paths: unix socket paths are limited to 107 bytes.
        root = tmp_path_factory.mktemp("fed")
        urls = (
            {}
            if backend == "sqlite"
            else {agency: create_postgres_database(request) for agency in agencies}
        )
        setups = create_federation(root, list(agencies), database_urls=urls, **options)  # type: ignore[arg-type]
        nodes = {s.agency: NodeProcess(s) for s in setups}
        if urls:
            # Finalizers run last-in first-out: registered after the databases' drops, this
            # stops the nodes before their databases go (the teardown below runs after both).
            request.addfinalizer(lambda: [node.stop() for node in nodes.values()])
        started.extend(nodes.values())
        return nodes

    yield make  # type: ignore[misc]
    for node in started:
        node.stop()


@pytest.fixture
def running(make_federation: Callable[..., dict[str, NodeProcess]]) -> dict[str, NodeProcess]:
    """Three agencies' nodes, started, on SQLite."""
    nodes = make_federation()
    for node in nodes.values():
        node.start(wait=False)
    for node in nodes.values():
        node.wait_serving()
    return nodes
