"""`audit verify` on real traffic: two real nodes exchange clues, then their bundles are checked.

    python -m bench.audit_verify [--messages 500000] [--runs 3] [--workers 0,1,2]
                                 [--keep DIR | --reuse DIR] [--json]

1. Unless ``--reuse DIR`` names a directory an earlier run kept, creates a two-node federation
   (140400/ecology -> 140400/procuratorate, SQLite, witnessing every 10 s so checkpoints carry
   cosignatures), starts both as ``liandong serve`` processes and submits ``--messages`` clue
   transfers through the sender's admin API as bench.transfer does (2 KiB bodies), waits until
   every receipt is back, stops both nodes and exports each node's whole log as a bundle
   (node.audit.export, as ``liandong audit export`` does). Each clue makes two entries in the
   sender's log (sent, receipt received) and one in the receiver's, so 500,000 messages give a
   sender's bundle of about 1 M entries. At ~750 transfers/s here that takes ~12 minutes:
   keep the result with ``--keep``.
2. Times ``audit verify`` (node.audit.verify.verify_bundles, every signature checked: each
   envelope, each receipt, each receiver's proof and its checkpoint, each checkpoint and
   cosignature) on the sender's bundle alone with each of ``--workers`` processes, and on both
   bundles together with the default, ``--runs`` times each; reports the median entries/s and
   signatures/s.
3. Measures this machine's Ed25519 ceiling the same way the verifier checks (node.ed25519,
   libsodium, one process; OpenSSL's rate is printed beside it) and reports the verifier's
   signatures/s against it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.transfer import RECEIVER, SENDER, BenchNode, drain, set_log_level, submit_load
from node import ed25519
from node._pb.liandong.v1 import admin_pb2_grpc
from node.audit.checkpoint import log_origin
from node.audit.export import LogIdentity, export_bundle
from node.audit.verify import verify_bundles
from node.federation_setup import create_federation
from node.store.db import make_engine, session_factory

FEDERATION = "demo-federation"


def say(text: str) -> None:
    print(text, flush=True, file=sys.stderr)


async def generate(root: Path, messages: int) -> None:
    setups = create_federation(root, [SENDER, RECEIVER], witness_interval=10.0)
    for setup in setups:
        set_log_level(setup, "warning")
    nodes = [BenchNode(s) for s in setups]
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            await asyncio.to_thread(node.wait_serving)
        channel = grpc.aio.insecure_channel(f"unix:{nodes[0].setup.admin_socket}")
        stub = admin_pb2_grpc.LocalAdminStub(channel)
        accepted = 0
        began = time.monotonic()
        while accepted < messages:
            phase = await submit_load(stub, clients=64, seconds=20.0, payload=2048, batch=16)
            if phase.errors:
                raise SystemExit(f"submissions refused: {dict(phase.errors)}")
            accepted += len(phase.accepted)
            rate = accepted / (time.monotonic() - began)
            say(f"  {accepted:,} of {messages:,} submitted ({rate:,.0f}/s)")
        drained = await drain(stub, cap=3600)
        if drained.pending_left:
            raise SystemExit(f"{drained.pending_left} deliveries still pending")
        await channel.close()
    finally:
        for node in nodes:
            node.stop()
    for setup in setups:
        sessions = session_factory(make_engine(f"sqlite:///{setup.directory / 'node.db'}"))
        identity = LogIdentity(
            agency=setup.agency,
            origin=log_origin(FEDERATION, setup.agency),
            federation=FEDERATION,
            registry=(root / "operator" / "registry.json").read_bytes(),
            operator_key_pem=(root / "operator" / "operator.pub").read_bytes(),
        )
        summary = export_bundle(sessions, bundle_path(root, setup.agency), identity)
        say(
            f"  exported {setup.agency}: {summary.end_index:,} entries, "
            f"{summary.messages:,} messages, {summary.size_bytes / 2**20:,.0f} MiB"
        )


def bundle_path(root: Path, agency: str) -> Path:
    return root / f"{agency.replace('/', '_')}.bundle"


def ed25519_ceiling(seconds: float = 3.0, *, openssl: bool = False) -> float:
    """Verifications per second in one process: as the verifier makes them (node.ed25519,
    libsodium), or through cryptography's OpenSSL binding for comparison."""
    key = Ed25519PrivateKey.generate()
    message = b"x" * 300
    signature = key.sign(message)
    public = key.public_key()
    check = public.verify if openssl else partial(ed25519.verify, public)
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        for _ in range(500):
            check(signature, message)
        done += 500
    return done / (time.perf_counter() - began)


def time_verify(paths: list[Path], workers: int | None, runs: int) -> dict[str, Any]:
    rates, signature_rates = [], []
    entries = 0
    for _ in range(runs):
        began = time.perf_counter()
        report = verify_bundles(paths, workers=workers)
        seconds = time.perf_counter() - began
        if not report.ok:
            raise SystemExit(f"verify failed: {[str(p) for p in report.problems[:5]]}")
        entries = sum(b.end_index - b.first_index for b in report.bundles)
        signatures = sum(b.signatures for b in report.bundles)
        rates.append(entries / seconds)
        signature_rates.append(signatures / seconds)
    return {
        "bundles": [p.name for p in paths],
        "workers": "default" if workers is None else workers,
        "entries": entries,
        "signatures": signatures,
        "entries_per_s": round(statistics.median(rates)),
        "signatures_per_s": round(statistics.median(signature_rates)),
        "runs_entries_per_s": [round(r) for r in rates],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500_000, help="clue transfers to make")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each verify")
    parser.add_argument(
        "--workers",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[0, 1, 2],
        help="worker counts to time on the sender's bundle alone (comma-separated)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--keep", type=Path, help="generate into this directory and keep it")
    where.add_argument("--reuse", type=Path, help="verify the bundles an earlier --keep made")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    say(f"load average (1 min) before: {os.getloadavg()[0]:.2f}")
    root = args.reuse or args.keep or Path(tempfile.mkdtemp(prefix="ld-verify-"))
    try:
        if not args.reuse:
            root.mkdir(parents=True, exist_ok=True)
            say(f"generating {args.messages:,} clue transfers in {root} ...")
            asyncio.run(generate(root, args.messages))
        sender, receiver = bundle_path(root, SENDER), bundle_path(root, RECEIVER)
        results: dict[str, Any] = {"cores": os.cpu_count(), "timings": []}
        ceiling = ed25519_ceiling()
        results["ed25519_verify_per_s_one_process"] = round(ceiling)
        openssl = ed25519_ceiling(openssl=True)
        results["ed25519_verify_per_s_one_process_openssl"] = round(openssl)
        say(
            f"Ed25519 verifications/s in one process here: {ceiling:,.0f} "
            f"(libsodium, as the verifier checks; OpenSSL: {openssl:,.0f})"
        )
        for workers in args.workers:
            results["timings"].append(time_verify([sender], workers, args.runs))
        results["timings"].append(time_verify([sender, receiver], None, args.runs))
        for timing in results["timings"]:
            timing["signatures_per_s_vs_one_core"] = round(timing["signatures_per_s"] / ceiling, 2)
            say(
                f"  {'+'.join(timing['bundles'])}, workers {timing['workers']}: "
                f"{timing['entries']:,} entries, {timing['signatures']:,} signatures: "
                f"{timing['entries_per_s']:,} entries/s, {timing['signatures_per_s']:,} "
                f"signatures/s ({timing['signatures_per_s_vs_one_core']}x one core's ceiling); "
                f"runs {timing['runs_entries_per_s']}"
            )
        if args.json:
            print(json.dumps(results, indent=2))
    finally:
        if not (args.keep or args.reuse):
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
