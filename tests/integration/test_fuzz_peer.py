"""The peer port, fuzzed (issue 13, item 5): a short fixed-seed run per database.

tests/fuzzing.py drives a real node as a hostile member (the police, with its real
certificate and signing key): raw bytes, random and mutated protobuf requests and correctly
signed hostile messages on every RPC of Exchange, Audit and Health, and streams mixing
valid, malformed and undecodable items; now and then a call that never sends its request,
a stream that goes idle, and more calls and streams at once than the member's share. The
run fails on any UNKNOWN or INTERNAL status, traceback or "internal error" in the node's
log, hang, refusal without its audit entry, Deliver batch without exactly one answer, bad
receipt, oversized audit entry, failed health check, or legitimate message refused.

The long run of the same harness is `python -m bench.fuzz` (bench/README.md).
"""

from __future__ import annotations

from collections.abc import Callable

from node.federation_setup import NodeProcess
from tests.fuzzing import FUZZ_LIMITS, RECEIVER, RPCS, SPECIALS, run_fuzz

SEED = 13
EXAMPLES = 180  # ten per RPC
SPECIAL_EVERY = 45  # each special case once


def test_fuzzing_the_peer_port_finds_nothing(
    make_federation: Callable[..., dict[str, NodeProcess]], backend: str
) -> None:
    nodes = make_federation(backend=backend, extra_config=FUZZ_LIMITS)
    node = nodes[RECEIVER].start()
    setups = {agency: n.setup for agency, n in nodes.items()}

    report = run_fuzz(
        node,
        setups,
        examples=EXAMPLES,
        seed=SEED,
        backend=backend,
        special_every=SPECIAL_EVERY,
    )
    print(report.text(samples=True))

    # The run did what it says: every RPC called, every special case made, messages
    # accepted (the structured cases reached the storage), refusals made, batches sent,
    # health checked ...
    assert {rpc.label for rpc in RPCS} <= set(report.counts)
    assert set(SPECIALS) <= set(report.layers)
    assert report.totals["OK"] > 0 and sum(report.refusals.values()) > 0
    accepted = report.counts["Exchange.Deliver (items)"]["OK"] + sum(
        report.counts[f"Exchange.{name}"]["OK"] for name in ("TransferClue", "SendNotice", "Reply")
    )
    assert accepted > 0
    assert report.deliver_batches > 0 and report.health_checks > 0
    # ... and nothing broke.
    assert not report.violations, report.text()
