"""The audit log at scale: append rate as the log grows, proof times, bundle export and verify.

    python -m bench.audit [--sizes 0,100000,1000000] [--window 20000] [--batch 64]
                          [--proofs 200] [--verify] [--keep DIR] [--json]

On a fresh SQLite file (WAL, synchronous=FULL, as a node runs it) it appends synthetic audit
entries through the real group-commit writer and tree sequencer (entries of ~250 bytes like
the node's, one checkpoint signed per batch of `--batch` units), growing the log to each of
`--sizes` in turn and timing `--window` appends there: the rate must stay flat as the log
grows. At the largest size it times inclusion and consistency proofs (from the stored tree,
`--proofs` random ones each), then, with `--verify`, exports a bundle of the whole log and
verifies it offline (every checkpoint signature, the tree recomputed against every
checkpoint), reporting entries/s and bundle bytes per entry. Proof times are medians over
random indices with the node's cache of computed subtrees (node.audit.tree.NodeCache).

The entries carry no messages, so the verify figure counts checkpoint signatures only; see
bench/README.md.
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
from functools import partial
from pathlib import Path
from typing import Any

from node.audit import log as audit
from node.audit.checkpoint import log_origin
from node.audit.export import LogIdentity, export_bundle
from node.audit.log import AuditEvent
from node.audit.merkle import consistency_proof, inclusion_proof
from node.audit.tree import NodeCache, StoredTree, TreeSequencer
from node.audit.verify import verify_bundles
from node.envelope import sign_note
from node.federation_setup import create_federation
from node.identity import SigningKey, load_signing_key
from node.store.db import make_engine, session_factory, upgrade
from node.store.writer import Batch, BatchWriter

AGENCY = "140400/procuratorate"


def entry(n: int, batch: Batch) -> int:
    return audit.append(
        batch,
        AuditEvent.RECEIVED,
        node=AGENCY,
        message_id=f"01a2087f-397b-7d93-9e6b-{n:012x}",
        envelope_sha256=f"{n:064x}",
        peer="140400/ecology",
        family="clue",
    )


async def grow(writer: BatchWriter, start: int, count: int, batch: int, inflight: int) -> float:
    """Append `count` entries in `batch`-unit groups, `inflight` groups at once; seconds."""
    began = time.perf_counter()
    position = start
    pending: set[asyncio.Task[Any]] = set()
    while position < start + count:
        size = min(batch, start + count - position)
        works = [partial(entry, n) for n in range(position, position + size)]
        pending.add(asyncio.ensure_future(writer.run_many(works)))
        position += size
        if len(pending) >= inflight:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
    if pending:
        await asyncio.gather(*pending)
    return time.perf_counter() - began


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ld-audit-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"batch": args.batch, "window": args.window, "appends": []}
    try:
        [setup] = create_federation(workdir / "fed", [AGENCY])
        key: SigningKey = load_signing_key(setup.directory / "keys" / "signing.key")
        origin = log_origin("demo-federation", AGENCY)
        engine = make_engine(f"sqlite:///{workdir / 'audit.db'}")
        upgrade(engine)
        sessions = session_factory(engine)
        sequencer = TreeSequencer(origin, partial(sign_note, name=origin, key=key))

        async def appends() -> None:
            writer = BatchWriter(sessions, sequencer=sequencer)
            writer.start()
            size = 0
            for target in sorted(args.sizes):
                if target > size:
                    say(f"growing the log to {target:,} entries ...")
                    await grow(writer, size, target - size, 512, 4)
                    size = target
                seconds = await grow(writer, size, args.window, args.batch, args.inflight)
                size += args.window
                rate = args.window / seconds
                results["appends"].append({"log_size": target, "entries_per_s": round(rate)})
                say(f"  at {target:>10,} entries: {rate:,.0f} appends/s")
            await writer.stop()
            results["final_size"] = size

        asyncio.run(appends())
        size = results["final_size"]
        rng = random.Random(7)
        with sessions() as session:
            # As the node serves them: one long-lived cache of computed subtrees.
            tree = StoredTree(session, NodeCache())
            times = []
            for _ in range(args.proofs):
                index = rng.randrange(size)
                began = time.perf_counter()
                inclusion_proof(index, size, tree)
                times.append(time.perf_counter() - began)
            results["inclusion_proof_ms"] = round(statistics.median(times) * 1000, 3)
            times = []
            for _ in range(args.proofs):
                old = rng.randrange(1, size)
                began = time.perf_counter()
                consistency_proof(old, size, tree)
                times.append(time.perf_counter() - began)
            results["consistency_proof_ms"] = round(statistics.median(times) * 1000, 3)
        say(
            f"proofs at {size:,}: inclusion {results['inclusion_proof_ms']} ms, "
            f"consistency {results['consistency_proof_ms']} ms (median of {args.proofs})"
        )
        if args.verify:
            identity = LogIdentity(
                agency=AGENCY,
                origin=origin,
                federation="demo-federation",
                registry=(setup.directory / "registry.json").read_bytes(),
                operator_key_pem=(setup.directory / "operator.pub").read_bytes(),
            )
            bundle = workdir / "audit.bundle"
            began = time.perf_counter()
            summary = export_bundle(sessions, bundle, identity)
            export_seconds = time.perf_counter() - began
            entries = summary.end_index - summary.first_index
            began = time.perf_counter()
            report = verify_bundles([bundle])
            verify_seconds = time.perf_counter() - began
            results.update(
                export_entries_per_s=round(entries / export_seconds),
                verify_entries_per_s=round(entries / verify_seconds),
                verify_ok=report.ok,
                checkpoints_verified=report.bundles[0].checkpoints,
                bundle_bytes_per_entry=round(summary.size_bytes / entries, 1),
            )
            say(
                f"bundle of {entries:,} entries: export {results['export_entries_per_s']:,}/s, "
                f"verify {results['verify_entries_per_s']:,}/s "
                f"({report.bundles[0].checkpoints:,} checkpoint signatures, ok={report.ok}), "
                f"{results['bundle_bytes_per_entry']} bytes/entry"
            )
        engine.dispose()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def say(text: str) -> None:
    print(text, flush=True, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[0, 100_000, 1_000_000],
        help="log sizes at which to time appends (comma-separated)",
    )
    parser.add_argument("--window", type=int, default=20_000, help="appends timed per size")
    parser.add_argument("--batch", type=int, default=64, help="units per writer call")
    parser.add_argument("--inflight", type=int, default=4, help="writer calls in flight")
    parser.add_argument("--proofs", type=int, default=200, help="proofs timed of each kind")
    parser.add_argument("--verify", action="store_true", help="also export and verify a bundle")
    parser.add_argument("--keep", help="work in this directory and keep it")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    say(f"load average (1 min) before: {load:.2f}")
    results = run(args)
    results["load1_before"] = load
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
