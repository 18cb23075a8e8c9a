"""The SQL adapter against a real SQLite file and the real PostgreSQL server: it maps columns,
remembers what it picked up, skips and logs rows it cannot use, and never writes."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from plugins.adapters import AgencyAdapters
from plugins.sqlsource import PickUp, RowError, SqlConfigError, SqlQuery, SqlSource
from tests.fakes import FakeNodeAPI

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


# -- values no field can take: NaN, infinities, binary ------------------------------------


def test_sqlite_rows_with_infinity_or_binary_are_skipped_and_the_rest_picked_up(
    tmp_path: Path,
) -> None:
    """+Infinity and -Infinity in a REAL column and a BLOB are refused row by row, logged
    with the key and the column, and the rows after them are picked up. SQLite cannot hold a
    NaN: it stores NULL instead, so that row comes through with no value (as any NULL)."""
    url = f"sqlite:///{tmp_path / 'bureau.db'}"
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text("CREATE TABLE penalties (id INTEGER PRIMARY KEY, no TEXT, party, tonnes REAL)")
        )
        add_rows(
            connection,
            (1, "罚〔2026〕1号", "甲公司", 5.0),
            (2, "罚〔2026〕2号", "乙公司", float("nan")),
            (3, "罚〔2026〕3号", "丙公司", float("inf")),
            (4, "罚〔2026〕4号", "丁公司", float("-inf")),
            (5, "罚〔2026〕5号", b"\x89PNG\r\n\x1a\n", 1.5),
            (6, "罚〔2026〕6号", "戊公司", 0.5),
        )
        stored = connection.execute(
            text("SELECT id, typeof(party), typeof(tonnes) FROM penalties ORDER BY id")
        ).all()
    engine.dispose()
    assert [tuple(row) for row in stored] == [
        (1, "text", "real"),
        (2, "text", "null"),  # the NaN, as SQLite keeps it
        (3, "text", "real"),
        (4, "text", "real"),
        (5, "blob", "real"),
        (6, "text", "real"),
    ]

    taken: list[dict[str, Any]] = []
    source = source_for(url, tmp_path / "state")
    picked = source.pick_up(taken.append)
    where = "[plugins.ecology.sql.penalties]"
    refused = (
        f"{where} row id=3: column 'tonnes': holds inf, not a number",
        f"{where} row id=4: column 'tonnes': holds -inf, not a number",
        f"{where} row id=5: column 'party': holds binary data, which no field takes",
    )
    assert picked == PickUp(handled=3, failed=refused, error=None, read=6)
    assert [(t["_key"], t["hazardous_waste_tonnes"]) for t in taken] == [
        (1, 5),
        (2, None),
        (6, 0.5),
    ]
    logged = [json.loads(line) for line in source.failed_path.read_text("utf-8").splitlines()]
    assert [(entry["key"], entry["error"]) for entry in logged] == list(
        zip((3, 4, 5), refused, strict=True)
    )
    assert source.after == 6  # past the refused rows: they do not come back

    assert source.pick_up(taken.append) == PickUp()
    assert len(taken) == 3
    assert len(source.failed_path.read_text("utf-8").splitlines()) == 3
    source.close()


def test_postgresql_rows_with_nan_infinity_or_binary_are_skipped_and_the_rest_picked_up(
    postgres_database: str, tmp_path: Path
) -> None:
    """PostgreSQL holds NaN and the infinities in double precision and in numeric (which
    arrives as a Decimal), and bytes in bytea: each such row is refused, the others taken."""
    engine = create_engine(postgres_database)
    with engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE penalties (id INTEGER PRIMARY KEY, no TEXT, party TEXT, "
                "tonnes DOUBLE PRECISION, fine NUMERIC, scan BYTEA)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO penalties VALUES "
                "(1, 'a', '甲公司', 5, 20000, NULL), "
                "(2, 'b', '乙公司', 'NaN', 1, NULL), "
                "(3, 'c', '丙公司', 'Infinity', 1, NULL), "
                "(4, 'd', '丁公司', '-Infinity', 1, NULL), "
                "(5, 'e', '戊公司', 1, 'NaN', NULL), "
                "(6, 'f', '己公司', 1, 'Infinity', NULL), "
                "(7, 'g', '庚公司', 1, '-Infinity', NULL), "
                "(8, 'h', '辛公司', 1, 1, '\\x89504e47'::bytea), "
                "(9, 'i', '壬公司', 0.5, 30000.5, NULL)"
            )
        )
    engine.dispose()
    columns = {
        "record_id": "no",
        "hazardous_waste_tonnes": "tonnes",
        "fine": "fine",
        "scan": "scan",
    }
    query = "SELECT id, no, tonnes, fine, scan FROM penalties WHERE id > :after ORDER BY id"
    source = source_for(postgres_database, tmp_path / "state", query=query, columns=columns)
    taken: list[dict[str, Any]] = []
    picked = source.pick_up(taken.append)
    where = "[plugins.ecology.sql.penalties]"
    refused = (
        f"{where} row id=2: column 'tonnes': holds nan, not a number",
        f"{where} row id=3: column 'tonnes': holds inf, not a number",
        f"{where} row id=4: column 'tonnes': holds -inf, not a number",
        f"{where} row id=5: column 'fine': holds NaN, not a number",
        f"{where} row id=6: column 'fine': holds Infinity, not a number",
        f"{where} row id=7: column 'fine': holds -Infinity, not a number",
        f"{where} row id=8: column 'scan': holds binary data, which no field takes",
    )
    assert picked == PickUp(handled=2, failed=refused, error=None, read=9)
    assert [(t["_key"], t["hazardous_waste_tonnes"], t["fine"]) for t in taken] == [
        (1, 5.0, 20000),
        (9, 0.5, 30000.5),
    ]
    logged = [
        json.loads(line)["key"] for line in source.failed_path.read_text("utf-8").splitlines()
    ]
    assert logged == [2, 3, 4, 5, 6, 7, 8]
    assert source.after == 9
    source.close()


def test_the_police_sql_poll_submits_the_good_decisions_around_unusable_values(
    tmp_path: Path,
) -> None:
    """Through the police plugin's poll (the SQL adapter as the node runs it): the decisions
    whose reason holds an infinity or binary data are logged and skipped, not sent as text
    ("inf", "b'...'"); the poll goes on and submits the rest."""
    url = f"sqlite:///{tmp_path / 'cases.db'}"
    engine = create_engine(url)
    with engine.begin() as connection:
        # `reason` has no declared type, so SQLite keeps each value as it was given.
        connection.execute(
            text("CREATE TABLE decisions (id INTEGER PRIMARY KEY, transfer_id TEXT, reason)")
        )
        for key, reason in enumerate(
            ["立案侦查", float("nan"), float("inf"), float("-inf"), b"\x00\x01", "不予立案"], 1
        ):
            connection.execute(
                text("INSERT INTO decisions VALUES (:id, :transfer, :reason)"),
                {
                    "id": key,
                    "transfer": f"0000000{key}-0000-7000-8000-000000000000",
                    "reason": reason,
                },
            )
    engine.dispose()
    decisions = {
        "url": url,
        "query": "SELECT id, transfer_id, reason FROM decisions WHERE id > :after ORDER BY id",
        "key": "id",
        "columns": {"in_reply_to": "transfer_id", "body.text": "reason"},
        "fixed": {
            "family": "reply",
            "body_type": "feedback",
            "body.status": "filed",
            "to": "140400/ecology",
        },
    }
    api = FakeNodeAPI(
        tmp_path, agency="140400/police", plugin="police", config={"sql": {"decisions": decisions}}
    )
    police = AgencyAdapters("police")
    police.liandong_node_started(api)
    police.liandong_poll_local_system(api)

    assert [(d.source, dict(d.body)) for d in api.submitted] == [
        ("sql:police:decisions:1", {"text": "立案侦查", "status": "filed"}),
        ("sql:police:decisions:2", {"status": "filed"}),  # SQLite's NULL for the NaN
        ("sql:police:decisions:6", {"text": "不予立案", "status": "filed"}),
    ]
    failed = tmp_path / "plugins" / "police" / "sql" / "decisions.failed.jsonl"
    logged = [json.loads(line) for line in failed.read_text("utf-8").splitlines()]
    assert [(entry["key"], entry["error"].split(": ", 1)[1]) for entry in logged] == [
        (3, "column 'reason': holds inf, not a number"),
        (4, "column 'reason': holds -inf, not a number"),
        (5, "column 'reason': holds binary data, which no field takes"),
    ]
    police.liandong_poll_local_system(api)  # the next poll: nothing new, nothing again
    assert len(api.submitted) == 3
    for source in police.sql_sources(api):
        source.close()


def test_a_key_that_is_not_a_finite_number_stops_the_source_with_its_reason(
    tmp_path: Path,
) -> None:
    """The cursor cannot move past +Infinity: the source says why, and moves nothing."""
    database = tmp_path / "keys.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE penalties (id REAL, no TEXT, party TEXT, tonnes REAL)")
        connection.executemany(
            "INSERT INTO penalties VALUES (?, ?, ?, ?)",
            [(1.0, "a", "p", 1.0), (float("inf"), "b", "q", 2.0)],
        )
    source = source_for(f"sqlite:///{database}", tmp_path / "state")
    seen: list[dict[str, Any]] = []
    result = source.pick_up(seen.append)
    assert [row["record_id"] for row in seen] == ["a"]
    assert result.error is not None
    assert "holds float inf; the cursor needs a finite number" in result.error
