"""Composing messages: every bad draft names its problem."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from node.exchange.errors import ExchangeError, Reason
from node.exchange.messages import (
    UUID_RE,
    AttachmentInput,
    compose_message,
    effective_marking,
    family_of,
    field_markings_of,
    marking_label,
    parse_message,
    uuid7,
)


def compose(**overrides: object):  # type: ignore[no-untyped-def]
    arguments: dict[str, object] = {
        "sender": "140400/ecology",
        "family": "clue",
        "recipients": ["140400/procuratorate"],
        "body": {"title": "线索"},
        "body_type": "",
        "created_at": datetime.now(UTC),
    }
    arguments.update(overrides)
    return compose_message(**arguments)  # type: ignore[arg-type]


def test_uuid7_is_version_7_and_sorts_by_time() -> None:
    first = uuid7()
    time.sleep(0.002)
    second = uuid7()
    assert UUID_RE.match(first)
    assert first[14] == "7"
    assert first[19] in "89ab"
    assert first < second


def test_round_trip() -> None:
    message = compose()
    parsed = parse_message(message.SerializeToString())
    assert family_of(parsed) == "clue"
    assert parsed.clue.title == "线索"


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        ({"family": "gossip"}, "family 'gossip' is unknown"),
        ({"family": "reply", "body_type": "clue"}, "does not belong to family 'reply'"),
        ({"family": "reply", "body_type": "feedback"}, "needs in_reply_to"),
        ({"recipients": []}, "no recipient"),
        ({"recipients": ["140400/procuratorate"] * 2}, "listed twice"),
        ({"recipients": ["140400/ecology"]}, "does not send to itself"),
        ({"recipients": ["police"]}, "recipient: agency id 'police' is malformed"),
        ({"body": {"title": 3}}, "body (clue)"),
        ({"body": {"nonsense": "x"}}, "nonsense"),
        ({"body": {}}, "is empty"),
        ({"confidentiality": "secret"}, "confidentiality 'secret' is unknown"),
        ({"in_reply_to": "not-an-id"}, "is not a message id"),
    ],
)
def test_bad_drafts_are_refused_with_the_reason(overrides: dict[str, object], phrase: str) -> None:
    with pytest.raises(ExchangeError) as caught:
        compose(**overrides)
    assert caught.value.reason is Reason.INVALID
    assert phrase in caught.value.message, caught.value.message


def test_parse_refuses_garbage() -> None:
    with pytest.raises(ExchangeError, match=re.escape("not a liandong.v1.Message")):
        parse_message(b"\xff\xff\xff")
    with pytest.raises(ExchangeError, match="has no body"):
        parse_message(
            compose().SerializeToString()[:0] + b"\n$01a2087f-397b-7d93-9e6b-dca9fcaac36a"
        )


@pytest.mark.parametrize(
    ("set_time", "name"),
    [
        (lambda m: setattr(m.deadline, "seconds", 2**62), "deadline"),
        (lambda m: setattr(m.feedback.due, "seconds", -1), "feedback.due"),
        (lambda m: setattr(m.feedback.due, "nanos", 2_000_000_000), "feedback.due"),
        (lambda m: setattr(m.crime_transfer.approved_at, "seconds", 2**62), "approved_at"),
    ],
)
def test_parse_refuses_a_time_the_node_could_not_read(set_time: Any, name: str) -> None:
    # A peer's signed feedback whose date is out of range must be refused at the door, not
    # fail the case code when the message is stored.
    message = compose()
    set_time(message)
    with pytest.raises(ExchangeError, match=re.escape(f"{name} is outside")):
        parse_message(message.SerializeToString())


def test_field_markings_are_sorted_named_the_proto_way_and_round_trip() -> None:
    message = compose(
        body={"title": "线索", "subject": "某电镀厂", "legalBasis": "水污染防治法"},
        field_markings={"subject": "confidential", "legalBasis": "confidential"},
    )
    assert [(m.field, m.confidentiality) for m in message.field_markings] == [
        ("legal_basis", 3),
        ("subject", 3),
    ]
    parsed = parse_message(message.SerializeToString())
    assert field_markings_of(parsed) == {"legal_basis": "confidential", "subject": "confidential"}
    assert effective_marking(parsed) == "confidential"
    assert effective_marking(compose()) == "internal"
    assert marking_label("internal", field_markings_of(parsed)) == (
        "internal; confidential: legal_basis, subject"
    )


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        ({"field_markings": {"suspekt": "confidential"}}, "'suspekt' is not a field of clue"),
        ({"field_markings": {"facts": "confidential"}}, "'facts' is marked but not set"),
        ({"field_markings": {"title": "internal"}}, "not above the message's own marking"),
        ({"field_markings": {"title": "public"}}, "not above the message's own marking"),
        ({"field_markings": {"title": "secret"}}, "marked 'secret'; use public"),
        ({"version_of": "nope"}, "version_of 'nope' is not a message id"),
    ],
)
def test_bad_markings_are_refused_with_the_reason(
    overrides: dict[str, object], phrase: str
) -> None:
    with pytest.raises(ExchangeError) as caught:
        compose(**overrides)
    assert caught.value.reason is Reason.INVALID
    assert phrase in caught.value.message, caught.value.message


@pytest.mark.parametrize(
    ("tamper", "phrase"),
    [
        (lambda m: m.field_markings.add(field="title", confidentiality=3), "listed twice"),
        (lambda m: m.field_markings.add(field="facts", confidentiality=3), "not set in the body"),
        (lambda m: m.field_markings.add(field="zzz", confidentiality=3), "not a field of clue"),
        (lambda m: setattr(m.field_markings[0], "confidentiality", 0), "no known marking (0)"),
        (lambda m: setattr(m.field_markings[0], "confidentiality", 2), "not above"),
        (lambda m: setattr(m.field_markings[0], "confidentiality", 9), "no known marking"),
        (lambda m: setattr(m, "confidentiality", 9), "confidentiality 9 is not a known"),
        (lambda m: setattr(m, "version_of", m.message_id), "is not another message's id"),
        (lambda m: setattr(m, "version_of", uuid7() + "\n"), "is not another message's id"),
        (lambda m: setattr(m, "message_id", m.message_id + "\n"), "is not a lower-case UUID"),
    ],
)
def test_parse_refuses_markings_a_peer_got_wrong(tamper: Any, phrase: str) -> None:
    # A marking the receiver cannot read must not be taken for a weaker one.
    message = compose(field_markings={"title": "confidential"})
    tamper(message)
    with pytest.raises(ExchangeError, match=re.escape(phrase)):
        parse_message(message.SerializeToString())


def test_a_title_marked_above_its_message_is_not_the_case_title() -> None:
    # Reminders and escalations quote the case title, unmarked: it must not leak there.
    from node.exchange.cases import _title

    assert _title(compose(body={"title": "某厂线索"})) == "某厂线索"
    assert (
        _title(compose(body={"title": "某厂线索"}, field_markings={"title": "confidential"})) == ""
    )


# -- what a receiver must be able to store (check 4): the peer's side and the sender's ----

ATTACHMENT = {"sha256": bytes(32), "size": 10, "media_type": "application/pdf"}


def attach(file_name: str) -> Any:
    return lambda m: m.attachments.add(file_name=file_name, **ATTACHMENT)


@pytest.mark.parametrize(
    ("tamper", "phrase"),
    [
        # A node accepted a message from itself, and one naming a recipient twice.
        (lambda m: m.recipients.append("140400/ecology"), "the sender '140400/ecology' is among"),
        (lambda m: m.recipients.append("140400/procuratorate"), "a recipient is listed twice"),
        # Attachment names the receiver's folder cannot hold.
        (attach("a" * 362 + ".pdf"), "is 366 bytes of UTF-8, over the 200"),
        (attach("报" * 67 + ".pdf"), "is 205 bytes of UTF-8"),
        (attach("../../etc/cron.d/x"), "contains '/'"),
        (attach("..\\boot.ini"), "contains '\\\\'"),
        (attach(".."), "is not a file name"),
        (attach("."), "is not a file name"),
        (attach(""), "is empty"),
        (attach("a\nb.txt"), "contains '\\n'"),
        (attach("a\x7fb.txt"), "contains '\\x7f'"),
        (attach("a\x85b.txt"), "contains '\\x85'"),
        (attach("nul\x00.txt"), "contains '\\x00'"),
        (
            lambda m: m.attachments.add(
                file_name="big.bin", sha256=bytes(32), size=2**63, media_type=""
            ),
            "declares 9223372036854775808 bytes",
        ),
        # Strings that end up in bounded columns.
        (lambda m: setattr(m, "in_reply_to", "x" * 37), "in_reply_to 'xxx"),
        (lambda m: setattr(m, "in_reply_to", uuid7().upper()), "is not another message's id"),
        (lambda m: setattr(m, "in_reply_to", m.message_id), "is not another message's id"),
        (lambda m: setattr(m, "case_ref", "案" * 129), "case_ref is 129 characters; at most 128"),
        # NUL anywhere: PostgreSQL text cannot hold it.
        (lambda m: setattr(m.clue, "facts", "a\x00b"), "clue.facts contains a NUL"),
        (lambda m: m.clue.evidence.append("\x00"), "clue.evidence contains a NUL"),
        (lambda m: setattr(m, "case_ref", "CZ\x00"), "case_ref contains a NUL"),
        (
            lambda m: m.attachments.add(file_name="a.pdf", sha256=bytes(32), media_type="x\x00"),
            "attachments.media_type contains a NUL",
        ),
    ],
)
def test_parse_refuses_what_the_receiver_could_not_store(tamper: Any, phrase: str) -> None:
    message = compose()
    tamper(message)
    with pytest.raises(ExchangeError) as caught:
        parse_message(message.SerializeToString())
    assert caught.value.reason is Reason.INVALID
    assert phrase in caught.value.message, caught.value.message


def test_the_longest_names_and_references_a_receiver_can_store_pass() -> None:
    message = compose()
    message.case_ref = "案" * 128
    message.in_reply_to = uuid7()
    message.attachments.add(file_name="报" * 66 + ".p", sha256=bytes(32), size=2**63 - 1)
    message.attachments.add(file_name="a" * 200, sha256=bytes(32), size=1)
    message.attachments.add(file_name="..a.pdf", sha256=bytes(32), size=1)
    message.clue.facts = "tab\tnewline\n"  # control characters are fine in text
    parse_message(message.SerializeToString())


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        ({"case_ref": "x" * 129}, "case_ref is 129 characters"),
        ({"body": {"title": "线索\x00"}}, "clue.title contains a NUL"),
        ({"case_ref": "CZ\x00"}, "case_ref contains a NUL"),
        ({"in_reply_to": "0" * 36}, "is not a message id"),
        ({"attachments": [AttachmentInput(bytes(32), 1, "", "x" * 201)]}, "is 201 bytes"),
        ({"attachments": [AttachmentInput(bytes(32), 1, "", "a/b")]}, "contains '/'"),
        (
            {"version_of": uuid7(), "all_recipients": ["140400/police"]},
            "all_recipients leaves out '140400/procuratorate'",
        ),
        (
            {"version_of": uuid7(), "all_recipients": ["140400/procuratorate"] * 2},
            "all_recipients must be sorted, each recipient listed once",
        ),
        (
            {"version_of": uuid7(), "all_recipients": ["140400/ecology", "140400/procuratorate"]},
            "all_recipients lists the sender",
        ),
    ],
)
def test_compose_refuses_what_a_receiver_would(overrides: dict[str, object], phrase: str) -> None:
    # The sender's node never signs a message its peers must refuse.
    with pytest.raises(ExchangeError) as caught:
        compose(**overrides)
    assert caught.value.reason is Reason.INVALID
    assert phrase in caught.value.message, caught.value.message


def test_all_recipients_are_sorted_by_the_sender_and_checked_by_the_receiver() -> None:
    first = uuid7()
    message = compose(version_of=first, all_recipients=["140400/procuratorate", "140400/police"])
    assert list(message.all_recipients) == ["140400/police", "140400/procuratorate"]
    parsed = parse_message(message.SerializeToString())
    assert parsed.version_of == first
    message.all_recipients[:] = ["140400/procuratorate", "140400/police"]
    with pytest.raises(ExchangeError, match="must be sorted"):
        parse_message(message.SerializeToString())
    message.all_recipients[:] = [f"140400/police/u{n:03d}" for n in range(257)]
    with pytest.raises(ExchangeError, match="all_recipients lists 257 agencies; at most 256"):
        parse_message(message.SerializeToString())
    message.all_recipients[:] = ["140400/police", "police"]
    with pytest.raises(ExchangeError, match="all_recipients: agency id 'police' is malformed"):
        parse_message(message.SerializeToString())


def test_a_refusal_quotes_a_long_name_cut() -> None:
    message = compose()
    message.attachments.add(file_name="a" * 100_000, sha256=bytes(32), size=1)
    with pytest.raises(ExchangeError) as caught:
        parse_message(message.SerializeToString())
    assert len(caught.value.message) < 400
