"""The SQL adapter against a real SQLite file and the real PostgreSQL server: it maps columns,
remembers what it picked up, skips and logs rows it cannot use, and never writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from plugins.sqlsource import RowError, SqlConfigError, SqlQuery, SqlSource

QUERY = "SELECT id, no, party, tonnes FROM penalties WHERE id > :after ORDER BY id"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'bureau.db'}"
    else:
        url = request.getfixturevalue("postgres_database")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE penalties "
                "(id INTEGER PRIMARY KEY, no TEXT, party TEXT, tonnes NUMERIC)"
            )
        )
        add_rows(connection, (1, "罚〔2026〕1号", "甲公司", 5), (2, "罚〔2026〕2号", "乙公司", 0.5))
    engine.dispose()
    return url


def add_rows(connection: Any, *rows: tuple[Any, ...]) -> None:
    for row in rows:
        connection.execute(
            text("INSERT INTO penalties VALUES (:id, :no, :party, :tonnes)"),
            dict(zip(("id", "no", "party", "tonnes"), row, strict=True)),
        )


def source_for(url: str, state: Path, query: str = QUERY, **extra: Any) -> SqlSource:
    settings = {
        "url": url,
        "query": query,
        "key": "id",
        "columns": {"record_id": "no", "party": "party", "hazardous_waste_tonnes": "tonnes"},
        "fixed": {"kind": "penalty"},
        **extra,
    }
    return SqlSource(SqlQuery.from_config("ecology", "penalties", settings), state)


def test_rows_are_mapped_picked_up_once_and_remembered(database: str, tmp_path: Path) -> None:
    taken: list[dict[str, Any]] = []
    source = source_for(database, tmp_path / "state")
    picked = source.pick_up(taken.append)
    assert (picked.handled, picked.failed, picked.error) == (2, (), None)
    assert taken[0] == {
        "_key": 1,
        "record_id": "罚〔2026〕1号",
        "party": "甲公司",
        "hazardous_waste_tonnes": 5,
        "kind": "penalty",
    }
    assert taken[1]["hazardous_waste_tonnes"] == 0.5  # NUMERIC comes back as a plain number
    assert source.pick_up(taken.append).handled == 0
    source.close()

    engine = create_engine(database)
    with engine.begin() as connection:
        add_rows(connection, (3, "罚〔2026〕3号", "丙公司", 7))
    engine.dispose()
    # A new adapter (the node restarted) goes on from the remembered cursor.
    again = source_for(database, tmp_path / "state")
    assert again.pick_up(taken.append).handled == 1
    assert [t["_key"] for t in taken] == [1, 2, 3]
    again.close()


def test_a_bad_row_is_logged_and_skipped_and_a_failing_node_is_retried(
    database: str, tmp_path: Path
) -> None:
    source = source_for(database, tmp_path / "state")
    calls: list[int] = []

    def handle(record: dict[str, Any]) -> None:
        calls.append(record["_key"])
        if record["_key"] == 1:
            raise RowError("field 'party': required")

    picked = source.pick_up(handle)
    assert picked.handled == 1
    assert picked.failed == ("[plugins.ecology.sql.penalties] row id=1: field 'party': required",)
    [logged] = source.failed_path.read_text(encoding="utf-8").splitlines()
    assert json.loads(logged)["key"] == 1

    # The node cannot take a row now: the cursor stops before it and the next call retries.
    fresh = source_for(database, tmp_path / "other")

    def busy(record: dict[str, Any]) -> None:
        if record["_key"] == 2:
            raise RuntimeError("node shutting down")

    stopped = fresh.pick_up(busy)
    assert stopped.handled == 1 and stopped.error is not None
    assert "row id=2: will retry: node shutting down" in stopped.error
    assert fresh.after == 1
    assert fresh.pick_up(lambda r: None).handled == 1
    source.close()
    fresh.close()


def test_the_adapter_never_writes(database: str, tmp_path: Path) -> None:
    writing = source_for(
        database,
        tmp_path / "state",
        query="UPDATE penalties SET party = 'x' WHERE id > :after RETURNING id, no, party, tonnes",
    )
    picked = writing.pick_up(lambda r: None)
    assert picked.handled == 0 and picked.error is not None
    assert "[plugins.ecology.sql.penalties]" in picked.error
    assert "read" in picked.error.lower()  # "readonly database" / "read-only transaction"
    writing.close()
    engine = create_engine(database)
    with engine.connect() as connection:
        assert (
            connection.execute(text("SELECT party FROM penalties WHERE id = 1")).scalar()
            == "甲公司"
        )
    engine.dispose()


def test_a_query_without_a_mapped_column_is_named(database: str, tmp_path: Path) -> None:
    source = source_for(
        database, tmp_path / "state", query="SELECT id, no FROM penalties WHERE id > :after"
    )
    picked = source.pick_up(lambda r: None)
    assert picked.error == (
        "[plugins.ecology.sql.penalties]: the query returns no column(s) party, tonnes; "
        "it returns id, no"
    )
    assert source.after == 0  # nothing moved
    source.close()


def test_an_unreachable_database_leaves_the_cursor(tmp_path: Path) -> None:
    source = source_for("postgresql+psycopg://nobody:secret@127.0.0.1:1/none", tmp_path / "s")
    picked = source.pick_up(lambda r: None)
    assert picked.error is not None and "OperationalError" in picked.error
    assert "secret" not in picked.error  # the password is not logged
    assert not source.cursor_path.exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"query": QUERY, "key": "id"}, r"sql.penalties\] url: required"),
        (
            {"url": "sqlite://", "query": "SELECT * FROM t", "key": "id"},
            "must use the cursor as :after",
        ),
        ({"url": "nodb", "query": QUERY, "key": "id"}, r"url: Could not parse"),
        ({"url": "sqlite://", "query": QUERY, "key": "id", "colums": {}}, "unknown key"),
        (
            {"url": "sqlite://", "query": QUERY, "key": "id", "columns": {"a": 1}},
            "columns a: expected a column",
        ),
    ],
)
def test_bad_config_is_named(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(SqlConfigError, match=message):
        SqlQuery.from_config("ecology", "penalties", settings)


def test_a_mistyped_sqlite_path_is_named_and_creates_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "bureua.db"
    source = source_for(f"sqlite:///{typo}", tmp_path / "state")
    picked = source.pick_up(lambda r: None)
    source.close()
    assert picked.error is not None and "unable to open database file" in picked.error
    assert str(typo) in picked.error
    assert not typo.exists()  # opened read-only: no empty database left behind


def test_a_sqlite_path_with_characters_a_uri_escapes_is_read(tmp_path: Path) -> None:
    folder = tmp_path / "执法 系统?#%"
    folder.mkdir()
    url = f"sqlite:///{folder / 'bureau.db'}"
    engine = create_engine(url)
    with engine.begin() as connection:
        create = "CREATE TABLE penalties (id INTEGER PRIMARY KEY, no TEXT, party TEXT, tonnes REAL)"
        connection.execute(text(create))
        add_rows(connection, (7, "罚〔2026〕7号", "丙公司", 3.5))
    engine.dispose()
    source = source_for(url, tmp_path / "state")
    seen: list[dict[str, Any]] = []
    picked = source.pick_up(seen.append)
    source.close()
    assert picked.error is None and [r["record_id"] for r in seen] == ["罚〔2026〕7号"]
