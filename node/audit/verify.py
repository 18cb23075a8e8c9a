"""Offline verification of audit bundles (`liandong audit verify`): trust nothing but keys.

For each bundle: the registry's signature by the operator key it carries (whose key id is
reported, for the auditor to compare with the one published); every checkpoint's signature by
the agency's registered key; the tree recomputed from the entries against every checkpoint
(which also shows that each checkpoint extends the previous one); every message envelope's
signature by its sender's key valid at its creation time; every receipt's signature and what
it names. Across bundles: every message one agency sent another that the other's bundle
covers was received with the same envelope digest, at the log index the receipt names, under
the same receipt — and every message present on one side only is listed.

Problems are collected, not raised: the report says everything that is wrong, with the
entry index where there is one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from node._pb.liandong.v1 import envelope_pb2
from node.audit.bundle import Bundle, BundleError, read_bundle
from node.audit.checkpoint import open_checkpoint
from node.audit.merkle import Frontier, leaf_hash
from node.audit.note import (
    NoteError,
    Verifier,
    split_note,
    verify_cosignature_by_any,
)
from node.audit.proof import check_receipt_proof
from node.envelope import (
    MESSAGE_PAYLOAD_TYPE,
    RECEIPT_PAYLOAD_TYPE,
    EnvelopeError,
    verify_envelope,
)
from node.federation import Registry, RegistryError, verify_registry
from node.identity import key_id_for

Progress = Callable[[str, int, int], None]
MAX_LISTED = 50


@dataclass(frozen=True)
class Problem:
    bundle: str
    what: str
    index: int | None = None

    def __str__(self) -> str:
        where = f"entry {self.index}: " if self.index is not None else ""
        return f"{self.bundle}: {where}{self.what}"


@dataclass
class BundleReport:
    path: str
    agency: str
    origin: str
    first_index: int
    end_index: int
    operator_key_id: str = ""
    registry_serial: int = 0
    checkpoints: int = 0
    messages: int = 0
    signatures: int = 0
    cosigned_checkpoints: int = 0


@dataclass
class Report:
    bundles: list[BundleReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    one_sided: list[str] = field(default_factory=list)
    matched: int = 0  # messages seen sent by one bundle and received in another

    @property
    def ok(self) -> bool:
        return not self.problems and not self.one_sided

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "bundles": [vars(b) for b in self.bundles],
            "matched_across_bundles": self.matched,
            "problems": [
                {"bundle": p.bundle, "index": p.index, "problem": p.what} for p in self.problems
            ],
            "one_sided": self.one_sided,
        }


@dataclass
class _Sent:
    bundle: str
    digest: str
    receipt: bytes
    receiver_index: int


@dataclass
class _Received:
    bundle: str
    digest: str
    receipt: bytes
    index: int


@dataclass
class _Ledger:
    """What each bundle says was sent and received, for the cross-check."""

    sent: dict[tuple[str, str], _Sent] = field(default_factory=dict)  # (message, recipient)
    received: dict[tuple[str, str], _Received] = field(default_factory=dict)  # (message, agency)
    covered: dict[str, tuple[int, int]] = field(default_factory=dict)  # agency -> index range
    received_entries: dict[str, dict[int, str]] = field(default_factory=dict)  # agency -> idx


def verify_bundles(
    paths: Iterable[Path], progress: Progress = lambda _what, _done, _total: None
) -> Report:
    report = Report()
    ledger = _Ledger()
    for path in paths:
        try:
            bundle = read_bundle(path)
        except BundleError as error:
            report.problems.append(Problem(str(path), str(error)))
            continue
        try:
            _verify_one(bundle, report, ledger, progress)
        finally:
            bundle.close()
    _cross_check(report, ledger)
    return report


def _verify_one(bundle: Bundle, report: Report, ledger: _Ledger, progress: Progress) -> None:
    name = str(bundle.path)
    manifest = bundle.manifest
    summary = BundleReport(
        name, manifest.agency, manifest.origin, manifest.first_index, manifest.end_index
    )
    report.bundles.append(summary)

    def problem(what: str, index: int | None) -> None:
        report.problems.append(Problem(name, what, index))

    try:
        operator = load_pem_public_key(bundle.operator_key_pem)
        if not isinstance(operator, Ed25519PublicKey):
            raise ValueError("not an Ed25519 key")
        summary.operator_key_id = key_id_for(operator.public_bytes_raw())
        registry = verify_registry(bundle.registry, operator, now=None, source="registry.json")
    except (ValueError, RegistryError) as error:
        problem(f"the registry cannot be trusted: {error}", None)
        return
    summary.registry_serial = registry.serial
    member = registry.member(manifest.agency)
    if member is None:
        problem(f"'{manifest.agency}' is not a member of the bundled registry", None)
        return
    verifiers = registry.log_verifiers(manifest.agency)
    checkpoints = _verified_checkpoints(bundle, verifiers, problem)
    summary.checkpoints = len(checkpoints)
    summary.signatures += len(bundle.checkpoints)
    cosigned = _check_cosignatures(bundle, registry, problem)
    summary.cosigned_checkpoints = len(cosigned)
    summary.signatures += sum(cosigned.values())
    received = _check_entries(bundle, checkpoints, problem, progress)
    ledger.covered[manifest.agency] = (manifest.first_index, manifest.end_index)
    ledger.received_entries[manifest.agency] = received
    for message in bundle.messages:
        summary.messages += 1
        summary.signatures += _check_message(bundle, registry, message, ledger, problem)


def _verified_checkpoints(
    bundle: Bundle, verifiers: list[Verifier], problem: Callable[[str, int | None], None]
) -> dict[int, bytes]:
    roots: dict[int, bytes] = {}
    for size, signed in bundle.checkpoints:
        try:
            checkpoint = open_checkpoint(signed, verifiers)
        except NoteError as error:
            problem(f"checkpoint of size {size}: {error}", max(size - 1, 0))
            continue
        if checkpoint.size != size or checkpoint.origin != bundle.manifest.origin:
            problem(
                f"checkpoint listed as size {size} is for {checkpoint.origin} size "
                f"{checkpoint.size}",
                max(size - 1, 0),
            )
            continue
        roots[size] = checkpoint.root
    return roots


def _check_cosignatures(
    bundle: Bundle, registry: Registry, problem: Callable[[str, int | None], None]
) -> dict[int, int]:
    """Check every witness line a checkpoint carries; return checkpoint size -> good ones."""
    witnesses = {
        registry.log_origin(m.agency_id): registry.cosigner_verifiers(m.agency_id)
        for m in registry.members
        if m.agency_id != bundle.manifest.agency
    }
    good: dict[int, int] = {}
    for size, signed in bundle.checkpoints:
        try:
            body, signatures = split_note(signed)
        except NoteError:
            continue  # already reported with the checkpoint's own signature
        for signature in signatures:
            if signature.name == bundle.manifest.origin:
                continue
            verifiers = witnesses.get(signature.name)
            if verifiers is None:
                problem(
                    f"checkpoint of size {size}: cosigned by '{signature.name}', which is "
                    "not a member of the registry",
                    max(size - 1, 0),
                )
                continue
            try:
                verify_cosignature_by_any(body, signature, verifiers)
                good[size] = good.get(size, 0) + 1
            except NoteError as error:
                problem(f"checkpoint of size {size}: {error}", max(size - 1, 0))
    return good


def _check_entries(
    bundle: Bundle,
    roots: dict[int, bytes],
    problem: Callable[[str, int | None], None],
    progress: Progress,
) -> dict[int, str]:
    """Recompute the tree; return the envelope digest of each "received" entry by index."""
    manifest = bundle.manifest
    received: dict[int, str] = {}
    try:
        frontier = Frontier(manifest.first_index, manifest.start_frontier)
    except ValueError as error:
        problem(f"manifest start_frontier: {error}", manifest.first_index)
        return received
    if manifest.first_index and roots.get(manifest.first_index) not in (None, frontier.root()):
        problem(
            "the tree before the first entry does not match the checkpoint there",
            manifest.first_index,
        )
    previous = manifest.first_index
    total = manifest.end_index - manifest.first_index
    for index, entry in bundle.entries():
        frontier.append(leaf_hash(entry))
        try:
            fields = json.loads(entry)
        except ValueError:  # not JSON, or not UTF-8
            fields = None
        if not isinstance(fields, dict):
            problem("is not a JSON object", index)
            fields = {}
        if fields.get("event") == "received":
            received[index] = str(fields.get("envelope_sha256", ""))
        root = roots.get(frontier.size)
        if root is not None:
            if root != frontier.root():
                what = (
                    f"does not match the signed checkpoint of size {frontier.size}"
                    if frontier.size - previous == 1
                    else f"entries {previous} to {frontier.size - 1} do not match the signed "
                    f"checkpoint of size {frontier.size}; the first bad index is among them"
                )
                problem(what, previous)
            previous = frontier.size
        if index % 10000 == 0:
            progress(f"{manifest.agency} entries", index - manifest.first_index, total)
    progress(f"{manifest.agency} entries", frontier.size - manifest.first_index, total)
    if frontier.size != manifest.end_index:
        problem(
            f"the bundle holds entries up to {frontier.size - 1}, its manifest says up to "
            f"{manifest.end_index - 1}",
            frontier.size,
        )
    missing = [size for size in roots if size > frontier.size]
    if missing:
        problem(f"checkpoints of sizes {missing[:5]} lie beyond the entries in the bundle", None)
    return received


def _check_message(
    bundle: Bundle,
    registry: Registry,
    message: Any,
    ledger: _Ledger,
    problem: Callable[[str, int | None], None],
) -> int:
    """Check one message's envelope and receipts; record it for the cross-check."""
    agency = bundle.manifest.agency
    label = f"message {message.message_id}"
    checked = 0
    try:
        envelope = envelope_pb2.Envelope.FromString(message.envelope)
        body = envelope_pb2.Message.FromString(envelope.payload)
    except Exception:  # protobuf raises DecodeError and others: any failure is a finding
        problem(f"{label}: the envelope is not a liandong.v1.Envelope", None)
        return 0
    digest = _digest(message.envelope)
    try:
        key_id = verify_envelope(envelope, MESSAGE_PAYLOAD_TYPE, registry.public_keys(body.sender))
        checked += 1
        created = datetime.fromtimestamp(body.created_at.seconds, UTC)
        if not registry.key_valid_at(body.sender, key_id, created):
            problem(f"{label}: signed with a key of {body.sender} not valid at {created}", None)
    except EnvelopeError as error:
        problem(f"{label}: envelope signature: {error}", None)
    for signer, raw in message.receipts.items():
        try:
            receipt_envelope = envelope_pb2.Envelope.FromString(raw)
            verify_envelope(receipt_envelope, RECEIPT_PAYLOAD_TYPE, registry.public_keys(signer))
            checked += 1
            receipt = envelope_pb2.Receipt.FromString(receipt_envelope.payload)
        except EnvelopeError as error:
            problem(f"{label}: receipt from {signer}: {error}", None)
            continue
        except Exception:
            problem(f"{label}: receipt from {signer} is malformed", None)
            continue
        if receipt.envelope_sha256.hex() != digest or receipt.message_id != message.message_id:
            problem(f"{label}: the receipt from {signer} names another envelope", None)
            continue
        if message.direction == "out":
            ledger.sent[(message.message_id, signer)] = _Sent(
                str(bundle.path), digest, raw, receipt.log_index
            )
            proof_text = message.proofs.get(signer)
            if proof_text:
                checked += 1
                _check_receiver_proof(
                    registry,
                    signer,
                    proof_text,
                    receipt.log_index,
                    message.message_id,
                    digest,
                    label,
                    problem,
                )
        else:
            ledger.received[(message.message_id, agency)] = _Received(
                str(bundle.path), digest, raw, receipt.log_index
            )
    return checked


def _check_receiver_proof(
    registry: Registry,
    recipient: str,
    proof_text: bytes,
    log_index: int,
    message_id: str,
    digest: str,
    label: str,
    problem: Callable[[str, int | None], None],
) -> None:
    """The recipient's tlog-proof the sender kept: alone, it shows the recipient logged it."""
    try:
        check_receipt_proof(
            proof_text,
            registry.log_verifiers(recipient),
            log_index=log_index,
            message_id=message_id,
            envelope_sha256=digest,
        )
    except NoteError as error:
        problem(f"{label}: {recipient}'s proof of receipt: {error}", None)


def _cross_check(report: Report, ledger: _Ledger) -> None:
    for (message_id, recipient), sent in ledger.sent.items():
        if recipient not in ledger.covered:
            continue  # no bundle of the recipient: nothing to compare with
        first, end = ledger.covered[recipient]
        if not first <= sent.receiver_index < end:
            continue  # the recipient's bundle covers another period
        received = ledger.received.get((message_id, recipient))
        if received is None:
            report.one_sided.append(
                f"message {message_id}: {sent.bundle} holds {recipient}'s receipt (its entry "
                f"{sent.receiver_index}) but {recipient}'s bundle has no such message"
            )
            continue
        entry_digest = ledger.received_entries.get(recipient, {}).get(sent.receiver_index)
        if received.digest != sent.digest or entry_digest != sent.digest:
            report.problems.append(
                Problem(
                    received.bundle,
                    f"message {message_id}: received with another envelope digest than "
                    f"{sent.bundle} sent",
                    sent.receiver_index,
                )
            )
        elif received.receipt != sent.receipt:
            report.problems.append(
                Problem(
                    received.bundle,
                    f"message {message_id}: its receipt differs from the one the sender holds",
                    received.index,
                )
            )
        else:
            report.matched += 1
    for (message_id, agency), received in ledger.received.items():
        envelope_sender = _sender_of(received)
        if envelope_sender not in ledger.covered:
            continue
        if (message_id, agency) not in ledger.sent:
            first, end = ledger.covered[envelope_sender]
            report.one_sided.append(
                f"message {message_id}: {received.bundle} received it (entry {received.index}) "
                f"but {envelope_sender}'s bundle (entries {first}..{end - 1}) does not hold "
                "its receipt"
            )


def _sender_of(received: _Received) -> str:
    receipt = envelope_pb2.Envelope.FromString(received.receipt)
    return envelope_pb2.Receipt.FromString(receipt.payload).sender


def _digest(serialized: bytes) -> str:
    import hashlib

    return hashlib.sha256(serialized).hexdigest()


def render_report(report: Report) -> str:
    lines = []
    for b in report.bundles:
        lines.append(
            f"{b.path}: {b.agency} ({b.origin}), entries {b.first_index}..{b.end_index - 1}, "
            f"{b.checkpoints} checkpoints ({b.cosigned_checkpoints} cosigned by witnesses), "
            f"{b.messages} messages, {b.signatures} signatures checked; registry serial "
            f"{b.registry_serial} signed by operator key "
            f"{b.operator_key_id}"
        )
    if len(report.bundles) > 1:
        lines.append(f"messages matched across bundles: {report.matched}")
    for problem in report.problems[:MAX_LISTED]:
        lines.append(f"FAIL {problem}")
    if len(report.problems) > MAX_LISTED:
        lines.append(f"... and {len(report.problems) - MAX_LISTED} more problems (--json: all)")
    for item in report.one_sided[:MAX_LISTED]:
        lines.append(f"ONE-SIDED {item}")
    if len(report.one_sided) > MAX_LISTED:
        lines.append(f"... and {len(report.one_sided) - MAX_LISTED} more (--json: all)")
    verdict = "OK"
    if not report.ok:
        verdict = f"FAILED: {len(report.problems)} problem(s), "
        verdict += f"{len(report.one_sided)} one-sided message(s)"
    lines.append(verdict)
    return "\n".join(lines)
