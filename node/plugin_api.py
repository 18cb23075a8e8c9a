"""The narrow API that plugins get from the node.

Plugins never see a database session, a signing key or the gRPC server: everything they may
do goes through a :class:`NodeAPI` object, and everything they receive is one of the frozen
dataclasses below. That keeps the signing and storage rules in the node core, where they are
tested once, and lets a plugin be unit-tested with a ten-line fake ``NodeAPI``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol, cast, get_args, runtime_checkable

__all__ = [
    "MARKINGS",
    "Accept",
    "AttachmentFile",
    "CaseChange",
    "Confidentiality",
    "Decline",
    "DeliveryConfirmation",
    "Draft",
    "DraftRejected",
    "HandOffWithheld",
    "InboundItem",
    "NodeAPI",
    "Verdict",
    "cleared",
    "most_restricted",
]

Confidentiality = Literal["public", "internal", "confidential"]
MARKINGS: tuple[Confidentiality, ...] = get_args(Confidentiality)  # least to most restricted


def most_restricted(*markings: str) -> str:
    """The most restricted of ``markings`` (the marking a whole made of these parts needs)."""
    return max(markings, key=MARKINGS.index)


def cleared(marking: str, clearance: str) -> bool:
    """Whether what is marked ``marking`` may go where ``clearance`` is the limit (a local
    system cleared for it, a recipient, a case's marking)."""
    return MARKINGS.index(marking) <= MARKINGS.index(clearance)


class DraftRejected(Exception):
    """Raised by :meth:`NodeAPI.submit` when a draft cannot become a message.

    ``str(exc)`` names the offending field and says why (unknown recipient, body does not match
    the family's schema, attachment missing, ...) so a plugin can report it verbatim to the
    local system.
    """


class HandOffWithheld(Exception):
    """Raised by ``liandong_hand_off`` when an item must not reach the local system at all —
    typically one marked confidential for an adapter not cleared for that marking (002 §五(三)).

    ``str(exc)`` says why. The node records the item as not handed off, writes the reason to
    its audit log (``hand_off_withheld``) and does not offer it again; the item stays readable
    with ``liandong show``, where only the node's own operators can see it.
    """


@dataclass(frozen=True)
class Draft:
    """An outbound item read from a local system, before the node signs and queues it."""

    family: str
    """``clue`` | ``crime_transfer`` | ``notice`` | ``evidence_request`` | ``recommendation`` |
    ``reply``."""
    recipients: tuple[str, ...]
    """Agency ids of the recipients."""
    body: Mapping[str, Any]
    """Protobuf JSON mapping of the body message, e.g. ``{"title": ..., "facts": ...}``."""
    body_type: str = ""
    """Required for family ``reply`` (``evidence_response`` | ``recommendation_reply`` |
    ``feedback``); otherwise it defaults to the family."""
    case_ref: str = ""
    in_reply_to: str = ""
    confidentiality: Confidentiality = "internal"
    """The marking of the message as a whole."""
    attachments: tuple[Path, ...] = ()
    """Absolute paths of files to attach."""
    field_markings: Mapping[str, Confidentiality] = field(default_factory=dict)
    """Body fields that need more protection than the message, by field name, e.g.
    ``{"suspect": "confidential"}`` on an ``internal`` draft; each must be set in the body
    and marked above ``confidentiality``."""
    source: str = ""
    """Where the draft came from (file path, row id). Used in error messages and as the
    idempotency key: submitting a draft with the same non-empty source again returns the
    message id of the first submission instead of creating a second message."""


@dataclass(frozen=True)
class AttachmentFile:
    """An attachment of an inbound message, already verified against its digest."""

    file_name: str
    sha256: str
    """Hex digest."""
    size: int
    media_type: str
    path: Path
    """The node's verified copy; plugins copy from it and must not modify it."""


@dataclass(frozen=True)
class InboundItem:
    """A verified inbound message that the node has durably stored."""

    message_id: str
    family: str
    body_type: str
    sender: str
    recipients: tuple[str, ...]
    created_at: datetime
    received_at: datetime
    case_ref: str
    in_reply_to: str
    confidentiality: Confidentiality
    """The marking of the message as a whole."""
    body: Mapping[str, Any]
    attachments: tuple[AttachmentFile, ...]
    envelope_sha256: str
    """Hex digest of the signed envelope, the value both audit logs hold."""
    field_markings: Mapping[str, Confidentiality] = field(default_factory=dict)
    """Body fields marked above ``confidentiality`` (see :attr:`marking`)."""
    version_of: str = ""
    """When the sender redacted this version for this node: the id of the first version."""

    @property
    def marking(self) -> Confidentiality:
        """The most restricted marking anywhere in the item: its own or a field's. A local
        system cleared for less may get the item only without the fields marked above its
        clearance."""
        return cast(
            Confidentiality, most_restricted(self.confidentiality, *self.field_markings.values())
        )


@dataclass(frozen=True)
class DeliveryConfirmation:
    """A valid signed receipt came back for one recipient of an outbound message."""

    message_id: str
    recipient: str
    delivered_at: datetime
    receipt_sha256: str
    receiver_log_index: int
    """Position of the envelope in the recipient's audit log, for later inclusion proofs."""


@dataclass(frozen=True)
class Accept:
    """``liandong_review_inbound``'s answer to take an item: the node sends its sender a
    signed feedback with ``event`` (e.g. ``accepted``, 受理) and hands the item to the local
    system as usual."""

    event: str = "accepted"
    """An event of the item's lifecycle that its addressee may make on arrival
    (docs/workflows.md), e.g. ``accepted`` for a clue, ``read`` for a notice."""
    reason: str = ""
    """Sent as the feedback's text; required by the events that need a reason."""


@dataclass(frozen=True)
class Decline:
    """``liandong_review_inbound``'s answer to refuse an item: the node sends its sender a
    signed feedback with ``event`` and ``reason``, and does **not** hand the item to the local
    system (it stays on the node, readable with ``liandong show``)."""

    reason: str
    """Why, in words the sender's officer can act on; sent as the feedback's text."""
    event: str = "declined"
    """An event of the item's lifecycle that its addressee may make on arrival, e.g.
    ``declined`` (不予受理) or ``forwarded`` (移送管辖) for a clue."""


Verdict = Accept | Decline
"""What ``liandong_review_inbound`` may return (besides ``None``)."""


@dataclass(frozen=True)
class CaseChange:
    """A case on this node moved from one state to another (node.exchange.lifecycles)."""

    sequence: int
    """Increases with every change on this node: a plugin that must not apply a change twice
    remembers the highest it has applied."""
    case_id: str
    """The opening message's id."""
    peer: str
    """The other agency of the case."""
    family: str
    role: Literal["opener", "addressee"]
    """This agency's side of the case."""
    event: str
    from_state: str
    to_state: str
    actor: str
    """The agency that made the move (this one, or ``peer``)."""
    message_id: str
    """The signed message that caused it; empty for a decision recorded on the node
    (``liandong decide``)."""
    reason: str
    """Why, as the answer gave it; empty when the answer or its text is marked above the
    case (so the case's marking covers all a change carries)."""
    at: datetime
    title: str
    """The case's title (empty when the title is marked above the case's message)."""
    confidentiality: Confidentiality
    """The case's marking: the most restricted marking of its opening message."""


@runtime_checkable
class NodeAPI(Protocol):
    """What a plugin may ask of the node."""

    @property
    def agency(self) -> str:
        """This node's agency id."""
        ...

    @property
    def data_dir(self) -> Path:
        """The node's data directory; relative paths in plugin config resolve against it."""
        ...

    def plugin_config(self, name: str) -> Mapping[str, Any]:
        """The ``[plugins.<name>]`` table of the node's TOML config (``{}`` when absent)."""
        ...

    def submit(self, draft: Draft) -> str:
        """Store, sign and queue ``draft``; return its message id.

        Raises :class:`DraftRejected` when the draft is invalid. With a non-empty
        ``draft.source`` a repeated call returns the first message id (idempotent).
        """
        ...

    def submit_many(self, drafts: Sequence[Draft]) -> list[str | Exception]:
        """:meth:`submit` for each draft, stored in one commit: per draft, in order, its
        message id, a :class:`DraftRejected`, or another exception when the node cannot take
        it now (retry later). Nothing is raised for one draft's problem, so one bad draft
        never holds back the others. Much faster than one ``submit`` per draft for a folder
        or a table of them."""
        ...

    @property
    def log(self) -> Any:
        """A structlog ``BoundLogger`` bound to the plugin's context."""
        ...
