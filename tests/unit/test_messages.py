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
