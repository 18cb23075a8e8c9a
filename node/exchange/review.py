"""Answering an inbound case on arrival: a plugin's verdict (``liandong_review_inbound``)
turned into the signed feedback the sender gets.

The answer is an ordinary feedback reply, submitted through the outbox like a reply the
officer sends by hand, so it is checked against the case, signed, stored, audited and
delivered the same way and moves the case on both nodes. Its idempotency key is derived
from the item, so asking the plugins again after a crash never sends a second answer.
"""

from __future__ import annotations

from node.exchange.lifecycles import LIFECYCLES, RECEIVED, Role, Transition
from node.identity import agency_kind
from node.plugin_api import Accept, Decline, Draft, InboundItem, Verdict


class VerdictError(ValueError):
    """A verdict the item's lifecycle does not allow on arrival."""


# Who holds only a copy of a family's cases, by agency kind: the procuratorate is copied a
# crime transfer (抄送) for its filing supervision; the filing decision is the police's, and
# the answer goes to the copy holders too, so their copies follow (002 §五(二)).
COPY_HOLDERS = {"crime_transfer": "procuratorate"}


def opens_case(item: InboundItem) -> bool:
    """Whether ``item`` opens a case (rather than answering one)."""
    return item.family in LIFECYCLES


def to_review(item: InboundItem, agency: str) -> bool:
    """Whether ``agency``'s node asks its plugins to answer ``item`` on arrival: it opens a
    case, and ``agency`` is its addressee, not the holder of a copy."""
    return opens_case(item) and COPY_HOLDERS.get(item.family) != agency_kind(agency)


def on_arrival(family: str, event: str) -> Transition:
    """The transition ``event`` makes for the addressee of a new ``family`` case.

    :raises VerdictError: the lifecycle has no such move from "received".
    """
    lifecycle = LIFECYCLES.get(family)
    if lifecycle is None:
        raise VerdictError(f"'{family}' opens no case")
    moves = [t for t in lifecycle.transitions if t.by is Role.ADDRESSEE and RECEIVED in t.sources]
    for transition in moves:
        if transition.event == event:
            if transition.needs_date:
                raise VerdictError(f"'{event}' needs a new date and cannot be answered on arrival")
            return transition
    raise VerdictError(
        f"a new {family} case cannot be answered with '{event}' on arrival "
        f"(its addressee may answer: {', '.join(t.event for t in moves)})"
    )


def check_verdict(family: str, verdict: Verdict) -> None:
    """Raise VerdictError unless ``verdict`` is a move the addressee of a new ``family``
    case may make, with a reason where the move needs one."""
    if not isinstance(verdict, Accept | Decline):
        raise VerdictError(f"a verdict is Accept, Decline or None, not a {type(verdict).__name__}")
    transition = on_arrival(family, verdict.event)
    if isinstance(verdict, Decline) and not verdict.reason.strip():
        raise VerdictError(f"declining with '{verdict.event}' needs a reason")
    if transition.needs_reason and not verdict.reason.strip():
        raise VerdictError(f"'{verdict.event}' needs a reason")


def answer_for(item: InboundItem, verdict: Verdict, agency: str) -> Draft:
    """The feedback that tells the sender (and, for a crime transfer, the other recipients)
    the verdict on ``item``; checked with :func:`check_verdict` first."""
    check_verdict(item.family, verdict)
    recipients = [item.sender]
    if item.family in COPY_HOLDERS:
        recipients += [r for r in item.recipients if r not in (agency, item.sender)]
    body: dict[str, str] = {"status": verdict.event}
    if verdict.reason:
        body["text"] = verdict.reason
    return Draft(
        family="reply",
        body_type="feedback",
        recipients=tuple(recipients),
        body=body,
        in_reply_to=item.message_id,
        case_ref=item.case_ref,
        # The answer quotes nothing of the item, but its reason may be about the content.
        confidentiality=item.confidentiality,
        source=f"review:{item.message_id}",
    )
