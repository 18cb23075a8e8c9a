"""Ecology bureau (生态环境局) plugin.

Today it connects the bureau's case system through a drop folder (see
:mod:`plugins.dropfolder`): drafts dropped in ``drafts/`` are submitted, inbound messages such
as evidence requests and recommendations appear in ``inbound/``, receipts in ``receipts/``.

Planned workflow: read enforcement and penalty records, classify each against configurable
thresholds from the judicial interpretation on pollution crimes (污染环境罪) — hazardous waste of
3 t or more, heavy metals above 3x the standard, hidden pipes, protected zones, a third offence
within two years, falsified monitoring data — into suspected crimes (crime transfers to the
police) and litigation clues (to the procuratorate), attach the evidence, share quarterly
penalty and monitoring data, and answer evidence requests.

Config: ``[plugins.ecology] folder = "local"`` (relative to the node's data directory).
"""

from plugins.dropfolder import DropFolderPlugin

_plugin = DropFolderPlugin("ecology")

liandong_node_started = _plugin.liandong_node_started
liandong_poll_local_system = _plugin.liandong_poll_local_system
liandong_hand_off = _plugin.liandong_hand_off
liandong_deliveries_confirmed = _plugin.liandong_deliveries_confirmed
