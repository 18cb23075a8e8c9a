"""Offline verification of audit bundles (`liandong audit verify`): trust nothing but keys.

For each bundle: the registry's signature by the operator key it carries (whose key id is
reported, for the auditor to compare with the one published); every checkpoint's signature by
the agency's registered key, and every witness's cosignature on it; the tree recomputed from
the entries against every checkpoint (which also shows that each checkpoint extends the
previous one); every message envelope's signature by its sender's key valid at its creation
time; every receipt's signature, by a key valid at its received_at, and what it names (the
envelope, the sender: for a sent message this agency, the receiver: its signer); every
receiver's proof that it logged a message, at the index its receipt names. Across bundles:
every message one agency sent another that the other's bundle covers was received with the
same envelope digest, at the log index the receipt names, under the same receipt — and every
message present on one side only is listed.

Signatures dominate the cost, so they are checked in worker processes (one per core) while
this process recomputes the tree. A signed blob that two bundles share (the envelope and the
receipt of a message, held by its sender and its receiver) is checked once, under the first
bundle that carries it, for the same registry.

Problems are collected, not raised: the report says everything that is wrong, with the
entry index where there is one.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from node._pb.liandong.v1 import envelope_pb2
from node.audit.bundle import (
    Bundle,
    BundledMessage,
    BundleError,
    parse_message_line,
    read_bundle,
)
from node.audit.checkpoint import open_checkpoint
from node.audit.merkle import Frontier, leaf_hash
from node.audit.note import NoteError, Verifier, split_note, verify_cosignature_by_any
from node.audit.proof import OpenedCheckpoints, check_receipt_proof
from node.envelope import (
    MESSAGE_PAYLOAD_TYPE,
    RECEIPT_PAYLOAD_TYPE,
    EnvelopeError,
    verify_envelope,
)
from node.exchange.messages import time_of
from node.federation import Registry, RegistryError, verify_registry
from node.identity import key_id_for

Progress = Callable[[str, int, int], None]
MAX_LISTED = 50
# Bundles smaller than this are checked in this process: starting workers costs more.
POOL_THRESHOLD_BYTES = 4 << 20
MESSAGES_PER_TASK = 400
CHECKPOINTS_PER_TASK = 400
TASKS_IN_FLIGHT_PER_WORKER = 4
# Entries are canonical JSON (node.audit.log): a "received" one holds exactly this.
RECEIVED_MARK = b'"event":"received"'
# Allocations between collections of the youngest generation (CPython's default: 700).
GC_THRESHOLD = 100_000


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
    registries: int = 1  # the current one and the earlier ones the bundle carries
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


class _Sent(NamedTuple):  # one per message: a tuple is made and pickled faster
    bundle: str
    digest: str
    receipt_sha256: bytes
    receiver_index: int


class _Received(NamedTuple):
    bundle: str
    digest: str
    receipt_sha256: bytes
    entry_index: int
    sender: str


@dataclass
class _Ledger:
    """What each bundle says was sent and received, for the cross-check."""

    sent: dict[tuple[str, str], _Sent] = field(default_factory=dict)  # (message, recipient)
    received: dict[tuple[str, str], _Received] = field(default_factory=dict)  # (message, agency)
    covered: dict[str, tuple[int, int]] = field(default_factory=dict)  # agency -> index range
    received_entries: dict[str, dict[int, str]] = field(default_factory=dict)  # agency -> idx


# -- the work done in worker processes ------------------------------------------------------


@dataclass(frozen=True)
class _Trust:
    """What a worker needs to check one bundle's signatures (picklable, keys as bytes)."""

    registry: bytes
    operator_key_pem: bytes
    agency: str
    origin: str
    earlier_registries: tuple[bytes, ...] = ()
    registry_key: bytes = b""  # names these registries in the keys of checked blobs
    remember_blobs: bool = True  # False for the last bundle: no later one can skip them


@dataclass(frozen=True)
class _ToCheck:
    message: BundledMessage
    check_envelope: bool  # False: another bundle carries the same envelope, checked there
    check_receipts: frozenset[str]  # signers whose receipt is not checked elsewhere


@dataclass
class _Checked:
    problems: list[tuple[str, int | None]] = field(default_factory=list)
    signatures: int = 0
    messages: int = 0
    sent: list[tuple[tuple[str, str], _Sent]] = field(default_factory=list)
    received: list[tuple[tuple[str, str], _Received]] = field(default_factory=list)
    checked_blobs: list[bytes] = field(default_factory=list)  # see blob_key
    roots: dict[int, bytes] = field(default_factory=dict)  # checkpoint size -> signed root
    cosigned: dict[int, int] = field(default_factory=dict)  # checkpoint size -> good cosigs


class KeyHistory:
    """The members' keys as the bundle's registries list them: the current one, and every
    earlier one the node ran on (a key a later registry dropped still verifies what was
    signed with it while it was valid)."""

    def __init__(self, current: Registry, earlier: Sequence[Registry] = ()) -> None:
        self.current = current
        self.all = [current, *earlier]
        self.members = current.members
        # Asked for every envelope, receipt and proof: merged once per agency.
        self._public_keys: dict[str, dict[str, Ed25519PublicKey]] = {}
        self._log_verifiers: dict[str, list[Verifier]] = {}
        self._opened: dict[str, OpenedCheckpoints] = {}

    def log_origin(self, agency_id: str) -> str:
        return self.current.log_origin(agency_id)

    def public_keys(self, agency_id: str) -> Mapping[str, Ed25519PublicKey]:
        merged = self._public_keys.get(agency_id)
        if merged is None:
            merged = {}
            for registry in reversed(self.all):  # the current registry's entry wins
                merged.update(registry.public_keys(agency_id))
            if merged:  # a member: a bundle's made-up senders are not remembered
                self._public_keys[agency_id] = merged
        return merged

    def key_valid_at(self, agency_id: str, key_id: str, when: datetime) -> bool:
        return any(r.key_valid_at(agency_id, key_id, when) for r in self.all)

    def log_verifiers(self, agency_id: str) -> list[Verifier]:
        verifiers = self._log_verifiers.get(agency_id)
        if verifiers is None:
            verifiers = _unique([v for r in self.all for v in r.log_verifiers(agency_id)])
            self._log_verifiers[agency_id] = verifiers
        return verifiers

    def opened_checkpoints(self, agency_id: str) -> OpenedCheckpoints:
        """``agency_id``'s checkpoints already checked against its keys in these registries
        (by note): a batch of receipts shares one, checked once. Per agency and registries,
        so a note one agency signed never passes as another's."""
        opened = self._opened.get(agency_id)
        if opened is None:
            opened = self._opened[agency_id] = OpenedCheckpoints()
        return opened

    def cosigner_verifiers(self, agency_id: str) -> list[Verifier]:
        return _unique([v for r in self.all for v in r.cosigner_verifiers(agency_id)])


def _unique(verifiers: list[Verifier]) -> list[Verifier]:
    return list({(v.key_id, v.public_key): v for v in verifiers}.values())


def trusted_registries(
    current: bytes, earlier: Sequence[bytes], operator: Ed25519PublicKey
) -> KeyHistory:
    """RegistryError or ValueError naming the registry that cannot be trusted."""
    registry = verify_registry(current, operator, now=None, source="registry.json")
    older = []
    for number, data in enumerate(earlier, start=1):
        old = verify_registry(data, operator, now=None, source=f"registries/{number}.json")
        if old.federation != registry.federation:
            raise ValueError(f"registries/{number}.json is of federation '{old.federation}'")
        older.append(old)
    return KeyHistory(registry, older)


_registries: dict[bytes, KeyHistory] = {}  # per process: each registry parsed once


def _registry(trust: _Trust) -> KeyHistory:
    key = hashlib.sha256(
        b"\0".join([trust.registry, trust.operator_key_pem, *trust.earlier_registries])
    ).digest()
    registry = _registries.get(key)
    if registry is None:
        operator = load_pem_public_key(trust.operator_key_pem)
        assert isinstance(operator, Ed25519PublicKey)  # checked before any work is sent
        registry = trusted_registries(trust.registry, trust.earlier_registries, operator)
        _registries[key] = registry
    return registry


def _check_checkpoints(trust: _Trust, items: list[tuple[int, bytes]]) -> _Checked:
    """Each checkpoint's own signature and its witnesses' cosignatures."""
    registry = _registry(trust)
    verifiers = registry.log_verifiers(trust.agency)
    witnesses = {
        registry.log_origin(m.agency_id): registry.cosigner_verifiers(m.agency_id)
        for m in registry.members
        if m.agency_id != trust.agency
    }
    checked = _Checked()
    for size, signed in items:
        where = max(size - 1, 0)
        try:
            checkpoint = open_checkpoint(signed, verifiers)
        except NoteError as error:
            checked.problems.append((f"checkpoint of size {size}: {error}", where))
            continue
        checked.signatures += 1
        if checkpoint.size != size or checkpoint.origin != trust.origin:
            checked.problems.append(
                (
                    f"checkpoint listed as size {size} is for {checkpoint.origin} size "
                    f"{checkpoint.size}",
                    where,
                )
            )
            continue
        checked.roots[size] = checkpoint.root
        body, signatures = split_note(signed)
        for signature in signatures:
            if signature.name == trust.origin:
                continue
            witness = witnesses.get(signature.name)
            if witness is None:
                checked.problems.append(
                    (
                        f"checkpoint of size {size}: cosigned by '{signature.name}', which is "
                        "not a member of the registry",
                        where,
                    )
                )
                continue
            try:
                verify_cosignature_by_any(body, signature, witness)
            except NoteError as error:
                checked.problems.append((f"checkpoint of size {size}: {error}", where))
                continue
            checked.cosigned[size] = checked.cosigned.get(size, 0) + 1
            checked.signatures += 1
    return checked


def _check_message_lines(
    trust: _Trust, bundle_name: str, lines: list[tuple[int, bytes]]
) -> _Checked:
    """The first bundle's messages, parsed here rather than in the reading process (which is
    busy with the tree); every signature is checked, and the blobs named for later bundles."""
    items = []
    problems = []
    path = Path(bundle_name)
    for number, line in lines:
        try:
            message = parse_message_line(path, number, line)
        except BundleError as error:
            problems.append((str(error), None))
            continue
        items.append(_ToCheck(message, True, frozenset(message.receipts)))
    checked = _check_messages(trust, bundle_name, items)
    checked.problems.extend(problems)
    if trust.remember_blobs:
        for item in items:
            envelope, receipts = blob_keys(trust.registry_key, item.message)
            checked.checked_blobs.append(envelope)
            checked.checked_blobs.extend(receipts.values())
    return checked


def blob_key(registry_key: bytes, blob: bytes, signer: str | None = None) -> bytes:
    """What a signed blob checked under some registries is remembered by: an envelope
    (``signer`` None; it names its signer inside) or a receipt listed under ``signer``. The
    same bytes listed under another signer, or as the other kind, are checked again."""
    role = b"envelope" if signer is None else b"receipt " + signer.encode()
    return hashlib.sha256(registry_key + hashlib.sha256(role).digest() + blob).digest()


def blob_keys(registry_key: bytes, message: BundledMessage) -> tuple[bytes, dict[str, bytes]]:
    """The keys of a message's envelope and of its receipts, by signer."""
    return blob_key(registry_key, message.envelope), {
        signer: blob_key(registry_key, raw, signer) for signer, raw in message.receipts.items()
    }


def _check_messages(trust: _Trust, bundle_name: str, items: list[_ToCheck]) -> _Checked:
    registry = _registry(trust)
    checked = _Checked()
    for item in items:
        checked.messages += 1
        _check_message(registry, trust.agency, bundle_name, item, checked)
    return checked


def _check_message(
    registry: KeyHistory, agency: str, bundle_name: str, item: _ToCheck, checked: _Checked
) -> None:
    """One message's envelope and receipts; what it says is recorded for the cross-check."""
    message = item.message
    label = f"message {message.message_id}"
    try:
        envelope = envelope_pb2.Envelope.FromString(message.envelope)
        body = envelope_pb2.Message.FromString(envelope.payload)
    except Exception:  # protobuf raises DecodeError and others: any failure is a finding
        checked.problems.append((f"{label}: the envelope is not a liandong.v1.Envelope", None))
        return
    digest = hashlib.sha256(message.envelope).hexdigest()
    if item.check_envelope:
        try:
            key_id = verify_envelope(
                envelope, MESSAGE_PAYLOAD_TYPE, registry.public_keys(body.sender)
            )
            checked.signatures += 1
            created = datetime.fromtimestamp(body.created_at.seconds, UTC)
            if not registry.key_valid_at(body.sender, key_id, created):
                checked.problems.append(
                    (f"{label}: signed with a key of {body.sender} not valid at {created}", None)
                )
        except EnvelopeError as error:
            checked.problems.append((f"{label}: envelope signature: {error}", None))
    # A sent message's receipts name this agency as sender; a received one's, the envelope's.
    sender = agency if message.direction == "out" else body.sender
    for signer, raw in message.receipts.items():
        try:
            receipt_envelope = envelope_pb2.Envelope.FromString(raw)
            signed_by = None  # None: the signature is checked under another bundle, with the time
            if signer in item.check_receipts:
                signed_by = verify_envelope(
                    receipt_envelope, RECEIPT_PAYLOAD_TYPE, registry.public_keys(signer)
                )
                checked.signatures += 1
            receipt = envelope_pb2.Receipt.FromString(receipt_envelope.payload)
        except EnvelopeError as error:
            checked.problems.append((f"{label}: receipt from {signer}: {error}", None))
            continue
        except Exception:
            checked.problems.append((f"{label}: receipt from {signer} is malformed", None))
            continue
        if receipt.envelope_sha256.hex() != digest or receipt.message_id != message.message_id:
            checked.problems.append(
                (f"{label}: the receipt from {signer} names another envelope", None)
            )
            continue
        wrong = _receipt_problem(registry, receipt, signer, sender, signed_by)
        if wrong:
            checked.problems.append((f"{label}: the receipt from {signer} {wrong}", None))
        receipt_sha256 = hashlib.sha256(raw).digest()
        if message.direction == "out":
            checked.sent.append(
                (
                    (message.message_id, signer),
                    _Sent(bundle_name, digest, receipt_sha256, receipt.log_index),
                )
            )
            proof_text = message.proofs.get(signer)
            if proof_text:
                opened = registry.opened_checkpoints(signer)
                opened_before = len(opened)
                try:
                    # The receiver's tlog-proof the sender kept: alone, it shows the
                    # receiver logged the message. Its checkpoint is shared by a batch.
                    check_receipt_proof(
                        proof_text,
                        registry.log_verifiers(signer),
                        log_index=receipt.log_index,
                        message_id=message.message_id,
                        envelope_sha256=digest,
                        opened=opened,
                    )
                    # Its checkpoint's signature, when not already checked for another.
                    checked.signatures += len(opened) - opened_before
                except NoteError as error:
                    checked.problems.append(
                        (f"{label}: {signer}'s proof of receipt: {error}", None)
                    )
        else:
            checked.received.append(
                (
                    (message.message_id, agency),
                    _Received(bundle_name, digest, receipt_sha256, receipt.log_index, sender),
                )
            )
    if message.direction == "out" and len(message.proofs) > len(message.receipts):
        for signer in sorted(message.proofs.keys() - message.receipts.keys()):
            checked.problems.append(
                (f"{label}: a proof of receipt from {signer}, no receipt", None)
            )


def _receipt_problem(
    registry: KeyHistory,
    receipt: envelope_pb2.Receipt,
    signer: str,
    sender: str,
    key_id: str | None,
) -> str:
    """What is wrong with a receipt that names the right envelope (protocol.md section 6.1):
    it names another sender or receiver, or it has no time at which the key that signed it
    (`key_id`; None: checked under another bundle) was valid. "" when nothing is."""
    if receipt.sender != sender:
        return f"names sender '{receipt.sender}', not {sender}"
    if receipt.receiver != signer:
        return f"names receiver '{receipt.receiver}'"
    if key_id is None:
        return ""
    stamp = receipt.received_at
    if not receipt.HasField("received_at"):
        return "has no received_at"
    received = time_of(stamp)
    if received is None:
        return f"has received_at {stamp.seconds} s {stamp.nanos} ns, no valid time"
    if not registry.key_valid_at(signer, key_id, received):
        return f"is signed with a key of {signer} not valid at its received_at {received}"
    return ""


# -- this process: reading bundles, the tree, the cross-check -------------------------------


class _InlineExecutor(Executor):
    """Runs each task at once in this process: for small bundles, and for tests."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:
            future.set_exception(error)
        return future


def _collect_less_often() -> None:
    """A verifier allocates almost nothing cyclic (bytes, tuples, protobuf messages, freed
    by reference counting), yet the cyclic collector runs every 700 allocations: a few per
    cent of the time on a large bundle, more as the ledger of messages grows."""
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


@contextmanager
def _fewer_collections() -> Iterator[None]:
    """`_collect_less_often` in this process, while the bundles are checked."""
    before = gc.get_threshold()
    _collect_less_often()
    try:
        yield
    finally:
        gc.set_threshold(*before)


def verify_bundles(
    paths: Iterable[Path],
    progress: Progress = lambda _what, _done, _total: None,
    *,
    workers: int | None = None,
) -> Report:
    """Check each bundle and then all of them against each other.

    `workers`: processes checking signatures; default one per core, or none (this process)
    when the bundles are small; 0 means none.
    """
    paths = list(paths)
    if workers is None:
        small = sum(p.stat().st_size for p in paths if p.is_file()) < POOL_THRESHOLD_BYTES
        workers = 0 if small else os.cpu_count() or 1
    executor: Executor
    if workers > 0:
        # spawn, not fork: the caller may hold threads (gRPC) that fork would copy mid-step.
        executor = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_collect_less_often,
        )
    else:
        executor = _InlineExecutor()
    report = Report()
    ledger = _Ledger()
    checked_blobs: set[bytes] = set()
    with executor, _fewer_collections():
        for position, path in enumerate(paths):
            try:
                bundle = read_bundle(path)
            except BundleError as error:
                report.problems.append(Problem(str(path), str(error)))
                continue
            try:
                check = _BundleCheck(
                    bundle, report, ledger, executor, max(workers, 1), checked_blobs, progress
                )
                check.remember_blobs = position < len(paths) - 1
                check.run()
            finally:
                bundle.close()
    _cross_check(report, ledger)
    return report


class _BundleCheck:
    def __init__(
        self,
        bundle: Bundle,
        report: Report,
        ledger: _Ledger,
        executor: Executor,
        workers: int,
        checked_blobs: set[bytes],
        progress: Progress,
    ) -> None:
        self.bundle = bundle
        self.name = str(bundle.path)
        self.report = report
        self.ledger = ledger
        self.executor = executor
        self.limit = workers * TASKS_IN_FLIGHT_PER_WORKER
        self.checked_blobs = checked_blobs
        self.progress = progress
        manifest = bundle.manifest
        self.summary = BundleReport(
            self.name, manifest.agency, manifest.origin, manifest.first_index, manifest.end_index
        )
        report.bundles.append(self.summary)
        self.in_flight: set[Future[_Checked]] = set()
        self.roots: dict[int, bytes] = {}
        self.cosigned: dict[int, int] = {}
        self.remember_blobs = True

    def problem(self, what: str, index: int | None) -> None:
        self.report.problems.append(Problem(self.name, what, index))

    def run(self) -> None:
        manifest = self.bundle.manifest
        trust = self._trust()
        if trust is None:
            return
        sizes = [size for size, _note in self.bundle.checkpoints]
        for start in range(0, len(sizes), CHECKPOINTS_PER_TASK):
            chunk = self.bundle.checkpoints[start : start + CHECKPOINTS_PER_TASK]
            self._submit(self.executor.submit(_check_checkpoints, trust, chunk))
        messages = self._message_tasks(trust)
        computed, received = self._recompute_tree(set(sizes), lambda: self._pump(messages))
        for task in messages:  # what the tree left over
            self._submit(task)
        self._collect(wait_all=True)
        self._compare_roots(computed)
        self.summary.checkpoints = len(self.roots)
        self.summary.cosigned_checkpoints = len(self.cosigned)
        self.ledger.covered[manifest.agency] = (manifest.first_index, manifest.end_index)
        self.ledger.received_entries[manifest.agency] = received

    def _trust(self) -> _Trust | None:
        manifest = self.bundle.manifest
        try:
            operator = load_pem_public_key(self.bundle.operator_key_pem)
            if not isinstance(operator, Ed25519PublicKey):
                raise ValueError("not an Ed25519 key")
            self.summary.operator_key_id = key_id_for(operator.public_bytes_raw())
            history = trusted_registries(
                self.bundle.registry, self.bundle.earlier_registries, operator
            )
        except (ValueError, RegistryError) as error:
            self.problem(f"the registry cannot be trusted: {error}", None)
            return None
        registry = history.current
        self.summary.registry_serial = registry.serial
        self.summary.registries = len(history.all)
        if registry.member(manifest.agency) is None:
            self.problem(f"'{manifest.agency}' is not a member of the bundled registry", None)
            return None
        self.registry_key = hashlib.sha256(
            b"\0".join([self.bundle.registry, *self.bundle.earlier_registries])
        ).digest()
        return _Trust(
            self.bundle.registry,
            self.bundle.operator_key_pem,
            manifest.agency,
            manifest.origin,
            tuple(self.bundle.earlier_registries),
            self.registry_key,
            self.remember_blobs,
        )

    def _message_tasks(self, trust: _Trust) -> Iterator[Future[_Checked]]:
        """Submit the messages in chunks, lazily: the caller decides when to take the next.
        With nothing to skip, the workers parse the lines themselves; else they are parsed
        here, to skip the blobs an earlier bundle had checked. Either way a malformed line is
        reported and the lines after it are checked."""
        first = not self.checked_blobs
        chunk: list[Any] = []
        for number, line in self.bundle.message_lines():
            if first:
                chunk.append((number, line))
            else:
                try:
                    chunk.append(self._to_check(parse_message_line(self.bundle.path, number, line)))
                except BundleError as error:
                    self.problem(str(error), None)
                    continue
            if len(chunk) == MESSAGES_PER_TASK:
                yield self._check_chunk(trust, chunk, first)
                chunk = []
        if chunk:
            yield self._check_chunk(trust, chunk, first)

    def _check_chunk(self, trust: _Trust, chunk: list[Any], lines: bool) -> Future[_Checked]:
        check = _check_message_lines if lines else _check_messages
        return self.executor.submit(check, trust, self.name, chunk)

    def _to_check(self, message: BundledMessage) -> _ToCheck:
        envelope, receipts = blob_keys(self.registry_key, message)
        return _ToCheck(
            message,
            self._first_time(envelope),
            frozenset(signer for signer, key in receipts.items() if self._first_time(key)),
        )

    def _first_time(self, key: bytes) -> bool:
        if key in self.checked_blobs:
            return False
        self.checked_blobs.add(key)
        return True

    def _submit(self, task: Future[_Checked]) -> None:
        self.in_flight.add(task)
        while len(self.in_flight) >= self.limit:
            self._collect(wait_all=False)

    def _pump(self, tasks: Iterator[Future[_Checked]]) -> None:
        """Called as the tree grows: keep the workers fed, take in what they finished."""
        self._collect(wait_all=False, block=False)
        while len(self.in_flight) < self.limit:
            task = next(tasks, None)
            if task is None:
                return
            self.in_flight.add(task)

    def _collect(self, *, wait_all: bool, block: bool = True) -> None:
        if not self.in_flight:
            return
        if wait_all:
            done, self.in_flight = wait(self.in_flight), set()
            finished = done.done
        elif block:
            done = wait(self.in_flight, return_when="FIRST_COMPLETED")
            finished, self.in_flight = done.done, done.not_done
        else:
            finished = {task for task in self.in_flight if task.done()}
            self.in_flight -= finished
        for task in finished:
            self._merge(task.result())

    def _merge(self, checked: _Checked) -> None:
        for what, index in checked.problems:
            self.problem(what, index)
        self.summary.signatures += checked.signatures
        self.summary.messages += checked.messages
        self.roots.update(checked.roots)
        self.cosigned.update(checked.cosigned)
        self.ledger.sent.update(checked.sent)
        self.ledger.received.update(checked.received)
        self.checked_blobs.update(checked.checked_blobs)
        if checked.messages:
            self.progress(
                f"{self.bundle.manifest.agency} messages",
                self.summary.messages,
                self.bundle.manifest.messages,
            )

    def _recompute_tree(
        self, sizes: set[int], between: Callable[[], None]
    ) -> tuple[dict[int, bytes], dict[int, str]]:
        """The root at each checkpointed size, and the envelope digest of each "received"
        entry by index. `between` runs every so often to keep the workers busy."""
        manifest = self.bundle.manifest
        computed: dict[int, bytes] = {}
        received: dict[int, str] = {}
        try:
            frontier = Frontier(manifest.first_index, manifest.start_frontier)
        except ValueError as error:
            self.problem(f"manifest start_frontier: {error}", manifest.first_index)
            return computed, received
        if manifest.first_index in sizes:
            computed[manifest.first_index] = frontier.root()
        total = manifest.end_index - manifest.first_index
        label = f"{manifest.agency} entries"
        for index, entry in self.bundle.entries():
            frontier.push(leaf_hash(entry))
            # Only "received" entries matter to the cross-check: parsing every entry would
            # cost this process, the one reading the bundle, a third of its time.
            if RECEIVED_MARK in entry or not (entry[:1] == b"{" and entry[-1:] == b"}"):
                try:
                    fields = json.loads(entry)
                except ValueError:  # not JSON, or not UTF-8
                    fields = None
                if not isinstance(fields, dict):
                    self.problem("is not a JSON object", index)
                elif fields.get("event") == "received":
                    received[index] = str(fields.get("envelope_sha256", ""))
            if frontier.size in sizes:
                computed[frontier.size] = frontier.root()
            if index % 2000 == 0:
                between()
                if index % 10000 == 0:
                    self.progress(label, index - manifest.first_index, total)
        self.progress(label, frontier.size - manifest.first_index, total)
        if frontier.size != manifest.end_index:
            self.problem(
                f"the bundle holds entries up to {frontier.size - 1}, its manifest says up to "
                f"{manifest.end_index - 1}",
                frontier.size,
            )
        return computed, received

    def _compare_roots(self, computed: dict[int, bytes]) -> None:
        first = self.bundle.manifest.first_index
        if first and self.roots.get(first) not in (None, computed.get(first)):
            self.problem(
                "the tree before the first entry does not match the checkpoint there", first
            )
        previous = first
        beyond = []
        for size in sorted(self.roots):
            if size <= first:
                continue
            if size not in computed:
                beyond.append(size)
                continue
            if self.roots[size] != computed[size]:
                what = (
                    f"does not match the signed checkpoint of size {size}"
                    if size - previous == 1
                    else f"entries {previous} to {size - 1} do not match the signed "
                    f"checkpoint of size {size}; the first bad index is among them"
                )
                self.problem(what, previous)
            previous = size
        if beyond:
            self.problem(
                f"checkpoints of sizes {beyond[:5]} lie beyond the entries in the bundle", None
            )


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
        elif received.receipt_sha256 != sent.receipt_sha256:
            report.problems.append(
                Problem(
                    received.bundle,
                    f"message {message_id}: its receipt differs from the one the sender holds",
                    received.entry_index,
                )
            )
        else:
            report.matched += 1
    for (message_id, agency), received in ledger.received.items():
        envelope_sender = received.sender
        if envelope_sender not in ledger.covered:
            continue
        if (message_id, agency) not in ledger.sent:
            first, end = ledger.covered[envelope_sender]
            report.one_sided.append(
                f"message {message_id}: {received.bundle} received it (entry "
                f"{received.entry_index}) but {envelope_sender}'s bundle (entries {first}.."
                f"{end - 1}) does not hold its receipt"
            )


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
