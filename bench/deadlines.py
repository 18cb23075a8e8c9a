"""The deadline scheduler with a million open clocks, on SQLite and on PostgreSQL.

    python -m bench.deadlines [--clocks 1000000] [--due 500] [--passes 20]
                              [--backend sqlite,postgresql] [--json]

For each backend, on a fresh database migrated like a node's: inserts ``--clocks`` open
cases with one running clock each, their next steps spread over the coming year, and
``--due`` whose step is already due. Then times, ``--passes`` times each:

- the scheduler's read (node.exchange.cases.CaseBook.due_clocks: every clock whose next step
  has come, at most 500, one indexed range read on clocks.next_action_at);
- a whole scheduler pass over the due clocks: the read, then each clock's step recorded through
  the real group-commit writer (state, next step, audit entry). The clocks here are this
  node's own (no reminder is sent), and each pass starts from the same due set again.

It prints the query plan of the read, so a full scan would show. The target (issue 4): well
under 1 s per pass at a million open clocks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, insert, text, update

from bench.transfer import create_pg_databases, drop_pg_databases
from node.exchange.cases import CaseBook
from node.exchange.deadlines import Deadlines
from node.store.db import make_engine, session_factory, upgrade
from node.store.models import CASES, CLOCKS
from node.store.writer import BatchWriter

AGENCY = "140400/police"
PEER = "140400/ecology"
CHUNK = 20_000


def say(text: str) -> None:
    print(text, flush=True, file=sys.stderr)


def fill(engine: Any, clocks: int, due: int, now: datetime) -> None:
    rng = random.Random(4)
    began = time.perf_counter()
    with engine.begin() as connection:
        for start in range(0, clocks, CHUNK):
            cases, rows = [], []
            for n in range(start, min(start + CHUNK, clocks)):
                case_id = str(uuid.UUID(int=n))
                opened = now - timedelta(days=1)
                step = (
                    now - timedelta(seconds=rng.randrange(1, 3600))
                    if n < due
                    else now + timedelta(seconds=rng.randrange(60, 365 * 86400))
                )
                cases.append(
                    {
                        "case_id": case_id,
                        "peer": PEER,
                        "family": "crime_transfer",
                        "role": "addressee",
                        "state": "received",
                        "title": f"bench case {n}",
                        "confidentiality": "internal",
                        "attrs": "{}",
                        "opened_at": opened,
                        "updated_at": opened,
                    }
                )
                rows.append(
                    {
                        "case_id": case_id,
                        "peer": PEER,
                        "rule": "crime_transfer.filing",
                        "responsible": AGENCY,
                        "started_at": opened,
                        "due_at": step + timedelta(days=1),
                        "warn_at": step,
                        "escalate_at": None,
                        "state": "open",
                        "next_action_at": step,
                        "closed_at": None,
                    }
                )
            connection.execute(insert(CASES), cases)
            connection.execute(insert(CLOCKS), rows)
            if start % 200_000 == 0:
                say(f"  {start + len(rows):,} clocks ...")
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("ANALYZE"))
    say(f"  filled in {time.perf_counter() - began:.0f} s")


def plan(engine: Any, now: datetime) -> str:
    """The database's plan for the scheduler's read (CaseBook.due_clocks)."""
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    statement = text(
        prefix + "SELECT clocks.case_id FROM clocks JOIN cases ON cases.case_id = "
        "clocks.case_id AND cases.peer = clocks.peer WHERE clocks.next_action_at <= :now "
        "ORDER BY clocks.next_action_at LIMIT 500"
    ).bindparams(bindparam("now", type_=CLOCKS.c.next_action_at.type))
    with engine.connect() as connection:
        rows = connection.execute(statement, {"now": now}).all()
    return "\n".join(" ".join(str(c) for c in row) for row in rows)


async def passes(
    engine: Any, book: CaseBook, now: datetime, count: int, due: int
) -> dict[str, Any]:
    sessions = session_factory(engine)
    writer = BatchWriter(sessions)
    writer.start()
    reads, whole = [], []
    try:
        for _ in range(count):
            began = time.perf_counter()
            with sessions() as session:
                found = book.due_clocks(session, now, 500)
            reads.append(time.perf_counter() - began)
            began = time.perf_counter()
            with sessions() as session:
                found = book.due_clocks(session, now, 500)
            units = []
            for clock in found:
                values, _notice = book.step(clock, now)
                units.append(
                    partial(book.record_step, clock=clock, values=values, at=now, sent=None)
                )
            await writer.run_many(units)
            whole.append(time.perf_counter() - began)
            if len(found) != min(due, 500):
                raise SystemExit(f"expected {min(due, 500)} due clocks, found {len(found)}")
            # Put them back, so every pass has the same work.
            with engine.begin() as connection:
                connection.execute(
                    update(CLOCKS)
                    .where(CLOCKS.c.case_id.in_([c["case_id"] for c in found]))
                    .values(state="open", next_action_at=now - timedelta(seconds=1))
                )
    finally:
        await writer.stop()
    return {
        "read_ms": round(statistics.median(reads) * 1000, 2),
        "pass_ms": round(statistics.median(whole) * 1000, 1),
        "clocks_per_pass": min(due, 500),
    }


def run_backend(backend: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    created: dict[str, str] = {}
    if backend == "sqlite":
        url = f"sqlite:///{workdir / 'deadlines.db'}"
    else:
        created = create_pg_databases(("clocks",))
        url = created["clocks"]
    engine = make_engine(url)
    try:
        upgrade(engine)
        now = datetime.now(UTC)
        say(f"{backend}: {args.clocks:,} open clocks, {args.due} due")
        fill(engine, args.clocks, args.due, now)
        book = CaseBook(AGENCY, Deadlines())
        query_plan = plan(engine, now)
        say("  query plan:\n    " + query_plan.replace("\n", "\n    "))
        result = asyncio.run(passes(engine, book, now, args.passes, args.due))
        say(
            f"  scheduler read {result['read_ms']} ms, whole pass over "
            f"{result['clocks_per_pass']} due clocks {result['pass_ms']} ms "
            f"(medians of {args.passes})"
        )
        return {"backend": backend, "clocks": args.clocks, "plan": query_plan, **result}
    finally:
        engine.dispose()
        if created:
            drop_pg_databases(created)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clocks", type=int, default=1_000_000, help="open clocks")
    parser.add_argument("--due", type=int, default=500, help="clocks whose step is due")
    parser.add_argument("--passes", type=int, default=20, help="timed passes")
    parser.add_argument("--backend", default="sqlite,postgresql", help="comma-separated")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    say(f"load average (1 min) before: {os.getloadavg()[0]:.2f}")
    workdir = Path(tempfile.mkdtemp(prefix="ld-deadlines-"))
    try:
        results = [run_backend(b, args, workdir) for b in args.backend.split(",")]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
