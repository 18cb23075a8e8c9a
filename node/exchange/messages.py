"""Composing messages from local drafts, and reading them back."""

from __future__ import annotations

import calendar
import functools
import itertools
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.timestamp_pb2 import Timestamp

from node._pb.liandong.v1 import envelope_pb2
from node.exchange.errors import ExchangeError, Reason, shown
from node.exchange.families import BODY_FAMILIES, FAMILY_BODIES, default_body_type
from node.identity import IdentityError, validate_agency_id
from node.plugin_api import cleared, most_restricted

MAX_TIMESTAMP_SECONDS = 253402300800  # 10000-01-01T00:00:00Z, protobuf Timestamp's bound
# \Z, not $: "$" also matches before a final newline, and a 37-character id would then fail
# the database column instead of getting INVALID_ARGUMENT.
# Attachments one message may list: a case file of photos runs to hundreds; a bound keeps
# the receiver's per-message work (and its database queries) small.
MAX_ATTACHMENTS = 1000
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")

# What a receiver must be able to store (docs/protocol.md section 5, check 4 of section 6).
# An attachment's file name becomes a file in the local system's folder: at most this many
# UTF-8 bytes, leaving room within a file system's 255 for the "-N" a folder adds to a second
# file of the same name and for a temporary name beside it.
MAX_FILE_NAME_BYTES = 200
# No path separators, no control characters (C0, DEL, C1; NUL among them).
_BAD_FILE_NAME_CHARS = re.compile(r"[/\\\x00-\x1f\x7f-\x9f]")
MAX_CASE_REF_CHARS = 128  # messages.case_ref, String(128)
# Message.all_recipients: far more than any submission has; checked before each id is read.
MAX_ALL_RECIPIENTS = 256
# Attachment sizes are stored as signed 64-bit integers.
MAX_ATTACHMENT_SIZE = (1 << 63) - 1

CONFIDENTIALITY_NAMES: dict[str, int] = {
    "public": envelope_pb2.CONFIDENTIALITY_PUBLIC,
    "internal": envelope_pb2.CONFIDENTIALITY_INTERNAL,
    "confidential": envelope_pb2.CONFIDENTIALITY_CONFIDENTIAL,
}
CONFIDENTIALITY_LABELS = {value: name for name, value in CONFIDENTIALITY_NAMES.items()}


def marking_label(confidentiality: str, field_markings: Mapping[str, str]) -> str:
    """How a marking reads in a table: ``internal`` or ``internal; confidential: suspect``."""
    if not field_markings:
        return confidentiality
    by_marking: dict[str, list[str]] = {}
    for name, marking in sorted(field_markings.items()):
        by_marking.setdefault(marking, []).append(name)
    parts = [f"{marking}: {', '.join(names)}" for marking, names in sorted(by_marking.items())]
    return "; ".join([confidentiality, *parts])


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then randomness; sorts by time."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


@dataclass(frozen=True)
class AttachmentInput:
    sha256: bytes
    size: int
    media_type: str
    file_name: str


def compose_message(
    *,
    sender: str,
    family: str,
    recipients: Sequence[str],
    body: Mapping[str, Any] | ProtoMessage,
    body_type: str,
    created_at: datetime,
    case_ref: str = "",
    in_reply_to: str = "",
    confidentiality: str = "internal",
    attachments: Sequence[AttachmentInput] = (),
    message_id: str | None = None,
    deadline: datetime | None = None,
    field_markings: Mapping[str, str] | None = None,
    version_of: str = "",
    all_recipients: Sequence[str] = (),
) -> envelope_pb2.Message:
    """Build a Message, or raise ExchangeError(INVALID) naming the bad field.

    A draft a receiver would refuse (check 4 of docs/protocol.md section 6) is refused here,
    so that a node never signs what its peers cannot take. ``all_recipients`` goes with
    ``version_of``: every recipient of every version (sorted here).
    """
    if family not in FAMILY_BODIES:
        raise _invalid(f"family '{family}' is unknown; use one of {', '.join(FAMILY_BODIES)}")
    body_type = body_type or default_body_type(family)
    if body_type not in FAMILY_BODIES[family]:
        allowed = ", ".join(FAMILY_BODIES[family])
        raise _invalid(f"body type '{body_type}' does not belong to family '{family}' ({allowed})")
    if not recipients:
        raise _invalid("no recipient given")
    for recipient in recipients:
        try:
            validate_agency_id(recipient)
        except IdentityError as error:
            raise _invalid(f"recipient: {error}") from None
    if len(set(recipients)) != len(recipients):
        raise _invalid("a recipient is listed twice")
    if sender in recipients:
        raise _invalid("a node does not send to itself")
    if in_reply_to and not UUID_RE.match(in_reply_to):
        raise _invalid(f"in_reply_to {shown(in_reply_to, 64)} is not a message id")
    if len(case_ref) > MAX_CASE_REF_CHARS:
        raise _invalid(
            f"case_ref is {len(case_ref)} characters; a case reference has at most "
            f"{MAX_CASE_REF_CHARS}"
        )
    if family == "reply" and not in_reply_to:
        raise _invalid("a reply needs in_reply_to: the id of the message it answers")
    if confidentiality not in CONFIDENTIALITY_NAMES:
        raise _invalid(
            f"confidentiality '{confidentiality}' is unknown; use public, internal or confidential"
        )
    message = envelope_pb2.Message(
        message_id=message_id or uuid7(),
        sender=sender,
        recipients=list(recipients),
        case_ref=case_ref,
        in_reply_to=in_reply_to,
        confidentiality=CONFIDENTIALITY_NAMES[confidentiality],  # type: ignore[arg-type]
    )
    set_timestamp(message.created_at, created_at)
    if deadline is not None:
        if deadline <= created_at:
            raise _invalid(f"deadline {deadline.isoformat()} is not after the message's creation")
        set_timestamp(message.deadline, deadline)
    target = getattr(message, body_type)
    if isinstance(body, ProtoMessage):
        if body.DESCRIPTOR is not target.DESCRIPTOR:
            raise _invalid(f"body is a {body.DESCRIPTOR.name}, not a {target.DESCRIPTOR.name}")
        target.CopyFrom(body)
    elif not _set_plain_strings(target, body):
        try:
            json_format.ParseDict(dict(body), target)
        except json_format.ParseError as error:
            raise _invalid(f"body ({body_type}): {error}") from None
    if not getattr(message, body_type).ListFields():
        raise _invalid(f"body ({body_type}) is empty")
    for name, marking in sorted((field_markings or {}).items()):
        if marking not in CONFIDENTIALITY_NAMES:
            raise _invalid(
                f"field_markings: field '{name}' is marked '{marking}'; use public, internal or "
                "confidential"
            )
        message.field_markings.add(
            field=_proto_field_name(target.DESCRIPTOR, name),
            confidentiality=CONFIDENTIALITY_NAMES[marking],
        )
    message.field_markings.sort(key=lambda marked: marked.field)
    if version_of:
        if not UUID_RE.match(version_of):
            raise _invalid(f"version_of {shown(version_of, 64)} is not a message id")
        message.version_of = version_of
    if all_recipients:
        message.all_recipients.extend(sorted(all_recipients))
    check_markings(message)
    for attachment in attachments:
        problem = file_name_problem(attachment.file_name)
        if problem:
            raise _invalid(f"attachment file name {shown(attachment.file_name, 64)} {problem}")
        message.attachments.add(
            sha256=attachment.sha256,
            size=attachment.size,
            media_type=attachment.media_type,
            file_name=attachment.file_name,
        )
    check_contents(message, message.SerializeToString())
    return message


def time_of(stamp: Timestamp) -> datetime | None:
    """A Timestamp from the wire as a UTC datetime; None outside 1970-01-01 .. 9999-12-31
    (or with nanos out of range), which no peer's valid time can be."""
    if not (0 <= stamp.seconds < MAX_TIMESTAMP_SECONDS and 0 <= stamp.nanos < 1_000_000_000):
        return None
    return datetime.fromtimestamp(stamp.seconds, UTC).replace(microsecond=stamp.nanos // 1000)


def set_timestamp(field: Timestamp, moment: datetime) -> None:
    """Timestamp.FromDatetime (a naive datetime is taken as UTC), at a fraction of its cost."""
    field.seconds = calendar.timegm(moment.utctimetuple())
    field.nanos = moment.microsecond * 1000


@functools.cache
def _string_fields(descriptor: Descriptor) -> dict[str, str]:
    """JSON and proto names of a message's singular string fields -> the proto name."""
    names: dict[str, str] = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
            names[field.name] = field.name
            names[field.json_name] = field.name
    return names


def _set_plain_strings(target: ProtoMessage, body: Mapping[str, Any]) -> bool:
    """Fill `target` from a body whose every value is a string for a string field.

    The common case, done directly: json_format's general parser costs ~0.2 ms for a 2 KiB
    body. Anything else (or a string protobuf refuses, e.g. a lone surrogate) returns False
    with `target` untouched, and the caller parses it with json_format, which gives the
    precise error.
    """
    names = _string_fields(target.DESCRIPTOR)
    plain: dict[str, str] = {}
    for key, value in body.items():
        name = names.get(key)
        if name is None or not isinstance(value, str) or name in plain:
            return False
        plain[name] = value
    try:
        for name, value in plain.items():
            setattr(target, name, value)
    except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError
        target.Clear()
        return False
    return True


def _proto_field_name(descriptor: Descriptor, name: str) -> str:
    """A body field's proto name from its proto or JSON name (``legalBasis`` -> ``legal_basis``)."""
    for field in descriptor.fields:
        if name in (field.name, field.json_name):
            return field.name
    return name  # check_markings names it as unknown


def field_markings_of(message: envelope_pb2.Message) -> dict[str, str]:
    """The message's field markings, ``{field: "confidential"}``."""
    return {
        marked.field: CONFIDENTIALITY_LABELS.get(marked.confidentiality, "internal")
        for marked in message.field_markings
    }


def check_markings(message: envelope_pb2.Message) -> None:
    """Field markings name set fields of the body, each once, in order, each above the
    message's own marking (a marking at or below it says nothing and hides a typo), and a
    redacted version names another message. Raises ExchangeError(INVALID)."""
    if message.confidentiality not in CONFIDENTIALITY_LABELS and message.confidentiality != 0:
        # An unknown marking read as "internal" would let a stricter one through.
        raise _invalid(
            f"confidentiality {message.confidentiality} is not a known marking (1 public, "
            "2 internal, 3 confidential; 0 = unmarked, read as internal)"
        )
    if not message.field_markings and not message.version_of:
        return
    own = confidentiality_label(message)
    body_type = message.WhichOneof("body") or ""
    body = getattr(message, body_type) if body_type else None
    previous = ""
    for marked in message.field_markings:
        where = f"field_markings: field '{marked.field[:60]}'"
        if body is None or marked.field not in body.DESCRIPTOR.fields_by_name:
            known = ", ".join(body.DESCRIPTOR.fields_by_name) if body is not None else ""
            raise _invalid(f"{where} is not a field of {body_type or 'the body'} ({known})")
        field = body.DESCRIPTOR.fields_by_name[marked.field]
        is_set = (
            body.HasField(field.name) if field.has_presence else bool(getattr(body, field.name))
        )
        if not is_set:
            raise _invalid(f"{where} is marked but not set in the body")
        if marked.field <= previous:
            raise _invalid(f"{where} is listed twice or out of order (sort them by field name)")
        previous = marked.field
        marking = CONFIDENTIALITY_LABELS.get(marked.confidentiality)
        if marking is None:
            raise _invalid(f"{where} has no known marking ({marked.confidentiality})")
        if cleared(marking, own):
            raise _invalid(
                f"{where} is marked {marking}, not above the message's own marking {own}; "
                "mark only fields that need more protection than the message"
            )
    if message.version_of and (
        not UUID_RE.match(message.version_of) or message.version_of == message.message_id
    ):
        raise _invalid(f"version_of {shown(message.version_of, 64)} is not another message's id")


def parse_message(payload: bytes) -> envelope_pb2.Message:
    """Parse a verified payload and check its structure (not its permissions)."""
    message = envelope_pb2.Message()
    try:
        message.ParseFromString(payload)
    except DecodeError:
        raise _invalid("payload is not a liandong.v1.Message") from None
    if not UUID_RE.match(message.message_id):
        raise _invalid(f"message_id {shown(message.message_id, 64)} is not a lower-case UUID")
    if message.WhichOneof("body") is None:
        raise _invalid("message has no body")
    if not message.HasField("created_at"):
        raise _invalid("message has no created_at")
    # Every time the node reads (the case clocks read the deadline, the approval time and a
    # delay's new date): one out of range would fail the store of a valid signed message.
    times = [
        ("created_at", message, "created_at"),
        ("deadline", message, "deadline"),
        ("crime_transfer.approved_at", message.crime_transfer, "approved_at"),
        ("feedback.due", message.feedback, "due"),
    ]
    for name, holder, field in times:
        stamp = getattr(holder, field)
        if holder.HasField(field) and not (
            0 <= stamp.seconds < MAX_TIMESTAMP_SECONDS and 0 <= stamp.nanos < 1_000_000_000
        ):
            raise _invalid(f"{name} is outside 1970-01-01 .. 9999-12-31")
    for recipient in message.recipients:
        try:
            validate_agency_id(recipient)
        except IdentityError as error:
            raise _invalid(f"recipient: {error}") from None
    for ref in message.attachments:
        if len(ref.sha256) != 32:
            raise _invalid(f"attachment {shown(ref.file_name, 64)} has no valid SHA-256 digest")
    check_markings(message)
    check_contents(message, payload)
    return message


def file_name_problem(name: str) -> str:
    """Why no receiver could store an attachment under ``name`` ("" when one can)."""
    if not name:
        return "is empty; name the file"
    if name in (".", ".."):
        return "is not a file name"
    size = len(name.encode("utf-8"))
    if size > MAX_FILE_NAME_BYTES:
        return (
            f"is {size} bytes of UTF-8, over the {MAX_FILE_NAME_BYTES} a receiver can store; "
            "shorten it"
        )
    bad = _BAD_FILE_NAME_CHARS.search(name)
    if bad is not None:
        return f"contains {bad.group()!a}: no path separators or control characters"
    return ""


def check_contents(message: envelope_pb2.Message, payload: bytes) -> None:
    """What a receiver must be able to store and act on, besides the structure: recipients
    each listed once and never the sender, a reply naming another message by its id, a
    case_ref that fits, attachment names a folder can hold, all_recipients as section 5.3
    says, at most MAX_ATTACHMENTS attachments, and no NUL character in any text (PostgreSQL
    cannot store one). Raises
    ExchangeError(INVALID); ``payload`` is the message's serialized form (any encoding)."""
    recipients = message.recipients
    if len(set(recipients)) != len(recipients):
        raise _invalid("a recipient is listed twice; list each once")
    if message.sender in recipients:
        raise _invalid(
            f"the sender {shown(message.sender, 64)} is among the recipients; a node does not "
            "send to itself"
        )
    if message.all_recipients:
        _check_all_recipients(message)
    if message.in_reply_to and (
        not UUID_RE.match(message.in_reply_to) or message.in_reply_to == message.message_id
    ):
        raise _invalid(
            f"in_reply_to {shown(message.in_reply_to, 64)} is not another message's id "
            "(a lower-case UUID)"
        )
    if len(message.case_ref) > MAX_CASE_REF_CHARS:
        raise _invalid(
            f"case_ref is {len(message.case_ref)} characters; at most {MAX_CASE_REF_CHARS}"
        )
    if len(message.attachments) > MAX_ATTACHMENTS:
        raise _invalid(
            f"the message lists {len(message.attachments)} attachments; at most "
            f"{MAX_ATTACHMENTS} (send the rest with another message)"
        )
    for ref in message.attachments:
        problem = file_name_problem(ref.file_name)
        if problem:
            raise _invalid(f"attachment file name {shown(ref.file_name, 64)} {problem}")
        if ref.size > MAX_ATTACHMENT_SIZE:
            raise _invalid(f"attachment {shown(ref.file_name, 64)} declares {ref.size} bytes")
    # Text is UTF-8, where a 0 byte is only ever NUL: a payload without one has none.
    if b"\x00" in payload:
        where = _nul_field(message)
        if where:
            raise _invalid(
                f"{where} contains a NUL character (U+0000), which a receiver cannot store"
            )


def _check_all_recipients(message: envelope_pb2.Message) -> None:
    listed = list(message.all_recipients)
    if len(listed) > MAX_ALL_RECIPIENTS:
        raise _invalid(f"all_recipients lists {len(listed)} agencies; at most {MAX_ALL_RECIPIENTS}")
    for recipient in listed:
        try:
            validate_agency_id(recipient)
        except IdentityError as error:
            raise _invalid(f"all_recipients: {error}") from None
    if any(a >= b for a, b in itertools.pairwise(listed)):
        raise _invalid("all_recipients must be sorted, each recipient listed once")
    if message.sender in listed:
        raise _invalid("all_recipients lists the sender; it lists the recipients only")
    missing = set(message.recipients) - set(listed)
    if missing:
        raise _invalid(
            f"all_recipients leaves out {shown(sorted(missing)[0], 64)}, a recipient of this "
            "message; it lists every recipient of every version"
        )


def _nul_field(message: ProtoMessage, prefix: str = "") -> str:
    """The first string field (``clue.title``, ``attachments.file_name``) holding a NUL."""
    for field, value in message.ListFields():
        values = value if field.is_repeated else (value,)
        if field.type == FieldDescriptor.TYPE_STRING:
            if any("\x00" in text for text in values):
                return prefix + field.name
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for inner in values:
                found = _nul_field(inner, f"{prefix}{field.name}.")
                if found:
                    return found
    return ""


def body_type_of(message: envelope_pb2.Message) -> str:
    body = message.WhichOneof("body")
    if body is None:
        raise _invalid("message has no body")
    return body


def family_of(message: envelope_pb2.Message) -> str:
    return BODY_FAMILIES[body_type_of(message)]


def body_dict(message: envelope_pb2.Message) -> dict[str, Any]:
    """The body in protobuf's JSON mapping, with the proto field names."""
    body = getattr(message, body_type_of(message))
    fields = body.ListFields()
    if all(field.type == FieldDescriptor.TYPE_STRING for field, _ in fields):
        # What MessageToDict gives for string fields, without its general machinery.
        return {field.name: list(value) if field.is_repeated else value for field, value in fields}
    result: dict[str, Any] = json_format.MessageToDict(body, preserving_proto_field_name=True)
    return result


def body_json(message: envelope_pb2.Message) -> str:
    return json.dumps(body_dict(message), ensure_ascii=False, sort_keys=True)


def confidentiality_label(message: envelope_pb2.Message) -> str:
    return CONFIDENTIALITY_LABELS.get(message.confidentiality, "internal")


def effective_marking(message: envelope_pb2.Message) -> str:
    """The most restricted marking anywhere in the message: its own or a field's."""
    return most_restricted(confidentiality_label(message), *field_markings_of(message).values())


def _invalid(text: str) -> ExchangeError:
    return ExchangeError(Reason.INVALID, text)
