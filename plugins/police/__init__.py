"""Public security bureau (公安机关) plugin.

Today it connects the police case system through a drop folder (see
:mod:`plugins.dropfolder`): crime transfers and clues arrive in ``inbound/``, feedback drafts
dropped in ``drafts/`` are submitted, receipts appear in ``receipts/``.

Planned workflow: receipt each crime transfer as soon as it arrives, start and track the
filing-decision clock, and send filing / no-filing (with reasons) / supplementary-investigation
feedback and later case-status updates to the transferring agency and the procuratorate.

Config: ``[plugins.police] folder = "local"`` (relative to the node's data directory).
"""

from plugins.dropfolder import DropFolderPlugin

_plugin = DropFolderPlugin("police")

liandong_node_started = _plugin.liandong_node_started
liandong_poll_local_system = _plugin.liandong_poll_local_system
liandong_hand_off = _plugin.liandong_hand_off
liandong_deliveries_confirmed = _plugin.liandong_deliveries_confirmed
