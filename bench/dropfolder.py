"""Drop-folder ingest: how fast a node takes drafts its local system drops, 10 k files.

    python -m bench.dropfolder [--files 10000] [--csv-rows 0] [--json]

Creates a two-node federation (140400/ecology -> 140400/procuratorate, SQLite), starts both
as ``liandong serve`` processes, writes ``--files`` JSON clue drafts into ecology's
``local/drafts/`` (each written to a temporary name and renamed, as the local system must),
and times how long the node takes until every draft is in ``processed/`` with its message id
(ingested: composed, signed, stored and audited), and until every message is delivered and
receipted by the procuratorate. With ``--csv-rows N`` the same number of drafts comes as
CSV files of N rows each instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.transfer import RECEIVER, SENDER, BenchNode, set_log_level
from node.federation_setup import create_federation

CSV_HEADER = "family,to,body.title,body.facts\n"


def say(text: str) -> None:
    print(text, flush=True, file=sys.stderr)


def write_drafts(drafts: Path, files: int, csv_rows: int) -> int:
    """Write the drafts; return how many files."""
    drafts.mkdir(parents=True, exist_ok=True)
    written = 0
    if csv_rows:
        for start in range(0, files, csv_rows):
            rows = "".join(
                f"clue,{RECEIVER},bench clue {n:06d},漳河支流排污\n"
                for n in range(start, min(start + csv_rows, files))
            )
            temp = drafts / f".{start:06d}.csv.tmp"
            temp.write_text(CSV_HEADER + rows, encoding="utf-8")
            temp.rename(drafts / f"{start:06d}.csv")
            written += 1
        return written
    for n in range(files):
        draft = {
            "family": "clue",
            "to": [RECEIVER],
            "body": {"title": f"bench clue {n:06d}", "facts": "漳河支流排污"},
        }
        temp = drafts / f".{n:06d}.json.tmp"
        temp.write_text(json.dumps(draft, ensure_ascii=False), encoding="utf-8")
        temp.rename(drafts / f"{n:06d}.json")
        written += 1
    return written


def count(folder: Path, suffix: str) -> int:
    try:
        return sum(1 for name in os.listdir(folder) if name.endswith(suffix))
    except FileNotFoundError:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000, help="drafts to drop")
    parser.add_argument("--csv-rows", type=int, default=0, help="rows per CSV file (0: JSON)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    say(f"load average (1 min) before: {os.getloadavg()[0]:.2f}")
    root = Path(tempfile.mkdtemp(prefix="ld-dropfolder-"))
    nodes: list[BenchNode] = []
    try:
        setups = create_federation(root, [SENDER, RECEIVER])
        for setup in setups:
            set_log_level(setup, "warning")
        nodes = [BenchNode(s) for s in setups]
        for node in nodes:
            node.start()
        sender = nodes[0]
        drafts = sender.setup.local_folder / "drafts"
        processed = drafts / "processed"
        expected = args.files if not args.csv_rows else -(-args.files // args.csv_rows)
        began = time.monotonic()
        files = write_drafts(drafts, args.files, args.csv_rows)
        dropped = time.monotonic() - began
        say(f"dropped {files:,} files in {dropped:.1f} s; waiting for the node ...")
        while count(processed, ".message_id") < expected:
            if count(drafts / "failed", ".error.txt"):
                raise SystemExit(f"a draft failed: see {drafts / 'failed'}")
            time.sleep(0.2)
        ingested = time.monotonic() - began
        say(f"  all {args.files:,} drafts ingested after {ingested:.1f} s")
        with sender.client() as client:
            while client.node_info().pending_deliveries:
                time.sleep(0.2)
        delivered = time.monotonic() - began
        results: dict[str, Any] = {
            "drafts": args.files,
            "files": files,
            "csv_rows_per_file": args.csv_rows,
            "ingested_per_s": round(args.files / ingested),
            "delivered_per_s": round(args.files / delivered),
            "seconds_to_ingest": round(ingested, 1),
            "seconds_to_deliver": round(delivered, 1),
        }
        say(
            f"  ingest {results['ingested_per_s']:,} drafts/s; every one delivered and "
            f"receipted after {delivered:.1f} s ({results['delivered_per_s']:,}/s)"
        )
        if args.json:
            print(json.dumps(results, indent=2))
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
