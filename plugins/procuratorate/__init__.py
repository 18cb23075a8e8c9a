"""People's procuratorate (人民检察院) plugin.

Today it connects the procuratorate's case system through a drop folder (see
:mod:`plugins.dropfolder`): clues and feedback arrive in ``inbound/``, evidence requests and
recommendations dropped in ``drafts/`` are submitted, receipts appear in ``receipts/``.

Planned workflow: start the one-month clock when a litigation clue arrives and track the
feedback owed on it, issue evidence requests and procuratorial recommendations and follow their
replies, and report cases that should have been transferred or filed but were not.

Config: ``[plugins.procuratorate] folder = "local"`` (relative to the node's data directory).
"""

from plugins.dropfolder import DropFolderPlugin

_plugin = DropFolderPlugin("procuratorate")

liandong_node_started = _plugin.liandong_node_started
liandong_poll_local_system = _plugin.liandong_poll_local_system
liandong_hand_off = _plugin.liandong_hand_off
liandong_deliveries_confirmed = _plugin.liandong_deliveries_confirmed
