"""A fuzz harness over every RPC of the peer port (issue 13, item 5).

Drives one real node (`liandong serve`, real mutual TLS, SQLite or PostgreSQL) as a hostile
member would: the caller is a real member (the police) with its real TLS certificate and its
real signing key; the node is the procuratorate's, run with FUZZ_LIMITS. Requests are drawn
with hypothesis (seeded, no shrinking, no example database) for every method of
`liandong.v1.Exchange`, `liandong.v1.Audit` and `grpc.health.v1.Health` (Check, Watch and
List: every method the health servicer registers), each RPC getting an equal share, in
these layers:

* **raw** — bytes that are mostly not the RPC's message: random bytes, and protobuf-shaped
  noise (random field numbers and wire types, truncated lengths, groups);
* **generic** and **mutated** — valid protobuf requests with random field values (drawn
  from the message's descriptor), and valid requests whose serialized bytes were then bit-
  flipped, truncated, spliced or had fields duplicated or appended;
* **structured** — correctly signed envelopes whose `Message` has none, one or several
  hostile parts: random, huge, NUL and control-character strings in every header and body
  field, odd timestamps, duplicate and malformed recipients, many attachments, wrong
  digests, unknown fields, extra or foreign signatures, ids of messages the node already
  holds; they pass the signature check and reach checks 4-11, the storage, the cases and
  the hand-off. Streams (`Deliver`, `UploadAttachment`) get sequences mixing valid,
  malformed and undecodable items (batches with repeats and reused ids inside them), and
  uploads are followed by the queries, deliveries and downloads that use them;
* **known** — a fixed corpus sent first (KNOWN): the classes issue 13 names;
* **special** — on a schedule, not drawn (SPECIALS): a call that never sends its request,
  a Deliver and an upload that go idle, more calls and more streams at once than the
  member's share.

The oracle (`Report.violations`; any violation fails the run):

* every status is one the protocol documents (docs/protocol.md section 10), never UNKNOWN
  or INTERNAL, and never a client-side deadline (a hang, after CALL_TIMEOUT);
* the node's log gets no "Traceback" and no "internal error", and the node keeps running;
* every refusal received has its audit entry: refusals == new `rejected` entries + new
  `audit_query` entries whose detail says " refused: " (a Deliver batch over the size limit
  is one refusal with one entry, as the protocol says; a health Check of an unknown service
  name is the health protocol's NOT_FOUND answer, not a refusal; a request over gRPC's own
  size cap is cut off by gRPC, unaudited, as section 6 says);
* every Deliver batch gets exactly one answer, with one result per request (unless the
  stream was refused whole on arrival);
* a receipt answers the very envelope sent, signed by the node; a download matches its
  digest;
* a refusal's status message is at most 1 KiB, and no refusal's audit entry echoes what the
  caller sent (its detail stays under MAX_AUDIT_DETAIL);
* a health check from another member (ecology) every ~0.5 s always answers SERVING within
  its deadline (the latency is recorded, not asserted), and a legitimate message from that
  member is received with a valid receipt every few seconds during the run and once after.

Used by tests/integration/test_fuzz_peer.py (a short run) and bench/fuzz.py (a long one).
A violation keeps, per group, the example with the smallest request: its plan (`repr`, with
the drawn values) and the request's bytes are the reproducer.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import random
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from node._pb.liandong.v1 import audit_pb2, envelope_pb2, exchange_pb2, exchange_pb2_grpc
from node.audit.checkpoint import log_origin
from node.audit.note import split_note
from node.audit.refusals import COUNTED, FLUSH_SECONDS
from node.envelope import (
    MESSAGE_PAYLOAD_TYPE,
    RECEIPT_PAYLOAD_TYPE,
    EnvelopeError,
    cosign_checkpoint,
    envelope_digest,
    sign_envelope,
    verify_envelope,
)
from node.exchange.errors import MAX_REASON
from node.exchange.messages import uuid7
from node.federation_setup import NodeProcess, NodeSetup
from node.identity import SigningKey
from tests.peer import clue_message, database_rows, sign, signing_key

ECOLOGY, POLICE, PROCURATORATE = "140400/ecology", "140400/police", "140400/procuratorate"
RECEIVER, ATTACKER, BYSTANDER = PROCURATORATE, POLICE, ECOLOGY
FEDERATION = "demo-federation"  # node.federation_setup.create_federation's

# The node under test runs with small limits, so that every limit is reachable by a fuzzed
# request (the size limits by drawn requests, the shares and time limits by the special
# cases, see run_fuzz), and time limits short enough that a silent or idle call costs little;
# the shares are larger than what the harness's workers hold at once, and a drawn stream
# pauses far less than the idle limit, so drawn calls are not refused for them.
FIRST_MESSAGE_SECONDS = 2
IDLE_SECONDS = 3
PEER_CALLS, PEER_STREAMS = 24, 8
FUZZ_LIMITS = f"""
[limits]
max_envelope_bytes = 262144
max_attachment_bytes = 1048576
max_pending_upload_bytes = 8388608
max_recipients = 8
peer_calls = {PEER_CALLS}
peer_streams = {PEER_STREAMS}
peer_checks = 6
first_message_seconds = {FIRST_MESSAGE_SECONDS}
stream_idle_seconds = {IDLE_SECONDS}
"""
MAX_ENVELOPE = 262144
MAX_ATTACHMENT = 1048576
CHUNK = 1024 * 1024  # node.exchange.attachments.CHUNK_SIZE
MAX_BATCH = 256  # node.exchange.inbound.MAX_BATCH
# A refusal's text is at most MAX_REASON bytes (docs/protocol.md 3.1); an audit_query entry
# adds the question to it. Bounded, not echoing what the caller sent, is what is checked here.
MAX_AUDIT_DETAIL = 2 * MAX_REASON
CALL_TIMEOUT = 60.0  # a call without an answer by then is a hang
HEALTH_EVERY, HEALTH_TIMEOUT = 0.5, 5.0
PROBE_EVERY = 5.0  # a legitimate message from the bystander, during the run

# What the node may answer (docs/protocol.md section 10; INTERNAL is a bug, ALREADY_EXISTS
# never used).
DOCUMENTED = frozenset(
    c.name
    for c in (
        grpc.StatusCode.OK,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNIMPLEMENTED,
    )
)
CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


# -- the peer port's RPCs ----------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    service: str
    name: str
    request: type[ProtoMessage]
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def label(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}.{self.name}"


def _rpcs() -> tuple[Rpc, ...]:
    services = [
        exchange_pb2.DESCRIPTOR.services_by_name["Exchange"],
        audit_pb2.DESCRIPTOR.services_by_name["Audit"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
    ]
    return tuple(
        Rpc(
            s.full_name,
            m.name,
            message_factory.GetMessageClass(m.input_type),
            m.client_streaming,
            m.server_streaming,
        )
        for s in services
        for m in s.methods
    )


RPCS = _rpcs()
BY_NAME = {r.name: r for r in RPCS}
FAMILY_RPCS = {
    "TransferClue": "clue",
    "TransferCrime": "crime_transfer",
    "SendNotice": "notice",
    "RequestEvidence": "evidence_request",
    "IssueRecommendation": "recommendation",
    "Reply": "reply",
}
BODY_FAMILY = {
    "clue": "clue",
    "crime_transfer": "crime_transfer",
    "notice": "notice",
    "evidence_request": "evidence_request",
    "recommendation": "recommendation",
    "evidence_response": "reply",
    "recommendation_reply": "reply",
    "feedback": "reply",
}
BODIES = tuple(BODY_FAMILY)
# What the attacker (the police) may send the receiver (the procuratorate) by the registry.
PERMITTED = ("clue", "notice", "evidence_request", "evidence_response", "feedback")


# -- hostile values ------------------------------------------------------------------------

EVENTS = (
    "accepted",
    "filed",
    "not_filed",
    "delayed",
    "results",
    "replied",
    "closed",
    "declined",
    "read",
    "received",
    "reconsideration_requested",
    "reconsidered_filed",
    "prosecuted",
    "returned",
    "supplemented",
)
SPECIAL_TEXT: tuple[str, ...] = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x00" * 8,
    "\n",
    "\r\n",
    "line\nbreak",
    "\t",
    "\x1b[2J\x1b[31m",
    "\x07\x08\x0b\x0c",
    "\x7f",
    "\x85",
    "\u2028\u2029",
    "\u202eevil\u202c",
    "\ufeff",
    "\u200b\u200d",
    "\ufffd",
    "\uffff",
    "\U0010ffff",
    "😀" * 3,
    "𝕏𝕐",
    "..",
    ".",
    "/",
    "../../etc/cron.d/x",
    "a/b",
    "a\\b",
    "C:\\Windows\\x.txt",
    "NUL",
    "con.txt",
    "'; DROP TABLE messages; --",
    '" OR 1=1 --',
    "%s%s%n%x",
    "{0}{1}{}",
    "${jndi:ldap://x/a}",
    "<script>alert(1)</script>",
    "NaN",
    "null",
    "-1",
    "9" * 40,
    "案" * 129,
    "a" * 128,
    "a" * 129,
    "a" * 201,
    "a" * 256,
    "a" * 257,
    RECEIVER,
    ATTACKER,
    BYSTANDER,
    "140400/POLICE",
    "000000/police",
    "140400/police/",
    "140400/police/x y",
    "140400/water",
    "140400/police,140400/ecology",
    "urn:liandong:agency:140400/police",
    "0" * 36,
    "01a2087f-397b-7d93-9e6b-dca9fcaac36a",
    "01A2087F-397B-7D93-9E6B-DCA9FCAAC36A",
    "01a2087f-397b-7d93-9e6b-dca9fcaac36a\n",
    *EVENTS,
)
HUGE_UNITS = ("a", "案", "\x00", "\n", "😀", "ab\x01", "/..")


@st.composite
def weighted(draw: st.DrawFn, *choices: tuple[int, SearchStrategy[Any]]) -> Any:
    """One of `choices`, each (weight, strategy), drawn in proportion to its weight."""
    total = sum(w for w, _ in choices)
    pick = draw(st.integers(0, total - 1))
    for w, strategy in choices:
        if pick < w:
            return draw(strategy)
        pick -= w
    raise AssertionError("unreachable")


def huge_text(low: int = 300, high: int = 90_000) -> SearchStrategy[str]:
    return st.builds(lambda u, n: u * n, st.sampled_from(HUGE_UNITS), st.integers(low, high))


def hostile_text(huge: int = 1) -> SearchStrategy[str]:
    return weighted(
        (6, st.sampled_from(SPECIAL_TEXT)),
        (4, st.text(st.characters(exclude_categories=("Cs",)), max_size=40)),
        (2, st.text(st.characters(max_codepoint=0xA0, exclude_categories=("Cs",)), max_size=16)),
        (huge, huge_text()),
    )


def seeded_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def hostile_bytes(max_size: int = 64) -> SearchStrategy[bytes]:
    return weighted(
        (3, st.binary(max_size=max_size)),
        (1, st.sampled_from([b"", b"\x00" * 32, b"\xff" * 32, b"\x00" * 31, b"\x00" * 33])),
        (1, st.builds(seeded_bytes, st.integers(0, 2**32), st.integers(0, 100_000))),
    )


def int_range(lo: int, hi: int) -> SearchStrategy[int]:
    edges = [
        lo,
        hi,
        0,
        1,
        2,
        127,
        128,
        255,
        256,
        4095,
        2**31 - 1,
        2**31,
        2**32 - 1,
        2**32,
        2**53,
        2**63 - 1,
        2**63,
        2**64 - 1,
        -1,
        -(2**31),
        -(2**63),
    ]
    return weighted(
        (3, st.sampled_from(sorted({e for e in edges if lo <= e <= hi}))),
        (2, st.integers(max(lo, 0), min(hi, 1000))),
        (2, st.integers(lo, hi)),
    )


UINT64 = int_range(0, 2**64 - 1)
INT64 = int_range(-(2**63), 2**63 - 1)
INT32 = int_range(-(2**31), 2**31 - 1)
UINT32 = int_range(0, 2**32 - 1)


# -- generic messages, drawn from their descriptors ----------------------------------------

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_ENUM: INT32,
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_SINT64: INT64,
    FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT32: UINT32,
    FieldDescriptor.TYPE_FIXED32: UINT32,
    FieldDescriptor.TYPE_UINT64: UINT64,
    FieldDescriptor.TYPE_FIXED64: UINT64,
}


def _scalar(f: FieldDescriptor, depth: int) -> SearchStrategy[Any]:
    # Huge values only at the top: a generic batch of envelopes stays under gRPC's size cap.
    if f.type == FieldDescriptor.TYPE_STRING:
        return hostile_text(huge=1 if depth == 0 else 0)
    if f.type == FieldDescriptor.TYPE_BYTES:
        return hostile_bytes() if depth == 0 else st.binary(max_size=64)
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32)
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return generic_message(f.message_type, depth + 1)
    return _INT_RANGES[f.type]


@st.composite
def _generic(draw: st.DrawFn, descriptor: Descriptor, depth: int) -> ProtoMessage:
    message = message_factory.GetMessageClass(descriptor)()
    if depth > 3:
        return message
    chosen_oneof = {o.name: draw(st.sampled_from([None, *o.fields])) for o in descriptor.oneofs}
    for f in descriptor.fields:
        if f.containing_oneof is not None and chosen_oneof[f.containing_oneof.name] is not f:
            continue
        if f.containing_oneof is None and not draw(st.booleans()):
            continue
        value = _scalar(f, depth)
        if f.is_repeated:
            values = draw(st.lists(value, max_size=4 if depth < 2 else 2))
            container = getattr(message, f.name)
            for v in values:
                if f.type == FieldDescriptor.TYPE_MESSAGE:
                    container.add().CopyFrom(v)
                else:
                    container.append(v)
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, f.name).CopyFrom(draw(value))
        else:
            setattr(message, f.name, draw(value))
    return message


def generic_message(descriptor: Descriptor, depth: int = 0) -> SearchStrategy[ProtoMessage]:
    return _generic(descriptor, depth)


# -- protobuf-shaped noise and byte mutations --------------------------------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@st.composite
def wire_field(draw: st.DrawFn) -> bytes:
    """One protobuf field, well- or ill-formed: any field number, any of the 8 wire types."""
    number = draw(weighted((3, st.integers(1, 32)), (1, st.integers(0, 2**29 + 5))))
    wire = draw(st.integers(0, 7))
    tag = varint((number << 3) | wire)
    if wire == 0:
        return tag + varint(draw(UINT64))
    if wire == 1:
        return tag + draw(st.binary(min_size=8, max_size=8))
    if wire == 5:
        return tag + draw(st.binary(min_size=4, max_size=4))
    if wire == 2:
        body = draw(st.binary(max_size=48))
        length = draw(weighted((4, st.just(len(body))), (1, UINT64)))
        return tag + varint(length) + body
    return tag + draw(st.binary(max_size=8))  # groups (3, 4) and the invalid types 6, 7


def raw_bytes() -> SearchStrategy[bytes]:
    return weighted(
        (2, st.binary(max_size=64)),
        (3, st.lists(wire_field(), min_size=1, max_size=6).map(b"".join)),
        (1, st.sampled_from([b"\xff", b"\xff\xff\xff\x07", b"\x0a", b"\x0a\xff\xff\xff\xff\x0f"])),
        (1, st.builds(seeded_bytes, st.integers(0, 2**32), st.integers(64, 200_000))),
    )


@dataclass(frozen=True)
class Op:
    """One mutation of serialized bytes; positions are fractions of the length."""

    kind: str  # flip, truncate, insert, delete, duplicate, concat, unknown
    at: float = 0.0
    span: float = 0.0
    data: bytes = b""
    bit: int = 0


def mutation_ops() -> SearchStrategy[tuple[Op, ...]]:
    fraction = st.floats(0, 1, exclude_max=True)
    op = st.one_of(
        st.builds(Op, st.just("flip"), fraction, bit=st.integers(0, 7)),
        st.builds(Op, st.just("truncate"), fraction),
        st.builds(Op, st.just("insert"), fraction, data=st.binary(min_size=1, max_size=8)),
        st.builds(Op, st.just("delete"), fraction, fraction),
        st.builds(Op, st.just("duplicate"), fraction, fraction),
        st.builds(Op, st.just("concat")),
        st.builds(Op, st.just("unknown"), data=wire_field()),
    )
    return st.lists(op, min_size=1, max_size=4).map(tuple)


def mutate(data: bytes, ops: Sequence[Op]) -> bytes:
    out = bytearray(data)
    for op in ops:
        n = len(out)
        at = int(op.at * n)
        if op.kind == "flip" and n:
            out[at] ^= 1 << op.bit
        elif op.kind == "truncate":
            del out[at:]
        elif op.kind == "insert":
            out[at:at] = op.data
        elif op.kind == "delete":
            del out[at : at + 1 + int(op.span * 16)]
        elif op.kind == "duplicate":  # a slice again at the end: fields repeated, merged
            out += out[at : at + 1 + int(op.span * (n - at))]
        elif op.kind == "concat":  # the whole message twice: protobuf merges them
            out += bytes(out)
        elif op.kind == "unknown":
            out += op.data
    return bytes(out)


# -- structured, signed messages ----------------------------------------------------------


@dataclass(frozen=True)
class Rel:
    """A time relative to when the request is sent."""

    seconds: int
    nanos: int = 0


@dataclass(frozen=True)
class Abs:
    seconds: int
    nanos: int = 0


TimeSpec = Rel | Abs | None


@dataclass(frozen=True)
class PoolRef:
    """The n-th (modulo) of something the node already holds: an accepted message's id or
    envelope, or a file the attacker uploaded."""

    n: int


@dataclass(frozen=True)
class AttachmentSpec:
    data_seed: int
    data_size: int
    sha256: bytes | PoolRef | None = None  # None: the digest of the data
    size: int | None = None  # None: the data's size
    media_type: str = "application/pdf"
    file_name: str = "file.pdf"

    def data(self) -> bytes:
        return seeded_bytes(self.data_seed, self.data_size)


@dataclass(frozen=True)
class SigSpec:
    kind: str  # own (the real signature), copy (it again), bystander, receiver, random
    keyid: str = ""
    sig: bytes = b""


@dataclass(frozen=True)
class MessageSpec:
    """A Message as the attacker's node would sign it, with some fields made hostile.

    Every field left None keeps a valid value, so that most specs get past some checks and
    a good share reaches the storage."""

    body: str
    body_fields: tuple[tuple[str, Any], ...] = ()
    signer: str = "attacker"  # attacker, bystander, receiver
    message_id: str | PoolRef | None = None
    sender: str | None = None
    recipients: tuple[str, ...] | None = None  # tokens: receiver, attacker, bystander, or ids
    created_at: TimeSpec | str = "default"
    case_ref: str | PoolRef | None = None
    in_reply_to: str | PoolRef | None = None
    confidentiality: int | None = None
    deadline: TimeSpec = None
    attachments: tuple[AttachmentSpec, ...] = ()
    field_markings: tuple[tuple[str, int], ...] = ()
    version_of: str | PoolRef | None = None
    all_recipients: tuple[str, ...] = ()
    payload_ops: tuple[Op, ...] = ()  # mutations of the serialized Message, before signing
    unknown: bytes = b""  # unknown fields appended to the payload, before signing
    signatures: tuple[SigSpec, ...] = (SigSpec("own"),)
    payload_type: str | None = None


def time_spec() -> SearchStrategy[TimeSpec]:
    nanos = weighted((5, st.just(0)), (2, st.integers(0, 999_999_999)), (1, INT32))
    return weighted(
        (6, st.builds(Rel, st.integers(-3600, 60), nanos)),
        (
            2,
            st.builds(
                Rel,
                st.sampled_from(
                    [301, 302, 86400, -30 * 86400 + 60, -30 * 86400 - 60, -400 * 86400]
                ),
                nanos,
            ),
        ),
        (
            2,
            st.builds(
                Abs,
                st.sampled_from([0, -1, 1, 253402300799, 253402300800, 2**63 - 1, -(2**63), 2**40]),
                nanos,
            ),
        ),
        (1, st.none()),
    )


def maybe(strategy: SearchStrategy[Any], odds: int = 3) -> SearchStrategy[Any]:
    """None (keep the valid value) `odds` times as often as a drawn one."""
    return weighted((odds, st.none()), (1, strategy))


def pool_ref() -> SearchStrategy[PoolRef]:
    return st.builds(PoolRef, st.integers(0, 2**16))


def recipient_token() -> SearchStrategy[str]:
    return weighted(
        (4, st.sampled_from(["receiver", "attacker", "bystander", "140400/water"])),
        (2, hostile_text(huge=0)),
    )


def attachment_spec(cited: bool = True) -> SearchStrategy[AttachmentSpec]:
    sizes = weighted((6, st.integers(0, 4096)), (1, st.integers(4096, 200_000)))
    sha = (
        maybe(st.one_of(pool_ref(), hostile_bytes(40)), odds=2)
        if cited
        else maybe(hostile_bytes(40), 6)
    )
    return st.builds(
        AttachmentSpec,
        st.integers(0, 2**32),
        sizes,
        sha,
        maybe(UINT64, 6),
        weighted((4, st.just("application/pdf")), (1, hostile_text())),
        weighted((4, st.sampled_from(["file.pdf", "证据.jpg", "a.b.c"])), (2, hostile_text())),
    )


def sig_spec() -> SearchStrategy[SigSpec]:
    keyid = weighted((2, st.sampled_from(["", "0" * 16, "66687aadf862bd77"])), (1, hostile_text()))
    return weighted(
        (2, st.just(SigSpec("copy"))),
        (1, st.just(SigSpec("bystander"))),
        (1, st.just(SigSpec("receiver"))),
        (2, st.builds(SigSpec, st.just("random"), keyid, hostile_bytes(80))),
    )


@st.composite
def body_fields(draw: st.DrawFn, body: str, hostile: bool) -> tuple[tuple[str, Any], ...]:
    """Values for the body's fields: plausible ones, or (hostile) some of them hostile."""
    descriptor = envelope_pb2.Message.DESCRIPTOR.fields_by_name[body].message_type
    values: list[tuple[str, Any]] = []
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            valid: SearchStrategy[Any] = (
                st.sampled_from(EVENTS) if f.name == "status" else st.sampled_from(PLAIN_TEXT)
            )
            # Huge values only in a singular field: 300 of them would pass gRPC's size cap.
            bad: SearchStrategy[Any] = hostile_text(huge=0 if f.is_repeated else 1)
        elif f.type == FieldDescriptor.TYPE_MESSAGE:  # a Timestamp
            valid, bad = st.builds(Rel, st.integers(-86400, 30 * 86400)), time_spec()
        elif f.type == FieldDescriptor.TYPE_ENUM:
            valid, bad = st.integers(0, 6), INT32
        elif f.type == FieldDescriptor.TYPE_BOOL:
            valid = bad = st.booleans()
        else:
            continue
        strategy = weighted((2, valid), (1, bad)) if hostile else valid
        if f.is_repeated:
            strategy = (
                weighted((4, st.lists(strategy, max_size=4)), (1, st.lists(strategy, max_size=300)))
                if hostile
                else st.lists(strategy, max_size=3)
            )
        if draw(st.integers(0, 3)):
            values.append((f.name, draw(strategy)))
    return tuple(values)


PLAIN_TEXT = ("河道排污", "暗管排放含铬废水", "长治市某电镀有限公司", "Changzhi", "")
# The parts of a message the structured layer makes hostile, a few at a time.
HOSTILE_PARTS = (
    "body",
    "message_id",
    "sender",
    "recipients",
    "created_at",
    "case_ref",
    "in_reply_to",
    "confidentiality",
    "deadline",
    "attachments",
    "field_markings",
    "version_of",
    "all_recipients",
    "payload_ops",
    "unknown",
    "signatures",
    "payload_type",
    "signer",
)


@st.composite
def message_spec(draw: st.DrawFn, body: str | None = None, signer: str = "attacker") -> MessageSpec:
    """A message with none, one, a few or many of its parts hostile."""
    body = body or draw(st.sampled_from(BODIES))
    count = draw(
        weighted(
            (3, st.just(0)),
            (4, st.just(1)),
            (3, st.integers(2, 3)),
            (1, st.integers(4, len(HOSTILE_PARTS))),
        )
    )
    hostile = set(draw(st.permutations(HOSTILE_PARTS))[:count])

    def part(name: str, strategy: SearchStrategy[Any], default: Any) -> Any:
        return draw(strategy) if name in hostile else default

    ids = weighted((2, pool_ref()), (3, hostile_text()), (1, st.builds(uuid7)))
    marking = st.tuples(
        weighted((2, st.sampled_from(["title", "facts", "suspect", "text"])), (1, hostile_text())),
        weighted((3, st.integers(0, 3)), (1, INT32)),
    )
    payload_types = st.sampled_from(
        [
            RECEIPT_PAYLOAD_TYPE,
            MESSAGE_PAYLOAD_TYPE.upper(),
            MESSAGE_PAYLOAD_TYPE + "\x00",
            "",
            "application/vnd.liandong.registry+json",
        ]
    )
    return MessageSpec(
        body=body,
        body_fields=draw(body_fields(body, "body" in hostile)),
        signer=part("signer", st.sampled_from(["attacker", "bystander", "receiver"]), signer),
        message_id=part("message_id", ids, None),
        sender=part("sender", hostile_text(huge=0), None),
        recipients=part(
            "recipients",
            weighted(
                (4, st.lists(recipient_token(), max_size=4).map(tuple)),
                (1, st.lists(recipient_token(), min_size=9, max_size=60).map(tuple)),
            ),
            None,
        ),
        created_at=part("created_at", time_spec(), "default"),
        case_ref=part("case_ref", st.one_of(pool_ref(), hostile_text()), None),
        in_reply_to=part("in_reply_to", weighted((2, pool_ref()), (2, ids), (1, st.none())), None),
        confidentiality=part("confidentiality", weighted((3, st.integers(0, 3)), (1, INT32)), None),
        deadline=part("deadline", time_spec(), None),
        attachments=part(
            "attachments",
            weighted(
                (4, st.lists(attachment_spec(), min_size=1, max_size=3).map(tuple)),
                (1, st.lists(attachment_spec(), min_size=4, max_size=40).map(tuple)),
            ),
            (),
        ),
        field_markings=part(
            "field_markings", st.lists(marking, min_size=1, max_size=4).map(tuple), ()
        ),
        version_of=part("version_of", ids, None),
        all_recipients=part(
            "all_recipients", st.lists(recipient_token(), min_size=1, max_size=4).map(tuple), ()
        ),
        payload_ops=part("payload_ops", mutation_ops(), ()),
        unknown=part("unknown", st.lists(wire_field(), min_size=1, max_size=3).map(b"".join), b""),
        signatures=part(
            "signatures",
            weighted(
                (
                    3,
                    st.lists(sig_spec(), min_size=1, max_size=3).map(
                        lambda s: (SigSpec("own"), *s)
                    ),
                ),
                (
                    1,
                    st.lists(sig_spec(), min_size=4, max_size=6).map(
                        lambda s: (*s, SigSpec("own"))
                    ),
                ),
                (1, st.lists(sig_spec(), max_size=2).map(tuple)),
            ),
            (SigSpec("own"),),
        ),
        payload_type=part("payload_type", weighted((4, payload_types), (1, hostile_text())), None),
    )


# -- what one drawn case is ----------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """Bytes as drawn (random, or a generic message serialized when drawn)."""

    data: bytes

    def __repr__(self) -> str:
        return (
            f"Raw({len(self.data)} bytes: {self.data[:48]!r}{'…' if len(self.data) > 48 else ''})"
        )


@dataclass(frozen=True)
class Signed:
    """A structured message, signed when sent; as an Envelope."""

    spec: MessageSpec


@dataclass(frozen=True)
class Resend:
    """An envelope the node already accepted, exactly as it was sent (a repeat)."""

    n: int


EnvelopeSource = Raw | Signed | Resend  # Raw: a serialized (generic) Envelope


@dataclass(frozen=True)
class Query:
    """An AttachmentQuery: an envelope, and a digest (None: the envelope's first attachment;
    a PoolRef: a file the attacker uploaded)."""

    envelope: EnvelopeSource
    sha256: bytes | PoolRef | None = None


@dataclass(frozen=True)
class Request:
    seq: int
    envelope: Any  # an EnvelopeSource, or Same / SameId


@dataclass(frozen=True)
class Same:
    """In a batch: the envelope of an earlier request of the batch, again (a repeat within
    one group commit)."""

    k: int


@dataclass(frozen=True)
class SameId:
    """In a batch: another message with the id of an earlier request of the batch."""

    k: int
    spec: MessageSpec


@dataclass(frozen=True)
class Batch:
    requests: tuple[Request, ...]


@dataclass(frozen=True)
class BigBatch:
    """More requests than a batch may hold."""

    size: int


@dataclass(frozen=True)
class AuditAsk:
    """A structured Audit request; sizes and indices may be relative to the latest
    checkpoint (an int offset in `relative`), which the harness asks for first."""

    rpc: str
    fields: tuple[tuple[str, Any], ...]
    relative: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Cosign:
    """AddCosignature with the attacker's real witness key over the latest checkpoint."""

    size_offset: int = 0
    time_offset: int = 0
    origin: str | None = None
    ops: tuple[Op, ...] = ()


@dataclass(frozen=True)
class Mutated:
    base: Any  # a piece
    ops: tuple[Op, ...]


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class FirstChunk:
    """The first chunk of an upload: envelope, digest, offset (None: 0), some data."""

    sha256: bytes | None = None  # None: the target attachment's
    offset: int | None = None
    data: tuple[float, float] = (0.0, 0.0)  # a slice of the file, as fractions
    envelope: EnvelopeSource | None = None  # None: the upload's message


@dataclass(frozen=True)
class DataChunk:
    data: tuple[float, float] | bytes  # a slice of the file, or bytes of its own


@dataclass(frozen=True)
class Oversize:
    """A chunk one byte over the limit."""


@dataclass(frozen=True)
class Upload:
    spec: MessageSpec  # its attachments carry the data
    target: int
    items: tuple[Any, ...]
    then: tuple[str, ...] = ()  # query, deliver, download


@dataclass(frozen=True)
class Plan:
    """One drawn case: an RPC and what is sent on it."""

    rpc: str
    layer: str
    items: tuple[Any, ...]  # the request (unary), or the stream's items
    silent: bool = False  # open the call and send nothing


# The special cases, which cost time or hold many calls, come on a schedule, not drawn:
# a call that never sends its request (any RPC); a Deliver and an upload that go idle; more
# calls, and more streams, held at once than a member's share.
SPECIALS = ("silent", "idle", "burst-calls", "burst-streams")


def _body_rpc(body: str) -> str:
    family = BODY_FAMILY[body]
    return next(rpc for rpc, f in FAMILY_RPCS.items() if f == family)


@st.composite
def envelope_source(draw: st.DrawFn, body: str | None = None) -> EnvelopeSource:
    return draw(
        weighted(
            (8, st.builds(Signed, message_spec(body))),
            (1, st.builds(Resend, st.integers(0, 2**16))),
            (
                1,
                generic_message(envelope_pb2.Envelope.DESCRIPTOR).map(
                    lambda m: Raw(m.SerializeToString())
                ),
            ),
        )
    )


def _generic_piece(rpc: Rpc) -> SearchStrategy[Raw]:
    return generic_message(rpc.request.DESCRIPTOR).map(lambda m: Raw(m.SerializeToString()))


@st.composite
def family_plan(draw: st.DrawFn, rpc: Rpc) -> Plan:
    own_body = draw(
        weighted(
            (4, st.sampled_from([b for b in BODIES if _body_rpc(b) == rpc.name])),
            (1, st.sampled_from(BODIES)),
        )
    )
    layer, piece = draw(
        weighted(
            (2, st.tuples(st.just("raw"), raw_bytes().map(Raw))),
            (2, st.tuples(st.just("generic"), _generic_piece(rpc))),
            (
                2,
                st.tuples(
                    st.just("mutated"),
                    st.builds(Mutated, st.builds(Signed, message_spec(own_body)), mutation_ops()),
                ),
            ),
            (10, st.tuples(st.just("structured"), envelope_source(own_body))),
        )
    )
    return Plan(rpc.name, layer, (piece,))


@st.composite
def batch(draw: st.DrawFn) -> Batch:
    seq = weighted((6, st.integers(1, 50)), (1, st.just(0)), (1, UINT64))
    source = weighted(
        (8, envelope_source()),
        (1, st.builds(Same, st.integers(0, 5))),
        (1, st.builds(SameId, st.integers(0, 5), message_spec())),
    )
    requests = draw(st.lists(st.builds(Request, seq, source), max_size=5))
    return Batch(tuple(requests))


@st.composite
def deliver_plan(draw: st.DrawFn) -> Plan:
    rpc = BY_NAME["Deliver"]
    item = weighted(
        (8, batch()),
        (2, raw_bytes().map(Raw)),
        (2, _generic_piece(rpc)),
        (2, st.builds(Mutated, batch(), mutation_ops())),
        (1, st.builds(Pause, st.sampled_from([0.05, 0.2]))),
    )
    items = draw(
        weighted(
            (12, st.lists(item, min_size=1, max_size=6)),
            (1, st.just([])),
            (1, st.lists(item, max_size=2).map(lambda i: [*i, BigBatch(MAX_BATCH + 1)])),
        )
    )
    layers = {type(i).__name__ for i in items}
    layer = "structured" if layers <= {"Batch", "Pause", "BigBatch"} else "mixed"
    return Plan(rpc.name, layer, tuple(items))


@st.composite
def upload_plan(draw: st.DrawFn) -> Plan:
    rpc = BY_NAME["UploadAttachment"]
    if draw(st.integers(0, 5)) == 0:
        items = draw(
            st.lists(st.one_of(raw_bytes().map(Raw), _generic_piece(rpc)), min_size=0, max_size=4)
        )
        return Plan(rpc.name, "raw" if items else "empty", tuple(items))
    # Half of the uploads are for a plain message, so that files get stored and later cases
    # can cite, query and download them.
    spec = draw(
        weighted((1, st.builds(MessageSpec, st.sampled_from(PERMITTED))), (1, message_spec()))
    )
    files = draw(st.lists(attachment_spec(cited=False), min_size=1, max_size=3))
    spec = replace(spec, attachments=tuple(files))
    target = draw(st.integers(0, len(files) - 1))
    cuts = sorted(draw(st.lists(st.floats(0, 1), max_size=3)))
    bounds = [0.0, *cuts, 1.0]
    first_end = bounds[1]
    items: list[Any] = [
        FirstChunk(
            sha256=draw(maybe(hostile_bytes(40), 10)),
            offset=draw(maybe(weighted((3, st.integers(0, 5000)), (1, UINT64)), 8)),
            data=(0.0, first_end),
            envelope=draw(maybe(envelope_source(), 10)),
        )
    ]
    items += [DataChunk(pair) for pair in itertools.pairwise(bounds[1:])]
    hostile = weighted(
        (3, st.builds(DataChunk, hostile_bytes(2000))),
        (2, raw_bytes().map(Raw)),
        (2, _generic_piece(rpc)),
        (1, st.just(Oversize())),
        (1, st.builds(Pause, st.sampled_from([0.05, 0.2]))),
        (2, st.builds(DataChunk, st.tuples(st.floats(0, 1), st.floats(0, 1)))),
    )
    for _ in range(draw(weighted((4, st.just(0)), (2, st.integers(1, 3))))):
        items.insert(draw(st.integers(0, len(items))), draw(hostile))
    then = draw(
        st.lists(st.sampled_from(["query", "deliver", "download"]), max_size=3, unique=True)
    )
    layer = "structured" if all(isinstance(i, FirstChunk | DataChunk) for i in items) else "mixed"
    return Plan(rpc.name, layer, (Upload(spec, target, tuple(items), tuple(then)),))


@st.composite
def query_plan(draw: st.DrawFn, rpc: Rpc) -> Plan:
    signer = "receiver" if rpc.name == "DownloadAttachment" else "attacker"
    envelope = weighted(
        (6, st.builds(Signed, message_spec(signer=signer))),
        (1, st.builds(Resend, st.integers(0, 2**16))),
        (
            1,
            generic_message(envelope_pb2.Envelope.DESCRIPTOR).map(
                lambda m: Raw(m.SerializeToString())
            ),
        ),
    )
    sha = weighted((3, pool_ref()), (2, st.none()), (1, hostile_bytes(40)))
    # A message that cites a file the attacker uploaded, asked about that file: what a
    # sender resuming an upload (Query) or a recipient fetching a file (Download) sends.
    held = st.builds(
        lambda n, spec: Query(
            Signed(replace(spec, attachments=(AttachmentSpec(0, 0, PoolRef(n)),))), PoolRef(n)
        ),
        st.integers(0, 2**16),
        message_spec(signer=signer),
    )
    layer, piece = draw(
        weighted(
            (2, st.tuples(st.just("raw"), raw_bytes().map(Raw))),
            (2, st.tuples(st.just("generic"), _generic_piece(rpc))),
            (
                1,
                st.tuples(
                    st.just("mutated"),
                    st.builds(Mutated, st.builds(Query, envelope, sha), mutation_ops()),
                ),
            ),
            (4, st.tuples(st.just("structured"), st.builds(Query, envelope, sha))),
            (4, st.tuples(st.just("structured"), held)),
        )
    )
    return Plan(rpc.name, layer, (piece,))


@st.composite
def audit_plan(draw: st.DrawFn, rpc: Rpc) -> Plan:
    offset = weighted((3, st.integers(-2, 2)), (1, st.integers(-1000, 1000)))
    structured: dict[str, SearchStrategy[Any]] = {
        "GetCheckpoint": st.builds(
            lambda r: AuditAsk("GetCheckpoint", (), r),
            weighted((1, st.just(())), (2, st.tuples(st.tuples(st.just("size"), offset)))),
        ),
        "GetInclusionProof": st.builds(
            lambda leaf, size: AuditAsk("GetInclusionProof", leaf[0], leaf[1] + size),
            weighted(
                (2, st.tuples(st.just(()), st.tuples(st.tuples(st.just("index"), offset)))),
                (1, st.tuples(st.tuples(st.tuples(st.just("index"), UINT64)), st.just(()))),
                (
                    2,
                    st.tuples(
                        st.tuples(
                            st.tuples(
                                st.just("message_id"), st.builds(PoolRef, st.integers(0, 999))
                            )
                        ),
                        st.just(()),
                    ),
                ),
                (
                    1,
                    st.tuples(
                        st.tuples(st.tuples(st.just("message_id"), hostile_text())), st.just(())
                    ),
                ),
            ),
            weighted((2, st.just(())), (1, st.tuples(st.tuples(st.just("size"), offset)))),
        ),
        "GetConsistencyProof": st.builds(
            lambda a, b: AuditAsk("GetConsistencyProof", (), (("old_size", a), ("new_size", b))),
            offset,
            offset,
        ),
        "GetEntries": st.builds(
            lambda start, limit: AuditAsk("GetEntries", (("limit", limit),), (("start", start),)),
            offset,
            UINT32,
        ),
        "AddCosignature": st.builds(
            Cosign,
            weighted((3, st.just(0)), (1, offset)),
            weighted((3, st.just(0)), (1, st.sampled_from([-(10**9), 301, 10**6, 2**62]))),
            maybe(hostile_text(huge=0), 4),
            maybe(mutation_ops(), 4).map(lambda o: o or ()),
        ),
    }
    layer, piece = draw(
        weighted(
            (2, st.tuples(st.just("raw"), raw_bytes().map(Raw))),
            (3, st.tuples(st.just("generic"), _generic_piece(rpc))),
            (
                1,
                st.tuples(
                    st.just("mutated"), st.builds(Mutated, structured[rpc.name], mutation_ops())
                ),
            ),
            (4, st.tuples(st.just("structured"), structured[rpc.name])),
        )
    )
    return Plan(rpc.name, layer, (piece,))


@st.composite
def health_plan(draw: st.DrawFn, rpc: Rpc) -> Plan:
    service = weighted(
        (
            3,
            st.sampled_from(
                ["", "liandong.v1.Exchange", "liandong.v1.Witness", "grpc.health.v1.Health"]
            ),
        ),
        (2, hostile_text()),
    )
    request = service.map(
        lambda s: Raw(health_pb2.HealthCheckRequest(service=s).SerializeToString())
    )
    layer, piece = draw(
        weighted(
            (2, st.tuples(st.just("raw"), raw_bytes().map(Raw))),
            (1, st.tuples(st.just("mutated"), st.builds(Mutated, request, mutation_ops()))),
            (3, st.tuples(st.just("structured"), request)),
        )
    )
    return Plan(rpc.name, layer, (piece,))


@st.composite
def plan_for(draw: st.DrawFn, rpc: Rpc) -> Plan:
    """A case for one RPC of the peer port."""
    if rpc.name in FAMILY_RPCS:
        return draw(family_plan(rpc))
    if rpc.name == "Deliver":
        return draw(deliver_plan())
    if rpc.name == "UploadAttachment":
        return draw(upload_plan())
    if rpc.name in ("QueryAttachment", "DownloadAttachment"):
        return draw(query_plan(rpc))
    if rpc.service.endswith("Audit"):
        return draw(audit_plan(rpc))
    return draw(health_plan(rpc))


# -- turning a plan into bytes --------------------------------------------------------------


def set_time(stamp: Any, spec: TimeSpec, now: datetime) -> None:
    if spec is None:
        return
    seconds = spec.seconds + (int(now.timestamp()) if isinstance(spec, Rel) else 0)
    stamp.seconds = max(-(2**63), min(2**63 - 1, seconds))
    stamp.nanos = spec.nanos


class Forge:
    """What resolving a plan needs: the keys, and what the node already holds."""

    def __init__(self, setups: dict[str, NodeSetup]) -> None:
        self.keys: dict[str, SigningKey] = {
            "attacker": signing_key(setups[ATTACKER]),
            "bystander": signing_key(setups[BYSTANDER]),
            "receiver": signing_key(setups[RECEIVER]),
        }
        self.agency = {"attacker": ATTACKER, "bystander": BYSTANDER, "receiver": RECEIVER}
        self.lock = threading.Lock()
        self.accepted: list[tuple[str, envelope_pb2.Envelope]] = []  # (message id, envelope)
        self.uploaded: list[tuple[bytes, bytes]] = []  # (sha256, data), complete uploads
        self.witness_origin = log_origin(FEDERATION, ATTACKER)

    # pools
    def accepted_id(self, ref: PoolRef) -> str:
        with self.lock:
            return self.accepted[ref.n % len(self.accepted)][0] if self.accepted else uuid7()

    def accepted_envelope(self, n: int) -> envelope_pb2.Envelope | None:
        with self.lock:
            return self.accepted[n % len(self.accepted)][1] if self.accepted else None

    def uploaded_file(self, ref: PoolRef) -> tuple[bytes, bytes] | None:
        with self.lock:
            return self.uploaded[ref.n % len(self.uploaded)] if self.uploaded else None

    def remember_accepted(self, envelope: envelope_pb2.Envelope) -> None:
        try:
            message_id = envelope_pb2.Message.FromString(envelope.payload).message_id
        except DecodeError:
            return
        with self.lock:
            self.accepted.append((message_id, envelope))

    def remember_upload(self, sha256: bytes, data: bytes) -> None:
        with self.lock:
            if all(sha != sha256 for sha, _ in self.uploaded):
                self.uploaded.append((sha256, data))

    # messages
    def _text_or_pool(self, value: str | PoolRef | None, default: str) -> str:
        if value is None:
            return default
        return self.accepted_id(value) if isinstance(value, PoolRef) else value

    def _recipient(self, token: str) -> str:
        return self.agency.get(token, token)

    def message(self, spec: MessageSpec) -> envelope_pb2.Message:
        now = datetime.now(UTC)
        m = envelope_pb2.Message()
        m.message_id = self._text_or_pool(spec.message_id, uuid7())
        m.sender = spec.sender if spec.sender is not None else self.agency[spec.signer]
        default_to = [ATTACKER] if spec.signer == "receiver" else [RECEIVER]
        recipients = (
            default_to if spec.recipients is None else [self._recipient(t) for t in spec.recipients]
        )
        m.recipients.extend(recipients)
        created = Rel(-1) if spec.created_at == "default" else spec.created_at
        set_time(m.created_at, created, now)
        default_reply = "" if BODY_FAMILY[spec.body] != "reply" else self.accepted_id(PoolRef(0))
        m.case_ref = self._text_or_pool(spec.case_ref, "")
        m.in_reply_to = self._text_or_pool(spec.in_reply_to, default_reply)
        m.confidentiality = 2 if spec.confidentiality is None else spec.confidentiality
        set_time(m.deadline, spec.deadline, now)
        for a in spec.attachments:
            if isinstance(a.sha256, PoolRef):  # a file the attacker uploaded before
                held = self.uploaded_file(a.sha256)
                data = held[1] if held else a.data()
                sha = held[0] if held else hashlib.sha256(data).digest()
                size_value = len(data)
            else:
                data = a.data()
                sha = hashlib.sha256(data).digest() if a.sha256 is None else a.sha256
                size_value = len(data)
            m.attachments.add(
                sha256=sha,
                size=size_value if a.size is None else a.size,
                media_type=a.media_type,
                file_name=a.file_name,
            )
        for name, level in spec.field_markings:
            m.field_markings.add(field=name, confidentiality=level)
        m.version_of = self._text_or_pool(spec.version_of, "")
        m.all_recipients.extend(self._recipient(t) for t in spec.all_recipients)
        body = getattr(m, spec.body)
        body.SetInParent()
        for name, value in spec.body_fields:
            f = body.DESCRIPTOR.fields_by_name[name]
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                set_time(getattr(body, name), value, now)
            elif f.is_repeated:
                getattr(body, name).extend(value)
            else:
                setattr(body, name, value)
        return m

    def envelope(self, spec: MessageSpec) -> envelope_pb2.Envelope:
        payload = self.message(spec).SerializeToString(deterministic=True)
        payload = mutate(payload, spec.payload_ops) + spec.unknown
        payload_type = MESSAGE_PAYLOAD_TYPE if spec.payload_type is None else spec.payload_type
        key = self.keys[spec.signer]
        own = sign_envelope(payload, payload_type, key).signatures[0]
        envelope = envelope_pb2.Envelope(payload=payload, payload_type=payload_type)
        for s in spec.signatures:
            if s.kind in ("own", "copy"):
                envelope.signatures.append(own)
            elif s.kind in ("bystander", "receiver"):
                envelope.signatures.append(
                    sign_envelope(payload, payload_type, self.keys[s.kind]).signatures[0]
                )
            else:
                envelope.signatures.add(keyid=s.keyid, sig=s.sig)
        return envelope

    def envelope_of(self, source: EnvelopeSource) -> envelope_pb2.Envelope:
        if isinstance(source, Signed):
            return self.envelope(source.spec)
        if isinstance(source, Resend):
            held = self.accepted_envelope(source.n)
            if held is not None:
                return held
            return self.envelope(MessageSpec("clue"))
        return envelope_pb2.Envelope.FromString(source.data)

    def piece(
        self, piece: Any, upload: tuple[Upload, envelope_pb2.Envelope, bytes, bytes] | None = None
    ) -> bytes:
        """The bytes of one request (or stream item)."""
        if isinstance(piece, Raw):
            return piece.data
        if isinstance(piece, Mutated):
            return mutate(self.piece(piece.base, upload), piece.ops)
        if isinstance(piece, Signed | Resend):
            return self.envelope_of(piece).SerializeToString()
        if isinstance(piece, Query):
            envelope = self.envelope_of(piece.envelope)
            if isinstance(piece.sha256, PoolRef):
                held = self.uploaded_file(piece.sha256)
                sha = held[0] if held else bytes(32)
            elif piece.sha256 is None:
                sha = _first_attachment(envelope)
            else:
                sha = piece.sha256
            return exchange_pb2.AttachmentQuery(envelope=envelope, sha256=sha).SerializeToString()
        if isinstance(piece, Batch):
            envelopes: list[envelope_pb2.Envelope] = []
            for r in piece.requests:
                source = r.envelope
                if isinstance(source, Same | SameId) and not envelopes:
                    source = Signed(MessageSpec("clue"))
                if isinstance(source, Same):
                    envelopes.append(envelopes[source.k % len(envelopes)])
                elif isinstance(source, SameId):
                    earlier = envelopes[source.k % len(envelopes)]
                    try:
                        message_id = envelope_pb2.Message.FromString(earlier.payload).message_id
                    except DecodeError:
                        message_id = uuid7()
                    envelopes.append(self.envelope(replace(source.spec, message_id=message_id)))
                else:
                    envelopes.append(self.envelope_of(source))
            return exchange_pb2.DeliveryBatch(
                requests=[
                    exchange_pb2.DeliveryRequest(seq=r.seq, envelope=e)
                    for r, e in zip(piece.requests, envelopes, strict=True)
                ]
            ).SerializeToString()
        if isinstance(piece, BigBatch):
            envelope = self.envelope(MessageSpec("clue"))
            return exchange_pb2.DeliveryBatch(
                requests=[
                    exchange_pb2.DeliveryRequest(seq=n + 1, envelope=envelope)
                    for n in range(piece.size)
                ]
            ).SerializeToString()
        if isinstance(piece, FirstChunk | DataChunk | Oversize):
            assert upload is not None
            _upload, envelope, sha, data = upload
            if isinstance(piece, Oversize):
                return exchange_pb2.AttachmentChunk(data=b"\x01" * (CHUNK + 1)).SerializeToString()
            if isinstance(piece, DataChunk):
                chunk = (
                    piece.data
                    if isinstance(piece.data, bytes)
                    else data[int(piece.data[0] * len(data)) : int(piece.data[1] * len(data))]
                )
                return exchange_pb2.AttachmentChunk(data=chunk).SerializeToString()
            a, b = piece.data
            return exchange_pb2.AttachmentChunk(
                envelope=envelope if piece.envelope is None else self.envelope_of(piece.envelope),
                sha256=sha if piece.sha256 is None else piece.sha256,
                offset=piece.offset or 0,
                data=data[int(a * len(data)) : int(b * len(data))],
            ).SerializeToString()
        raise TypeError(f"no bytes for {piece!r}")

    def cosignature(self, cosign: Cosign, latest: audit_pb2.SignedCheckpoint) -> bytes:
        body, _ = split_note(bytes(latest.note))
        line = cosign_checkpoint(
            body,
            cosign.origin if cosign.origin is not None else self.witness_origin,
            self.keys["attacker"],
            max(0, min(2**64 - 1, int(time.time()) + cosign.time_offset)),
        )
        size = max(0, latest.size + cosign.size_offset)
        return audit_pb2.AddCosignatureRequest(
            size=size, signature_line=mutate(line, cosign.ops)
        ).SerializeToString()


def _first_attachment(envelope: envelope_pb2.Envelope) -> bytes:
    try:
        message = envelope_pb2.Message.FromString(envelope.payload)
    except DecodeError:
        return bytes(32)
    return message.attachments[0].sha256 if message.attachments else bytes(32)


# -- the report -----------------------------------------------------------------------------


@dataclass
class Violation:
    # status, hang, traceback, unaudited, deliver, receipt, download, health, probe,
    # audit-size, status-size, crash, harness
    kind: str
    detail: str
    rpc: str = ""
    plan: str = ""
    request: str = ""  # the request's size, digest and first bytes (hex)
    size: int = 0  # the request's size

    @property
    def group(self) -> str:
        return f"[{self.kind}] {self.rpc + ': ' if self.rpc else ''}{self.detail[:100]}"

    def line(self) -> str:
        text = f"[{self.kind}] {self.rpc + ': ' if self.rpc else ''}{self.detail}"
        if self.request:
            text += f"\n    request: {self.request}"
        if self.plan:
            text += f"\n    plan: {self.plan}"
        return text


def _request_text(data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()[:16]
    more = "…" if len(data) > 256 else ""
    return f"{len(data)} bytes, sha256 {digest}…, hex {data[:256].hex()}{more}"


@dataclass
class Report:
    backend: str = ""
    seed: int = 0
    examples: int = 0
    calls: int = 0
    seconds: float = 0.0
    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    layers: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)  # by where the entry goes
    audited: Counter[str] = field(default_factory=Counter)
    deliver_batches: int = 0
    deliver_answers: int = 0
    deliver_refused: int = 0  # batches of streams refused whole, at once
    audit_detail_max: int = 0
    health_checks: int = 0
    health_max_seconds: float = 0.0
    probes: int = 0
    violations: dict[str, Violation] = field(default_factory=dict)  # by group
    violation_groups: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)  # "rpc status": first message
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, rpc: str, status: str, details: str = "") -> None:
        with self.lock:
            self.counts[rpc][status] += 1
            self.samples.setdefault(f"{rpc} {status}", details[:300])

    def violation(self, violation: Violation) -> None:
        """Counted by group (kind, RPC, the start of the detail); each group keeps the
        example with the smallest request: the reproducer to report."""
        with self.lock:
            group = violation.group
            self.violation_groups[group] += 1
            kept = self.violations.get(group)
            if kept is None or (violation.size, len(violation.plan)) < (kept.size, len(kept.plan)):
                self.violations[group] = violation

    @property
    def violation_count(self) -> int:
        return sum(self.violation_groups.values())

    @property
    def totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for rpc, statuses in self.counts.items():
            if not rpc.endswith("(items)"):
                total.update(statuses)
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "seed": self.seed,
            "examples": self.examples,
            "calls": self.calls,
            "seconds": round(self.seconds, 1),
            "counts": {rpc: dict(sorted(c.items())) for rpc, c in sorted(self.counts.items())},
            "totals": dict(sorted(self.totals.items())),
            "layers": dict(sorted(self.layers.items())),
            "refusals": dict(self.refusals),
            "audited": dict(self.audited),
            "deliver_batches": self.deliver_batches,
            "deliver_answers": self.deliver_answers,
            "deliver_refused": self.deliver_refused,
            "audit_detail_max": self.audit_detail_max,
            "health_checks": self.health_checks,
            "health_max_seconds": round(self.health_max_seconds, 3),
            "probes": self.probes,
            "violations": [
                {"count": self.violation_groups[g], **{k: x for k, x in vars(v).items() if x}}
                for g, v in sorted(self.violations.items())
            ],
            "samples": dict(sorted(self.samples.items())),
        }

    def text(self, samples: bool = False) -> str:
        statuses = sorted({s for c in self.counts.values() for s in c})
        width = max(len(r) for r in self.counts) if self.counts else 10
        lines = [
            f"fuzz run: backend {self.backend}, seed {self.seed}, {self.examples} examples, "
            f"{self.calls} calls in {self.seconds:.1f} s",
            "",
            f"{'rpc':<{width}}  " + "  ".join(f"{s:>{max(len(s), 5)}}" for s in statuses),
        ]
        for rpc in sorted(self.counts):
            c = self.counts[rpc]
            lines.append(
                f"{rpc:<{width}}  "
                + "  ".join(f"{c.get(s, 0) or '':>{max(len(s), 5)}}" for s in statuses)
            )
        totals = self.totals
        lines += [
            f"{'all calls':<{width}}  "
            + "  ".join(f"{totals.get(s, 0) or '':>{max(len(s), 5)}}" for s in statuses),
            "",
            "layers: " + ", ".join(f"{k} {v}" for k, v in sorted(self.layers.items())),
            "refusals received: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.refusals.items()))
            + "; audit entries: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.audited.items())),
            f"Deliver: {self.deliver_batches} batches sent, {self.deliver_answers} answered, "
            f"{self.deliver_refused} on streams refused at once; longest refusal audit detail "
            f"{self.audit_detail_max} bytes",
            f"health: {self.health_checks} checks, max latency "
            f"{self.health_max_seconds * 1000:.0f} ms; legitimate messages during the run: "
            f"{self.probes}",
            f"violations: {self.violation_count}"
            + (f" in {len(self.violations)} groups" if self.violations else ""),
        ]
        for group, violation in sorted(self.violations.items()):
            lines.append(f"{self.violation_groups[group]} x {violation.line()}")
        if samples:
            lines += ["", "the first message of each status, per RPC:"]
            lines += [f"  {k}: {v!r}" for k, v in sorted(self.samples.items()) if v]
        return "\n".join(lines)


# -- running the calls ---------------------------------------------------------------------


def _raw(data: bytes) -> bytes:
    return data


CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def member_channel(setup: NodeSetup, target: NodeSetup) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(setup.directory / "ca.crt").read_bytes(),
        private_key=(setup.directory / "keys" / "tls.key").read_bytes(),
        certificate_chain=(setup.directory / "tls.crt").read_bytes(),
    )
    return grpc.secure_channel(target.endpoint, credentials, options=CHANNEL_OPTIONS)


def _over_grpc_cap(status: str, details: str) -> bool:
    return status == "RESOURCE_EXHAUSTED" and "Received message larger than max" in details


def _status(error: grpc.RpcError) -> tuple[str, str]:
    return error.code().name, error.details() or ""


class Runner:
    """Sends plans to the node as the attacker, and checks every answer."""

    def __init__(self, node: NodeProcess, setups: dict[str, NodeSetup], report: Report) -> None:
        self.node = node
        self.target = node.setup
        self.setups = setups
        self.report = report
        self.forge = Forge(setups)
        self.channel = member_channel(setups[ATTACKER], self.target)
        self.receiver_keys = {
            self.forge.keys["receiver"].key_id: self.forge.keys["receiver"].private_key.public_key()
        }

    def close(self) -> None:
        self.channel.close()

    # -- one call, whatever its shape --------------------------------------------------

    def _record(self, rpc: Rpc, status: str, details: str, plan: Plan, request: bytes) -> None:
        label = "RESOURCE_EXHAUSTED(gRPC cap)" if _over_grpc_cap(status, details) else status
        self.report.count(rpc.label, label, details)
        with self.report.lock:
            self.report.calls += 1
        if status == "OK":
            return
        if status == "DEADLINE_EXCEEDED" and not details.startswith("no request arrived"):
            self.report.violation(
                Violation(
                    "hang",
                    f"no answer within {CALL_TIMEOUT:g} s",
                    rpc.label,
                    _plan_text(plan),
                    _request_text(request),
                    len(request),
                )
            )
            return
        if status not in DOCUMENTED or (
            status == "UNAVAILABLE" and "already in progress" not in details
        ):
            # A bug (INTERNAL, UNKNOWN) or the transport failing: never audited, so it is
            # reported as what it is rather than also as an unaudited refusal.
            self.report.violation(
                Violation(
                    "status",
                    f"{status}: {details[:500]}",
                    rpc.label,
                    _plan_text(plan),
                    _request_text(request),
                    len(request),
                )
            )
            return
        if _over_grpc_cap(status, details):
            return  # gRPC's own cap, before the node: documented as not audited (section 6)
        if rpc.name == "Check" and status == "NOT_FOUND" and not details:
            return  # the health protocol's answer for a service it does not know
        if len(details.encode()) > MAX_REASON:
            self.report.violation(
                Violation(
                    "status-size",
                    f"{len(details.encode())} bytes of status message",
                    rpc.label,
                    _plan_text(plan),
                    _request_text(request),
                    len(request),
                )
            )
        where = "audit_query" if rpc.service.endswith("Audit") else "rejected"
        with self.report.lock:
            self.report.refusals[where] += 1

    def unary(self, rpc: Rpc, data: bytes, plan: Plan) -> bytes | None:
        call = self.channel.unary_unary(
            rpc.path, request_serializer=_raw, response_deserializer=_raw
        )
        try:
            answer: bytes = call(data, timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            self._record(rpc, *_status(error), plan, data)
            return None
        self._record(rpc, "OK", "", plan, data)
        return answer

    def server_stream(self, rpc: Rpc, data: bytes, plan: Plan) -> list[bytes] | None:
        call = self.channel.unary_stream(
            rpc.path, request_serializer=_raw, response_deserializer=_raw
        )
        answers: list[bytes] = []
        responses = call(data, timeout=CALL_TIMEOUT)
        try:
            for answer in responses:
                answers.append(answer)
                if rpc.name == "Watch":  # an endless stream: its first answer is the answer
                    responses.cancel()
                    self._record(rpc, "OK", "", plan, data)
                    return answers
        except grpc.RpcError as error:
            self._record(rpc, *_status(error), plan, data)
            return None
        self._record(rpc, "OK", "", plan, data)
        return answers

    def silent(self, rpc: Rpc, plan: Plan) -> None:
        """Open the call, send nothing for longer than the node waits, then close."""
        done = threading.Event()

        def nothing() -> Iterator[bytes]:
            done.wait(FIRST_MESSAGE_SECONDS + 1.0)
            yield from ()

        if rpc.server_streaming:
            call = self.channel.stream_stream(
                rpc.path, request_serializer=_raw, response_deserializer=_raw
            )
            try:
                list(call(nothing(), timeout=CALL_TIMEOUT))
                self._record(rpc, "OK", "", plan, b"")
            except grpc.RpcError as error:
                self._record(rpc, *_status(error), plan, b"")
        else:
            unary = self.channel.stream_unary(
                rpc.path, request_serializer=_raw, response_deserializer=_raw
            )
            try:
                unary(nothing(), timeout=CALL_TIMEOUT)
                self._record(rpc, "OK", "", plan, b"")
            except grpc.RpcError as error:
                self._record(rpc, *_status(error), plan, b"")
        done.set()

    def idle(self, plan: Plan) -> None:
        """A Deliver stream and an upload that send something, then nothing for longer than
        the node's idle limit: each is ended as if closed (the batch answered, the bytes held
        counted), with OK."""
        deliver, upload = BY_NAME["Deliver"], BY_NAME["UploadAttachment"]
        batch = Batch((Request(1, Signed(MessageSpec("clue"))),))
        self.deliver(deliver, Plan("Deliver", "idle", (batch, Pause(IDLE_SECONDS + 1.0))))
        files = (AttachmentSpec(data_seed=int(time.time() * 1000), data_size=4096),)
        spec = MessageSpec("clue", attachments=files)
        items = (FirstChunk(data=(0.0, 0.5)), Pause(IDLE_SECONDS + 1.0))
        self.upload(upload, Plan("UploadAttachment", "idle", (Upload(spec, 0, items),)))

    def burst(self, plan: Plan) -> None:
        """More calls (or streams) open at once than the attacker's share: the ones over it
        are refused at once (RESOURCE_EXHAUSTED, audited), the others answered."""
        streams = plan.layer == "burst-streams"
        rpc = BY_NAME["Deliver" if streams else "TransferClue"]
        count = (PEER_STREAMS if streams else PEER_CALLS) + 2
        release = threading.Event()
        requests = []
        for n in range(count):
            envelope = self.forge.envelope(MessageSpec("clue"))
            data = (
                exchange_pb2.DeliveryBatch(
                    requests=[exchange_pb2.DeliveryRequest(seq=n + 1, envelope=envelope)]
                ).SerializeToString()
                if streams
                else envelope.SerializeToString()
            )
            requests.append(data)

        def held(data: bytes) -> Iterator[bytes]:
            release.wait(FIRST_MESSAGE_SECONDS / 2)
            yield data

        def one(data: bytes) -> None:
            if streams:
                self.deliver(rpc, Plan(rpc.name, plan.layer, (Raw(data),)), held(data))
                return
            call = self.channel.stream_unary(
                rpc.path, request_serializer=_raw, response_deserializer=_raw
            )
            try:
                answer = call(held(data), timeout=CALL_TIMEOUT)
            except grpc.RpcError as error:
                self._record(rpc, *_status(error), plan, data)
                return
            self._record(rpc, "OK", "", plan, data)
            receipt = exchange_pb2.DeliveryReceipt.FromString(answer).receipt
            self.check_receipt(rpc, data, receipt, plan)

        threads = [threading.Thread(target=one, args=(data,)) for data in requests]
        for thread in threads:
            thread.start()
        time.sleep(FIRST_MESSAGE_SECONDS / 4)
        release.set()
        for thread in threads:
            thread.join()

    # -- the plans ------------------------------------------------------------------------

    def run(self, plan: Plan) -> None:
        rpc = BY_NAME[plan.rpc]
        with self.report.lock:
            self.report.layers[plan.layer] += 1
        if plan.silent:
            self.silent(rpc, plan)
        elif plan.layer == "idle":
            self.idle(plan)
        elif plan.layer.startswith("burst"):
            self.burst(plan)
        elif plan.rpc in FAMILY_RPCS:
            data = self.forge.piece(plan.items[0])
            answer = self.unary(rpc, data, plan)
            if answer is not None:
                self.check_receipt(
                    rpc, data, exchange_pb2.DeliveryReceipt.FromString(answer).receipt, plan
                )
        elif plan.rpc == "Deliver":
            self.deliver(rpc, plan)
        elif plan.rpc == "UploadAttachment":
            self.upload(rpc, plan)
        elif plan.rpc == "QueryAttachment":
            self.unary(rpc, self.forge.piece(plan.items[0]), plan)
        elif plan.rpc == "DownloadAttachment":
            self.download(rpc, self.forge.piece(plan.items[0]), plan)
        elif rpc.service.endswith("Audit"):
            self.audit(rpc, plan)
        elif plan.rpc == "Check":
            self.unary(rpc, self.forge.piece(plan.items[0]), plan)
        else:
            self.server_stream(rpc, self.forge.piece(plan.items[0]), plan)

    def check_receipt(
        self, rpc: Rpc, request: bytes, receipt: envelope_pb2.Envelope, plan: Plan
    ) -> None:
        """An accepted envelope: its receipt must be the node's, for this very envelope."""
        try:
            envelope = envelope_pb2.Envelope.FromString(request)
            verify_envelope(receipt, RECEIPT_PAYLOAD_TYPE, self.receiver_keys)
            body = envelope_pb2.Receipt.FromString(receipt.payload)
            message = envelope_pb2.Message.FromString(envelope.payload)
            problem = ""
            if body.envelope_sha256 != envelope_digest(envelope):
                problem = "the receipt names another envelope digest"
            elif body.message_id != message.message_id:
                problem = f"the receipt names message {body.message_id!r}"
            elif (body.sender, body.receiver) != (ATTACKER, RECEIVER):
                problem = f"the receipt names {body.sender!r} -> {body.receiver!r}"
        except (DecodeError, EnvelopeError) as error:
            problem = f"unreadable receipt: {error}"
        if problem:
            self.report.violation(
                Violation(
                    "receipt",
                    problem,
                    rpc.label,
                    _plan_text(plan),
                    _request_text(request),
                    len(request),
                )
            )
        else:
            self.forge.remember_accepted(envelope)

    def deliver(self, rpc: Rpc, plan: Plan, source: Iterator[bytes] | None = None) -> None:
        """A Deliver stream of the plan's items (sent by `source` if given): each batch must
        get one answer with one result per request."""
        items: list[bytes | Pause] = [
            i if isinstance(i, Pause) else self.forge.piece(i) for i in plan.items
        ]
        batches = [i for i in items if isinstance(i, bytes)]
        # Results per answer: one per request; one (seq 0) for garbage or a batch over
        # MAX_BATCH requests, refused whole before its requests are read.
        expected: list[int] = []
        for data in batches:
            try:
                count = len(exchange_pb2.DeliveryBatch.FromString(data).requests)
            except DecodeError:
                count = 1
            expected.append(1 if count > MAX_BATCH else count)

        def requests() -> Iterator[bytes]:
            for item in items:
                if isinstance(item, Pause):
                    time.sleep(item.seconds)
                else:
                    yield item

        call = self.channel.stream_stream(
            rpc.path, request_serializer=_raw, response_deserializer=_raw
        )
        answers: list[exchange_pb2.DeliveryResults] = []
        status, details = "OK", ""
        try:
            for answer in call(source or requests(), timeout=CALL_TIMEOUT):
                answers.append(exchange_pb2.DeliveryResults.FromString(answer))
        except grpc.RpcError as error:
            status, details = _status(error)
        joined = b"".join(batches)
        self._record(rpc, status, details, plan, joined)
        with self.report.lock:
            self.report.deliver_batches += len(batches)
            self.report.deliver_answers += len(answers)
        # Refused whole when it arrived, or cut off by gRPC's size cap (section 6: that ends
        # the stream): the batches that got no answer are accounted for by the status.
        refused_at_once = (status != "OK" and not answers) or _over_grpc_cap(status, details)
        if refused_at_once:
            with self.report.lock:
                self.report.deliver_refused += len(batches)
        if not refused_at_once and sorted(len(a.results) for a in answers) != sorted(expected):
            self.report.violation(
                Violation(
                    "deliver",
                    f"{len(batches)} batches of {expected} requests got {len(answers)} answers "
                    f"of {[len(a.results) for a in answers]} results (stream ended {status} "
                    f"{details[:200]})",
                    rpc.label,
                    _plan_text(plan),
                    _request_text(joined),
                    len(joined),
                )
            )
        envelopes: dict[int, list[envelope_pb2.Envelope]] = defaultdict(list)
        for data in batches:
            with contextlib.suppress(DecodeError):
                for r in exchange_pb2.DeliveryBatch.FromString(data).requests:
                    envelopes[r.seq].append(r.envelope)
        for answer in answers:
            for result in answer.results:
                name = CODE_NAMES.get(result.code, f"code {result.code}")
                self.report.count("Exchange.Deliver (items)", name, result.message)
                if name not in DOCUMENTED or name == "UNAVAILABLE":
                    self.report.violation(
                        Violation(
                            "status",
                            f"item seq {result.seq}: {name}: {result.message[:500]}",
                            rpc.label,
                            _plan_text(plan),
                            _request_text(joined),
                            len(joined),
                        )
                    )
                if result.code == 0:
                    candidates = envelopes.get(result.seq, [])
                    if len(candidates) == 1:
                        self.check_receipt(
                            rpc, candidates[0].SerializeToString(), result.receipt, plan
                        )
                else:
                    with self.report.lock:
                        self.report.refusals["rejected"] += 1

    def upload(self, rpc: Rpc, plan: Plan) -> None:
        item = plan.items[0] if plan.items else None
        if not isinstance(item, Upload):  # raw items, or none
            chunks = [self.forge.piece(i) for i in plan.items]
            self._upload_call(rpc, chunks, plan, None)
            return
        envelope = self.forge.envelope(item.spec)
        target = item.spec.attachments[item.target]
        data = target.data()
        sha = hashlib.sha256(data).digest()
        with contextlib.suppress(DecodeError):
            refs = envelope_pb2.Message.FromString(envelope.payload).attachments
            sha = refs[item.target].sha256 if len(refs) > item.target else sha
        context = (item, envelope, sha, data)
        chunks = [i if isinstance(i, Pause) else self.forge.piece(i, context) for i in item.items]
        complete = self._upload_call(rpc, chunks, plan, (sha, data))
        for step in item.then:
            if step == "query":
                query = exchange_pb2.AttachmentQuery(envelope=envelope, sha256=sha)
                self.unary(BY_NAME["QueryAttachment"], query.SerializeToString(), plan)
            elif step == "deliver":
                family_rpc = BY_NAME[_body_rpc(item.spec.body)]
                request = envelope.SerializeToString()
                answer = self.unary(family_rpc, request, plan)
                if answer is not None:
                    self.check_receipt(
                        family_rpc,
                        request,
                        exchange_pb2.DeliveryReceipt.FromString(answer).receipt,
                        plan,
                    )
            elif step == "download" and complete:
                spec = MessageSpec("notice", signer="receiver", attachments=(target,))
                forged = self.forge.envelope(spec)
                query = exchange_pb2.AttachmentQuery(envelope=forged, sha256=sha)
                self.download(BY_NAME["DownloadAttachment"], query.SerializeToString(), plan)

    def _upload_call(
        self, rpc: Rpc, chunks: list[Any], plan: Plan, file: tuple[bytes, bytes] | None
    ) -> bool:
        def requests() -> Iterator[bytes]:
            for chunk in chunks:
                if isinstance(chunk, Pause):
                    time.sleep(chunk.seconds)
                else:
                    yield chunk

        call = self.channel.stream_unary(
            rpc.path, request_serializer=_raw, response_deserializer=_raw
        )
        joined = b"".join(c for c in chunks if isinstance(c, bytes))
        try:
            answer = call(requests(), timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            self._record(rpc, *_status(error), plan, joined)
            return False
        self._record(rpc, "OK", "", plan, joined)
        status = exchange_pb2.AttachmentStatus.FromString(answer)
        if status.complete and file is not None and status.sha256 == file[0]:
            if hashlib.sha256(file[1]).digest() == file[0]:
                self.forge.remember_upload(*file)
            return True
        return False

    def download(self, rpc: Rpc, data: bytes, plan: Plan) -> None:
        chunks = self.server_stream(rpc, data, plan)
        if not chunks:
            return
        received = b"".join(exchange_pb2.AttachmentChunk.FromString(c).data for c in chunks)
        sha = exchange_pb2.AttachmentQuery.FromString(data).sha256
        if hashlib.sha256(received).digest() != sha:
            self.report.violation(
                Violation(
                    "download",
                    f"{len(received)} bytes downloaded do not match {sha.hex()[:16]}…",
                    rpc.label,
                    _plan_text(plan),
                    _request_text(data),
                    len(data),
                )
            )

    def audit(self, rpc: Rpc, plan: Plan) -> None:
        piece = plan.items[0]
        base = piece.base if isinstance(piece, Mutated) else piece
        if isinstance(base, AuditAsk | Cosign):
            latest_answer = self.unary(BY_NAME["GetCheckpoint"], b"", plan)
            latest = (
                audit_pb2.SignedCheckpoint.FromString(latest_answer)
                if latest_answer is not None
                else audit_pb2.SignedCheckpoint()
            )
            if isinstance(base, Cosign):
                data = self.forge.cosignature(base, latest) if latest.note else b""
            else:
                request = rpc.request()
                for name, value in base.fields:
                    if isinstance(value, PoolRef):
                        value = self.forge.accepted_id(value)
                    setattr(request, name, value)
                for name, offset in base.relative:
                    bits = 32 if name == "limit" else 64
                    setattr(request, name, max(0, min(2**bits - 1, latest.size + offset)))
                data = request.SerializeToString()
            if isinstance(piece, Mutated):
                data = mutate(data, piece.ops)
        else:
            data = self.forge.piece(piece)
        self.unary(rpc, data, plan)


def _plan_text(plan: Plan, limit: int = 1500) -> str:
    text = repr(plan)
    return text if len(text) <= limit else text[:limit] + f"…[{len(text)} chars]"


# -- watching the node while it is fuzzed --------------------------------------------------


class Monitor:
    """Health checks from another member every ~0.5 s, and a legitimate message from it
    every few seconds; both must always be answered."""

    def __init__(self, node: NodeProcess, setups: dict[str, NodeSetup], report: Report) -> None:
        self.node = node
        self.setups = setups
        self.report = report
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="fuzz-health", daemon=True)
        self.key = signing_key(setups[BYSTANDER])
        receiver = signing_key(setups[RECEIVER])
        self.receiver_keys = {receiver.key_id: receiver.private_key.public_key()}

    def __enter__(self) -> Monitor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _watch(self) -> None:
        with member_channel(self.setups[BYSTANDER], self.node.setup) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            last_probe = time.monotonic()
            while not self.stop.wait(HEALTH_EVERY):
                started = time.monotonic()
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT)
                    problem = (
                        ""
                        if answer.status == health_pb2.HealthCheckResponse.SERVING
                        else f"health answered {answer.status}"
                    )
                except grpc.RpcError as error:
                    problem = f"health check failed: {error.code().name}: {error.details()}"
                latency = time.monotonic() - started
                with self.report.lock:
                    self.report.health_checks += 1
                    self.report.health_max_seconds = max(self.report.health_max_seconds, latency)
                if problem:
                    self.report.violation(Violation("health", problem))
                if time.monotonic() - last_probe >= PROBE_EVERY:
                    last_probe = time.monotonic()
                    problem = legitimate_message(channel, self.key, self.receiver_keys)
                    if problem:
                        self.report.violation(Violation("probe", problem))
                    else:
                        with self.report.lock:
                            self.report.probes += 1


def legitimate_message(
    channel: grpc.Channel, key: SigningKey, receiver_keys: dict[str, Any]
) -> str:
    """Send a clue from the bystander; "" when it was received with a valid receipt."""
    envelope = sign(clue_message(BYSTANDER, [RECEIVER]), key)
    try:
        answer = exchange_pb2_grpc.ExchangeStub(channel).TransferClue(envelope, timeout=30)
        verify_envelope(answer.receipt, RECEIPT_PAYLOAD_TYPE, receiver_keys)
    except grpc.RpcError as error:
        return f"a legitimate message was refused: {error.code().name}: {error.details()}"
    except EnvelopeError as error:
        return f"a legitimate message got a bad receipt: {error}"
    body = envelope_pb2.Receipt.FromString(answer.receipt.payload)
    if body.envelope_sha256 != envelope_digest(envelope) or body.receiver != RECEIVER:
        return "a legitimate message got a receipt for something else"
    return ""


# -- a whole run ------------------------------------------------------------------------------


_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b")


def log_problems(text: str) -> list[str]:
    """One line per log line with "Traceback" or "internal error": where (the RPC or the
    log event) and the exception's last line, so that one defect makes one group."""
    problems = []
    for line in text.splitlines():
        if "Traceback" not in line and "internal error" not in line:
            continue
        try:
            fields = json.loads(line)
        except ValueError:
            problems.append(line[:300])
            continue
        exception = str(fields.get("exception") or fields.get("error") or "")
        raised = [x for x in exception.splitlines() if _RAISED.match(x)]
        last = raised[-1] if raised else exception.strip()[-300:]
        where = fields.get("rpc") or fields.get("event")
        problems.append(f"{where}: {fields.get('event')}: {last[:300]}")
    return problems


def _count_entries(setup: NodeSetup) -> int:
    return int(database_rows(setup, "SELECT count(*) FROM audit_entries")[0][0])


def _count_refusal_entries(setup: NodeSetup) -> int:
    """Refusal entries so far (the bystander's probes go on adding others meanwhile)."""
    query = "SELECT count(*) FROM audit_entries WHERE event IN ('rejected', 'audit_query')"
    return int(database_rows(setup, query)[0][0])


def _refusals_in(entry: dict[str, Any]) -> int:
    """How many refusals an entry stands for: one, or a summary's count (past a caller's
    audit budget the node counts refusals of a kind: node.audit.refusals)."""
    counted = COUNTED.match(entry.get("detail", ""))
    return int(counted.group(1)) if counted else 1


def _refusal_entries(setup: NodeSetup, start: int) -> list[dict[str, Any]]:
    rows = database_rows(
        setup,
        "SELECT entry FROM audit_entries WHERE event IN ('rejected', 'audit_query') "
        f"AND idx >= {int(start)} ORDER BY idx",
    )
    return [json.loads(row[0]) for row in rows]


def _settle(setup: NodeSetup, seconds: float = 60.0) -> None:
    """Wait until the audit log stops growing (the last refusals are written after the
    answers went out, and those past a caller's budget only at the node's next flush)."""
    deadline = time.monotonic() + seconds
    last, stable_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = _count_refusal_entries(setup)
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= FLUSH_SECONDS + 1.5:
            return
        time.sleep(0.25)


def _signed(rpc: str, **fields: Any) -> Plan:
    body = fields.pop("body", "clue")
    return Plan(rpc, "known", (Signed(MessageSpec(body, **fields)),))


def _audit(rpc: str, *fields: tuple[str, Any]) -> Plan:
    return Plan(rpc, "known", (AuditAsk(rpc, fields),))


# A fixed corpus sent first in every run: the classes of issue 13 and what earlier runs
# found, so that each stays defended whatever the seed draws.
KNOWN: tuple[Plan, ...] = (
    *(Plan(r.name, "known", (Raw(b"\xff\xff\xff\x07"),)) for r in RPCS if not r.client_streaming),
    Plan("List", "known", (Raw(b""),)),
    Plan(
        "Deliver",
        "known",
        (
            Batch((Request(1, Signed(MessageSpec("clue"))),)),
            Raw(b"\xff"),
            Batch((Request(2, Signed(MessageSpec("clue"))),)),
        ),
    ),
    Plan("Deliver", "known", (BigBatch(MAX_BATCH + 1),)),
    Plan("UploadAttachment", "known", ()),
    Plan("UploadAttachment", "known", (Raw(b"\xff\xff\xff"),)),
    Plan(
        "UploadAttachment",
        "known",
        (
            Upload(
                MessageSpec("clue", attachments=(AttachmentSpec(7, 1000),)),
                0,
                (FirstChunk(data=(0.0, 0.01)), Raw(b"\xff\xff\xff")),
            ),
        ),
    ),
    _signed("TransferClue", case_ref="\x00"),
    _signed("TransferClue", body_fields=(("facts", "a\x00b"),)),
    _signed("TransferClue", version_of="\x00"),
    _signed("TransferClue", case_ref="案" * 129),
    _signed("TransferClue", in_reply_to="y" * 40),
    _signed("TransferClue", recipients=("receiver", "receiver")),
    _signed("TransferClue", sender=RECEIVER, recipients=("receiver",)),
    _signed("TransferClue", attachments=(AttachmentSpec(1, 10, file_name="a" * 358 + ".pdf"),)),
    _signed("TransferClue", attachments=(AttachmentSpec(1, 10, file_name="../../etc/cron.d/x"),)),
    _signed("TransferClue", attachments=(AttachmentSpec(1, 10, file_name="a\rb.pdf"),)),
    _signed("TransferClue", payload_type="\n" + "类" * 100_000),
    _signed("TransferClue", signatures=(SigSpec("random", "k" * 100_000, bytes(64)),) * 4),
    _signed("TransferClue", signatures=(SigSpec("own"),) * 5),
    _signed("Reply", body="feedback", body_fields=(("status", "\x00"),)),
    _signed("Reply", body="feedback", body_fields=(("status", "not_filed"),), in_reply_to="x" * 36),
    _audit("GetInclusionProof", ("message_id", "a\x00b")),
    _audit("GetInclusionProof", ("message_id", "案" * 100_000)),
    _audit("GetInclusionProof", ("index", 2**64 - 1)),
    _audit("GetEntries", ("start", 2**64 - 1), ("limit", 2**32 - 1)),
    _audit("GetCheckpoint", ("size", 2**64 - 1)),
    _audit("GetConsistencyProof", ("old_size", 2**64 - 1), ("new_size", 2**64 - 1)),
    Plan(
        "AddCosignature",
        "known",
        (
            Raw(
                audit_pb2.AddCosignatureRequest(
                    size=1, signature_line=b"\x00" * 1000
                ).SerializeToString()
            ),
        ),
    ),
    Plan(
        "Check",
        "known",
        (Raw(health_pb2.HealthCheckRequest(service="\x00" * 1000).SerializeToString()),),
    ),
    Plan(
        "Watch",
        "known",
        (Raw(health_pb2.HealthCheckRequest(service="案" * 100_000).SerializeToString()),),
    ),
)


def _generate(rpc: Rpc, count: int, seed: int, submit: Callable[[Plan], None]) -> None:
    """Draw `count` plans for `rpc` with hypothesis (seeded, no shrinking, no database)."""

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        derandomize=False,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(plan_for(rpc))
    def send(plan: Plan) -> None:
        submit(plan)

    send()


def run_fuzz(
    node: NodeProcess,
    setups: dict[str, NodeSetup],
    *,
    examples: int,
    seed: int,
    backend: str = "",
    workers: int = 2,
    special_every: int = 150,
    round_size: int = 50,
    known: bool = True,
    progress: Callable[[Report], None] | None = None,
) -> Report:
    """Fuzz `node` (which must run with FUZZ_LIMITS) with `examples` drawn cases; check it."""
    report = Report(backend=backend, seed=seed)
    runner = Runner(node, setups, report)
    log_start = node.log_path.stat().st_size if node.log_path.exists() else 0
    entries_start = _count_entries(node.setup)
    slots = threading.Semaphore(workers)
    started = time.monotonic()

    def one(plan: Plan) -> None:
        try:
            runner.run(plan)
        except BaseException as error:  # a bug in the harness: reported, never hidden
            report.violation(Violation("harness", f"{error!r}", plan.rpc, _plan_text(plan)))
        finally:
            slots.release()

    drawn = 0

    def submit(plan: Plan) -> None:
        nonlocal drawn
        slots.acquire()
        with report.lock:
            report.examples += 1
            if plan.layer != "known":
                drawn += 1
                if special_every and drawn % special_every == special_every // 2:
                    kind = SPECIALS[(drawn // special_every) % len(SPECIALS)]
                    plan = Plan(plan.rpc, kind, (), silent=kind == "silent")
        pool.submit(one, plan)
        if progress is not None and report.examples % 500 == 0:
            progress(report)

    with Monitor(node, setups, report), ThreadPoolExecutor(workers) as pool:
        # Rounds in which every RPC gets its share in turn (hypothesis's own choice of RPC
        # would cluster), each a hypothesis run with a seed of its own.
        left = {
            rpc.name: examples // len(RPCS) + (n < examples % len(RPCS))
            for n, rpc in enumerate(RPCS)
        }
        if known:
            for plan in KNOWN:
                submit(plan)
        round_number = 0
        while any(left.values()):
            for n, rpc in enumerate(RPCS):
                count = min(left[rpc.name], round_size)
                if count:
                    _generate(rpc, count, seed * 1_000_003 + round_number * len(RPCS) + n, submit)
                    left[rpc.name] -= count
            round_number += 1
        pool.shutdown(wait=True)
        _settle(node.setup)
    report.seconds = time.monotonic() - started

    if node.process is not None and node.process.poll() is not None:
        report.violation(Violation("crash", f"the node exited with {node.process.returncode}"))
    with node.log_path.open("rb") as log:
        log.seek(log_start)
        text = log.read().decode("utf-8", "replace")
    for problem in log_problems(text):
        report.violation(Violation("traceback", problem))
    new = _refusal_entries(node.setup, entries_start)
    report.audited["rejected"] = sum(_refusals_in(e) for e in new if e["event"] == "rejected")
    report.audited["audit_query"] = sum(
        _refusals_in(e)
        for e in new
        if e["event"] == "audit_query" and " refused: " in e.get("detail", "")
    )
    for where in ("rejected", "audit_query"):
        if report.refusals[where] != report.audited[where]:
            report.violation(
                Violation(
                    "unaudited",
                    f"{report.refusals[where]} refusals received, {report.audited[where]} "
                    f"'{where}' refusal entries written",
                )
            )
    details = [len(e.get("detail", "").encode()) for e in new]
    report.audit_detail_max = max(details, default=0)
    oversized = [e for e, size in zip(new, details, strict=True) if size > MAX_AUDIT_DETAIL]
    if oversized:
        e = oversized[0]
        report.violation(
            Violation(
                "audit-size",
                f"{len(oversized)} new {sorted({x['event'] for x in oversized})} entries over "
                f"{MAX_AUDIT_DETAIL} bytes of detail; the first: {e['event']} of "
                f"{len(e['detail'].encode())} bytes: {e['detail'][:200]!r}…",
            )
        )
    with member_channel(setups[BYSTANDER], node.setup) as channel:
        problem = legitimate_message(channel, runner.forge.keys["bystander"], runner.receiver_keys)
    if problem:
        report.violation(Violation("probe", f"after the run: {problem}"))
    runner.close()
    return report


def federation_setups(setups: Sequence[NodeSetup]) -> dict[str, NodeSetup]:
    return {s.agency: s for s in setups}
