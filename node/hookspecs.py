"""Hook specifications for Liandong plugins — and the plugin author's guide.

A plugin connects one agency's local system (a case system, a drop folder, a SQL database) to
the node. The node owns signing, storage, delivery and the audit log; a plugin only moves
items between the local system and the node through the narrow :class:`~node.plugin_api.NodeAPI`.

Writing a plugin
================

A plugin is any importable module (or object) with functions named after the hooks below and
decorated with :data:`hookimpl`::

    # my_agency_plugin.py
    from node.hookspecs import hookimpl
    from node.plugin_api import Draft, DraftRejected, InboundItem, NodeAPI

    @hookimpl
    def liandong_node_started(api: NodeAPI) -> None:
        api.log.info("my plugin ready", folder=str(api.data_dir / "outbox"))

    @hookimpl
    def liandong_hand_off(item: InboundItem, api: NodeAPI) -> str | None:
        if api.agency not in item.recipients:
            return None
        return write_to_case_system(item)  # a reference the node puts in its audit trail

Implement only the hooks you need, each taking only the arguments it uses (pluggy passes them
by name). A function named ``liandong_*`` that matches no hook, e.g. a misspelt
``liandong_hand_of``, makes the node refuse to start, naming the plugin and the hook.

Registering it
==============

Plugins are found through the ``liandong`` entry-point group — the built-in ``ecology``,
``police`` and ``procuratorate`` plugins use the very same path::

    # pyproject.toml of your distribution
    [project.entry-points.liandong]
    my_agency = "my_agency_plugin"

Install the distribution into the node's environment. The node config chooses which installed
plugins run and gives each its settings::

    [plugins]
    enabled = ["police", "my_agency"]   # omitted: the plugin named after the agency's kind

    [plugins.my_agency]
    folder = "local"                    # read with api.plugin_config("my_agency")

Naming a plugin in ``enabled`` that is not installed stops the node at start-up.

What a plugin may and may not do
================================

* May: read and write its own local system; call ``api.submit`` with drafts; log through
  ``api.log``; keep its own state under ``api.data_dir``.
* May not: sign, open the node's database, talk to other nodes, or block forever — hooks run in
  the node's worker threads and a stuck hook stalls that kind of work for every plugin.
* Must be idempotent where the hook says so: the node guarantees *at least once*, never
  *exactly once*, because it can crash between a hook returning and recording the result.
* Raising from a hook is allowed where its docstring says it is retried; elsewhere it is logged
  and the node carries on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from collections.abc import Sequence

    from node.exchange.deadlines import DeadlineRule
    from node.plugin_api import (
        CaseChange,
        DeliveryConfirmation,
        Draft,
        InboundItem,
        NodeAPI,
        Verdict,
    )

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

PROJECT_NAME = "liandong"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Decorator for plugin hook implementations: ``from node.hookspecs import hookimpl``."""


@hookspec
def liandong_node_started(api: NodeAPI) -> None:
    """Called once, after the node has started serving.

    Create the plugin's folders, open connections, check configuration here. Called for every
    plugin; the return value is ignored. An exception is logged with the plugin's name and the
    node keeps running without that plugin's setup — so a plugin that cannot work without its
    setup should fail loudly in its later hooks too.

    :param api: the node API.
    """


@hookspec
def liandong_poll_local_system(api: NodeAPI) -> None:
    """Called every poll interval (``[node] poll_seconds``, default 1 s) to read new outbound
    drafts from the local system.

    Runs in a worker thread and never concurrently with itself, so a plugin needs no locking
    between polls. For each new item, build a :class:`~node.plugin_api.Draft` and call
    ``api.submit(draft)``. A :class:`~node.plugin_api.DraftRejected` is the plugin's to handle:
    report it to the local system (its message names the field) and go on with the other
    items — one bad item must never block the rest. Give each draft a stable ``source`` so a
    resubmission after a crash returns the same message id instead of a duplicate message.

    Called for every plugin; the return value is ignored; an exception is logged and the next
    poll happens as usual.

    :param api: the node API.
    """


@hookspec(firstresult=True)
def liandong_redact(draft: Draft, recipient: str, api: NodeAPI) -> Draft | None:
    """Called for each recipient of every outbound message before it is signed — drafts
    from plugins and messages sent with ``liandong send`` alike — to give that recipient a
    version with less in it: e.g. without the fields marked above what the recipient is
    cleared for.

    Runs in a worker thread. **First result wins**: plugins are asked in turn until one
    returns a non-``None`` draft, and the rest are not called for that recipient.

    The node groups the recipients by the version they get and sends each distinct version
    as a message of its own, signed, stored and audited like any other. The first version
    keeps the message id the submitter gets back; every later one names it in
    ``version_of`` (docs/protocol.md 5.3), so its recipient can follow the case.

    A version may differ from ``draft`` only in ``body``, ``confidentiality``,
    ``field_markings`` and by leaving ``attachments`` out; any other change refuses the whole
    submission. Raise :class:`~node.plugin_api.DraftRejected` to refuse it on purpose (e.g.
    a recipient cleared below the message's own marking). Any other exception also refuses
    it, as worth retrying: nothing is ever sent unredacted because a redactor failed.

    :param draft: the message as submitted (``source`` is the submitter's idempotency key).
    :param recipient: the agency id this version is for.
    :param api: the node API.
    :return: the version for ``recipient``, or ``None`` for the draft as it is.
    """


@hookspec(firstresult=True)
def liandong_review_inbound(item: InboundItem, api: NodeAPI) -> Verdict | None:
    """Called for each inbound message that opens a case (a clue, a crime transfer, an
    evidence request, a recommendation, a notice), once it is durably stored and receipted
    and before it is handed to the local system, to accept or decline it at once, e.g. to
    accept (受理) every clue on arrival, or to decline a clue that came without evidence.

    Runs in the hand-off worker thread. **First result wins**: plugins are asked in turn
    until one returns a non-``None`` verdict, and the rest are not called for that item.

    For :class:`~node.plugin_api.Accept` or :class:`~node.plugin_api.Decline` the node sends
    the item's sender a signed feedback with the verdict's event and reason (for a crime
    transfer, to its other recipients too: the procuratorate's copy follows the filing
    decision), which moves the case on both nodes like any feedback. An accepted item is then
    handed off as usual; a declined one is not: the node records it as declined and audits
    that (``inbound_declined``).

    Must be idempotent: after a crash the node may ask again, and the answer it already sent
    is not sent twice. A verdict the item's lifecycle does not allow on arrival (an unknown
    event, a decline without a reason) or that the case no longer allows (an officer decided
    first) is logged and the item handed off without an answer, for a person to decide.

    :param item: the verified inbound message that opens a case.
    :param api: the node API.
    :return: the verdict, or ``None`` to leave the decision to the local system. Raising
        means "not now": the node asks again later.
    """


@hookspec(firstresult=True)
def liandong_hand_off(item: InboundItem, api: NodeAPI) -> str | None:
    """Called for each inbound message after it is durably stored and its receipt was sent, to
    hand it to the local system.

    Runs in a worker thread. **First result wins**: plugins are asked in turn until one returns
    a non-``None`` value, and the rest are not called.

    Must be idempotent: after a crash the node may hand off the same item again, and that must
    not create a second record in the local system.

    :param item: the verified inbound message, its attachments already verified on disk.
    :param api: the node API.
    :return: a reference to where the item went (e.g. the file written, a row id) once it is
        handed off — the node records it in the audit trail and stops asking; ``None`` when
        the item is not this plugin's to take. Raising means "not now": the node retries later,
        backing off, up to ``[handoff] max_attempts`` times; then it records the hand-off as
        failed (audited, shown in ``liandong inbox``) until an operator re-offers it with
        ``liandong handoff retry`` — except :class:`~node.plugin_api.HandOffWithheld`
        ("never": e.g. an item marked above the local system's clearance), which the node
        records and audits as withheld and does not offer again.
    """


@hookspec
def liandong_deliveries_confirmed(
    confirmations: Sequence[DeliveryConfirmation], api: NodeAPI
) -> None:
    """Called when valid signed receipts for outbound messages have been stored, with every
    receipt that was stored together (one per message and recipient; a busy node stores them
    by the dozen, so write them to the local system in one go).

    Lets the local system record that each recipient has the message (and when, and where in
    the recipient's audit log). Called for every plugin, in a worker thread; the return value
    is ignored. At most once: a node killed between storing the receipts and this call does not
    call it again (``liandong outbox`` and the audit log are the record), and a later call for
    the same receipt is possible only by replaying, so write idempotently. An exception is
    logged; the receipts themselves are already safe in the node.

    :param confirmations: per receipt, the message, recipient, delivery time and digest.
    :param api: the node API.
    """


@hookspec
def liandong_cases_changed(changes: Sequence[CaseChange], api: NodeAPI) -> None:
    """Called after cases on this node changed state (node.exchange.lifecycles): a receipt
    came back, a peer's feedback moved a case, this node answered or decided. Every change
    after a case was opened is reported, in the order they were committed, grouped (up to
    a few hundred a call).

    Lets the local system show each case's state without asking the node. Called for every
    plugin, in a worker thread; the return value is ignored. At least once: the node
    remembers the last change reported (after the call returns), so after a crash a group may
    come again — apply changes idempotently, by :attr:`~node.plugin_api.CaseChange.sequence`.
    An exception is logged and the node moves on (the history stays in ``liandong cases
    ID``): one plugin's failure must not hold back the others. Changes made before any
    plugin implemented this hook are not reported.

    :param changes: the changes, oldest first.
    :param api: the node API.
    """


@hookspec
def liandong_deadline_rules(api: NodeAPI) -> Sequence[DeadlineRule]:
    """Called once at start-up, before the node serves, for the deadline rules the plugin
    contributes (node.exchange.deadlines.DeadlineRule): an agency's own rules, or a legal
    default (by its name, e.g. ``"clue.feedback"``) changed for its local practice.

    Called for every plugin; **all results are used**: each rule replaces the rule of the same
    name, later plugins' over earlier ones'. A rule the node's config sets (``[deadlines.rules]``)
    wins over every plugin: the operator has the last word. An exception is logged and the
    plugin's rules are left out.

    :param api: the node API.
    :return: the rules, possibly empty.
    """
    return ()  # never run: pluggy calls the implementations
