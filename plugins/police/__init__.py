"""Public security bureau (公安机关) plugin.

The police case system is connected through the shared adapters (:mod:`plugins.adapters`):
crime transfers and clues arrive in the drop folder's ``inbound/`` — the node has already
signed the receipt (回执) and started the filing clock (3 days; 7 or 30 when the police mark
the case as needing checks or major and complex) — and the case system's decisions come back
as feedback drafts, from ``drafts/`` or straight from its database through a SQL source::

    [plugins.police.sql.decisions]
    url = "postgresql+psycopg://reader@db.police.local/cases"
    query = "SELECT id, transfer_id, decision, reason FROM decisions WHERE id > :after ORDER BY id"
    key = "id"
    [plugins.police.sql.decisions.columns]
    in_reply_to = "transfer_id"
    "body.status" = "decision"      # filed | not_filed | returned | arrest_approved | ...
    "body.text" = "reason"
    [plugins.police.sql.decisions.fixed]
    family = "reply"
    body_type = "feedback"
    to = "140400/ecology;140400/procuratorate"

Each decision moves the transfer's case on both sides (and the procuratorate's copy).

Config: ``[plugins.police] folder = "local"``, ``cleared_for = "internal"``, and
``[plugins.police.recipients]`` (what each recipient may get), ``[[plugins.police.review]]``
(cases answered on arrival); all in :mod:`plugins.adapters`. Case changes go to the drop
folder's ``cases/`` log.
"""

from plugins.adapters import AgencyAdapters

_plugin = AgencyAdapters("police")

liandong_node_started = _plugin.liandong_node_started
liandong_poll_local_system = _plugin.liandong_poll_local_system
liandong_review_inbound = _plugin.liandong_review_inbound
liandong_hand_off = _plugin.liandong_hand_off
liandong_redact = _plugin.liandong_redact
liandong_deliveries_confirmed = _plugin.liandong_deliveries_confirmed
liandong_cases_changed = _plugin.liandong_cases_changed
