"""The SQL adapter: rows read from an agency's own database with a configured query.

The node never writes to the agency's database: SQLite files are opened read-only and
switched to ``query_only`` (so a mistyped path is an error, not a new empty file), and
PostgreSQL transactions are opened read-only, so a query that tries to change something fails
instead (for other databases, give the node a read-only account).
What has been picked up is remembered in the plugin's own state, not in the agency's tables:
a cursor on a key column that only grows (an id, an insertion time), kept in
``<data_dir>/plugins/<plugin>/<source>.cursor.json`` and moved past each row once the row is
handled. Rows that cannot be handled are logged in ``<source>.failed.jsonl`` beside it, with
the key and the field, and skipped: a bad row never blocks the rows behind it.

A source is a table of the plugin's config::

    [plugins.police.sql.decisions]
    url = "postgresql+psycopg://reader@db.police.local/cases"   # any SQLAlchemy URL
    query = "SELECT id, transfer_id, decision, reason FROM decisions WHERE id > :after ORDER BY id"
    key = "id"             # the column the cursor follows; the query must order by it
    start_after = 0        # the cursor before the first row (default 0)
    [plugins.police.sql.decisions.columns]   # output field = query column
    in_reply_to = "transfer_id"
    "body.status" = "decision"
    "body.text" = "reason"
    [plugins.police.sql.decisions.fixed]     # output field = constant
    family = "reply"
    body_type = "feedback"

The query gets the cursor as ``:after`` and should return at most a few thousand rows per
call (a ``LIMIT``); the adapter asks again on the next poll.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

__all__ = ["PickUp", "RowError", "SqlConfigError", "SqlQuery", "SqlSource"]

_KEYS = frozenset({"url", "query", "key", "start_after", "columns", "fixed"})
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class SqlConfigError(ValueError):
    """A source's config cannot work; the message names the table and key."""


class CursorError(ValueError):
    """The remembered cursor cannot be read; the message names the file."""


class RowError(ValueError):
    """A row cannot be handled; the message names the field. The row is skipped and logged."""


@dataclass(frozen=True)
class SqlQuery:
    """One configured source: where to read, what, and how the columns map."""

    plugin: str
    name: str
    url: str
    query: str
    key: str
    start_after: Any = 0
    columns: Mapping[str, str] = field(default_factory=dict)
    """Output field -> query column; empty: every column under its own name."""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    table: str = "sql"
    """The plugin's config table the source is in (``[plugins.<plugin>.<table>.<name>]``)."""

    @property
    def where(self) -> str:
        return f"[plugins.{self.plugin}.{self.table}.{self.name}]"

    @classmethod
    def from_config(cls, plugin: str, name: str, settings: Any, table: str = "sql") -> SqlQuery:
        where = f"[plugins.{plugin}.{table}.{name}]"
        if not _NAME.fullmatch(name):
            raise SqlConfigError(f"{where}: a source name is letters, digits, '_' and '-'")
        if not isinstance(settings, Mapping):
            raise SqlConfigError(f"{where}: expected a table with url, query and key")
        unknown = sorted(set(settings) - _KEYS)
        if unknown:
            raise SqlConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_KEYS))}"
            )
        for key in ("url", "query", "key"):
            if not isinstance(settings.get(key), str) or not settings[key].strip():
                raise SqlConfigError(f"{where} {key}: required, a non-empty string")
        try:
            make_url(settings["url"])
        except ArgumentError as error:
            raise SqlConfigError(f"{where} url: {error}") from None
        if ":after" not in settings["query"]:
            raise SqlConfigError(
                f"{where} query: must use the cursor as :after (e.g. WHERE id > :after "
                "ORDER BY id), or every poll would read the same rows again"
            )
        for mapping in ("columns", "fixed"):
            if not isinstance(settings.get(mapping, {}), Mapping):
                raise SqlConfigError(f"{where} {mapping}: expected a table")
        columns = settings.get("columns", {})
        bad = [k for k, v in columns.items() if not isinstance(v, str) or not v]
        if bad:
            raise SqlConfigError(f"{where}.columns {bad[0]}: expected a column name")
        return cls(
            plugin=plugin,
            name=name,
            url=settings["url"],
            query=settings["query"],
            key=settings["key"],
            start_after=settings.get("start_after", 0),
            columns=dict(columns),
            fixed={k: _fixed(where, k, v) for k, v in settings.get("fixed", {}).items()},
            table=table,
        )


def _fixed(where: str, field: str, value: Any) -> Any:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ";".join(value)  # a list field (to = ["a", "b"]) as a row would hold it
    if isinstance(value, str | int | float | bool):
        return value
    raise SqlConfigError(f"{where}.fixed {field}: expected text, a number or a list of text")


@dataclass(frozen=True)
class PickUp:
    """What one call of :meth:`SqlSource.pick_up` did."""

    handled: int = 0
    failed: tuple[str, ...] = ()
    """One line per skipped row: its key and what was wrong."""
    error: str | None = None
    """Set when the database could not be read; nothing moved, the next poll tries again."""
    read: int = 0
    """Rows the query returned; as many as the batch size means more are waiting."""


def _plain(value: Any) -> Any:
    """A column value as the rest of the node takes it: text, numbers, ISO dates."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)  # the agency's system keeps UTC, as the node does
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise RowError(f"holds {value}, not a number")
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise RowError(f"holds {value}, not a number")
    if isinstance(value, bytes | memoryview):
        raise RowError("holds binary data, which no field takes")
    return value


def _sqlite_read_only(url: URL) -> URL:
    """A SQLite file opened read-only (``mode=ro``): a mistyped path then fails with "unable
    to open database file" instead of creating an empty database that has no table."""
    path = url.database
    if url.get_backend_name() != "sqlite" or not path or path == ":memory:":
        return url
    if path.startswith("file:"):
        return url  # already a URI: the agency chose its own flags
    return url.set(
        database=f"file:{quote(path, safe='/')}",
        query={**url.query, "mode": "ro", "uri": "true"},
    )


def _read_only(engine: Engine) -> Engine:
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _query_only(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.execute("PRAGMA query_only = ON")

        return engine
    if engine.dialect.name == "postgresql":
        return engine.execution_options(postgresql_readonly=True)
    return engine


class SqlSource:
    """One source with its remembered cursor. Not thread-safe; the node polls one at a time."""

    def __init__(self, query: SqlQuery, state_dir: Path, batch: int = 1000) -> None:
        self.query = query
        self.state_dir = state_dir
        self.batch = batch
        self.cursor_path = state_dir / f"{query.name}.cursor.json"
        self.failed_path = state_dir / f"{query.name}.failed.jsonl"
        self._engine: Engine | None = None

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    @property
    def after(self) -> Any:
        try:
            return json.loads(self.cursor_path.read_text(encoding="utf-8"))["after"]
        except FileNotFoundError:
            return self.query.start_after
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CursorError(
                f"{self.query.where}: the cursor file {self.cursor_path} cannot be read "
                f'({error}); put the last key handled in it as {{"after": KEY}}, or remove it '
                "to start from start_after again"
            ) from None

    def _remember(self, after: Any) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cursor_path.with_name(f".{self.cursor_path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump({"after": after, "at": datetime.now(UTC).isoformat()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.cursor_path)

    def _log_failure(self, key: Any, problem: str) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        line = {"key": key, "error": problem, "at": datetime.now(UTC).isoformat()}
        with self.failed_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _engine_for(self) -> Engine:
        if self._engine is None:
            url = _sqlite_read_only(make_url(self.query.url))
            self._engine = _read_only(create_engine(url, pool_pre_ping=True))
        return self._engine

    def fetch(self) -> tuple[list[str], list[Any]]:
        """The next rows after the cursor: (column names, rows).

        :raises SQLAlchemyError: the database could not be read.
        :raises SqlConfigError: the query does not return the mapped columns.
        """
        with self._engine_for().connect() as connection:
            result = connection.execute(text(self.query.query), {"after": self.after})
            names = list(result.keys())
            rows = list(result.fetchmany(self.batch))
        wanted = (*self.query.columns.values(), self.query.key)
        missing = sorted({c for c in wanted if c not in names})
        if missing:
            raise SqlConfigError(
                f"{self.query.where}: the query returns no column(s) {', '.join(missing)}; "
                f"it returns {', '.join(names)}"
            )
        return names, rows

    def _record(self, names: list[str], row: Any) -> dict[str, Any]:
        """One row under its output field names (``_key`` holds the key).

        :raises RowError: a value no field can take.
        """
        values = dict(zip(names, row, strict=True))
        # Without a mapping every column is an output, except the key: it is the cursor's.
        columns = dict(self.query.columns) or {n: n for n in names if n != self.query.key}
        record: dict[str, Any] = {}
        for out, column in columns.items():
            try:
                record[out] = _plain(values[column])
            except (RowError, ValueError, OverflowError) as error:
                raise RowError(f"column {column!r}: {error}") from None
        record.update(self.query.fixed)
        return record

    def pick_up(self, handle: Callable[[dict[str, Any]], object]) -> PickUp:
        """Hand each new row to ``handle`` in key order, moving the cursor past it.

        ``handle`` raising :class:`RowError` skips the row (logged in the failed file);
        any other exception stops here with the cursor before that row, to retry it on the
        next call. The cursor is saved once per call, so after a crash rows may be handed
        over again: ``handle`` must be idempotent (a draft with a ``source`` is).
        """
        try:
            names, rows = self.fetch()
        except (SqlConfigError, CursorError) as error:
            return PickUp(error=str(error))
        except SQLAlchemyError as error:
            first = str(error).splitlines()[0]
            shown = make_url(self.query.url).render_as_string(hide_password=True)
            return PickUp(error=f"{self.query.where} {shown}: {type(error).__name__}: {first}")
        handled = 0
        failed: list[str] = []
        last: Any = None
        key: Any = None
        try:
            for row in rows:
                key = row[names.index(self.query.key)]
                if not isinstance(key, int | str | date | float | Decimal) or (
                    isinstance(key, float | Decimal) and not math.isfinite(key)
                ):
                    # The cursor cannot pass it: stop the source, it is the config's fault.
                    raise SqlConfigError(
                        f"{self.query.where} key: column {self.query.key!r} holds "
                        f"{type(key).__name__} {key!s:.40}; the cursor needs a finite number, "
                        "text or time"
                    )
                key = _plain(key)
                try:
                    handle({"_key": key, **self._record(names, row)})
                    handled += 1
                except RowError as error:
                    problem = f"{self.query.where} row {self.query.key}={key}: {error}"
                    self._log_failure(key, problem)
                    failed.append(problem)
                last = key
        except Exception as error:  # not the row's fault (the node is busy): retry it later
            where = f"{self.query.where} row {self.query.key}={key}"
            return PickUp(handled, tuple(failed), f"{where}: will retry: {error}", len(rows))
        finally:
            # Once per call, not per row: a row handled again after a crash is harmless
            # (handle is idempotent), an fsync per row is not.
            if last is not None:
                self._remember(last)
        return PickUp(handled=handled, failed=tuple(failed), read=len(rows))
