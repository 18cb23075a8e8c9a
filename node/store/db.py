"""Engine construction, the declarative base and migrations.

SQLite (the default, in the node's data directory) runs in WAL mode with
synchronous=FULL so a committed row survives power loss; PostgreSQL
(``postgresql+psycopg://``) is the choice at scale.
"""

from __future__ import annotations

import fcntl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import DateTime, Engine, MetaData, create_engine, event
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# Deterministic constraint names keep Alembic migrations reproducible across backends.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite has no time zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}  # noqa: RUF012 (read by SQLAlchemy)


def make_engine(url: str) -> Engine:
    """Create an engine; for SQLite, enable WAL, FULL sync and real savepoints."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        _configure_sqlite(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=8)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling breaks SAVEPOINT; take it over.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")


# pg_advisory_lock key of the one writer of a node database: "liandong" in ASCII.
SEQUENCER_LOCK_KEY = int.from_bytes(b"liandong", "big") & 0x7FFF_FFFF_FFFF_FFFF


class SequencerBusy(Exception):
    """Another node process already writes to this database."""


class SequencerLock:
    """Held while this process is the database's one writer (and so the audit log's sequencer).

    The audit log's indices, tree and checkpoints come from one place; a second node process
    on the same database would fork them. PostgreSQL: a session advisory lock on a connection
    kept for the purpose. SQLite: an exclusive lock on ``<database>.lock``. Both are released
    by the operating system or the server if the process dies.
    """

    def __init__(self, engine: Engine) -> None:
        self._connection: Any = None
        self._file: Any = None
        url = engine.url
        if url.get_backend_name() == "postgresql":
            connection = engine.connect()
            claimed = connection.exec_driver_sql(
                f"SELECT pg_try_advisory_lock({SEQUENCER_LOCK_KEY})"
            ).scalar()
            if not claimed:
                connection.close()
                raise SequencerBusy(
                    "another node process holds this database's writer lock (PostgreSQL "
                    f"advisory lock {SEQUENCER_LOCK_KEY}); run one node process per database"
                )
            self._connection = connection
        elif url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            path = Path(str(url.database)).with_name(Path(str(url.database)).name + ".lock")
            handle = path.open("a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise SequencerBusy(
                    f"another node process holds this database's writer lock ({path}); run "
                    "one node process per database"
                ) from None
            self._file = handle

    def release(self) -> None:
        if self._connection is not None:
            self._connection.exec_driver_sql(f"SELECT pg_advisory_unlock({SEQUENCER_LOCK_KEY})")
            self._connection.close()
            self._connection = None
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine) -> None:
    """Apply every pending migration (run at node start-up)."""
    command.upgrade(alembic_config(engine), "head")
