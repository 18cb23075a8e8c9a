"""Fuzz the peer port of a real node at volume (issue 13, item 5), on demand.

    python -m bench.fuzz [--requests 25000] [--backend sqlite|postgresql] [--seed N]
                         [--workers 2] [--json] [--keep]

Creates a federation (140400/ecology, 140400/police, 140400/procuratorate) in a temp dir
with node.federation_setup.create_federation and the harness's small `[limits]`
(tests.fuzzing.FUZZ_LIMITS), starts the procuratorate's node as a `liandong serve` process
(on SQLite, or on a database of its own on the local PostgreSQL server, dropped afterwards),
and runs tests/fuzzing.py's harness against it as the police: `--requests` drawn cases
spread evenly over every RPC of Exchange, Audit and Health, `--workers` at a time, while
ecology checks health every 0.5 s and sends a legitimate message every 5 s.

Prints the calls per RPC and status, the refusals against their audit entries, the Deliver
batches against their answers, the maximum health-check latency, the time taken and every
violation of the oracle (tests/fuzzing.py's docstring); exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from node.federation_setup import NodeProcess, create_federation
from tests import fuzzing

POSTGRES_ADMIN_URL = os.environ.get(
    "LIANDONG_BENCH_POSTGRES",
    os.environ.get("LIANDONG_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"),
)


def say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


def create_database() -> str:
    import psycopg

    name = f"liandong_fuzz_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    return base.replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"


def drop_database(url: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz", description="Fuzz every RPC of a node's peer port."
    )
    parser.add_argument("--requests", type=int, default=25000, help="drawn cases (examples)")
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    parser.add_argument("--workers", type=int, default=2, help="cases sent at once")
    parser.add_argument(
        "--json", action="store_true", help="JSON on stdout (the report goes to stderr)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the node's directory")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="liandong-fuzz-"))
    url = create_database() if args.backend == "postgresql" else ""
    node: NodeProcess | None = None
    try:
        setups = fuzzing.federation_setups(
            create_federation(
                root,
                [fuzzing.ECOLOGY, fuzzing.POLICE, fuzzing.PROCURATORATE],
                database_urls={fuzzing.RECEIVER: url} if url else {},
                extra_config=fuzzing.FUZZ_LIMITS,
            )
        )
        node = NodeProcess(setups[fuzzing.RECEIVER]).start()
        say(
            f"fuzzing {fuzzing.RECEIVER} on {args.backend} with {args.requests} cases, "
            f"seed {args.seed}, {args.workers} at a time"
        )
        started = time.monotonic()

        def progress(report: fuzzing.Report) -> None:
            say(
                f"  {report.examples} cases, {report.calls} calls, "
                f"{report.violation_count} violations, {time.monotonic() - started:.0f} s"
            )

        report = fuzzing.run_fuzz(
            node,
            setups,
            examples=args.requests,
            seed=args.seed,
            backend=args.backend,
            workers=args.workers,
            progress=progress,
        )
    finally:
        if node is not None:
            node.stop()
        if url:
            drop_database(url)
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = report.text()
    if args.json:
        say(text)
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        print(text)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
