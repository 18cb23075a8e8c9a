"""People's procuratorate (人民检察院) plugin.

The procuratorate's case system is connected through the shared adapters
(:mod:`plugins.adapters`): litigation clues, crime-transfer copies, feedback and shared
penalty data arrive in the drop folder's ``inbound/`` (a clue registered there is the case
system's task; the node itself starts its one-month feedback clock), evidence requests and
procuratorial recommendations come from ``drafts/`` or a SQL source (``[plugins.procuratorate.
sql.NAME]``), and the replies they get move their cases and clocks in the node.

Filing supervision (立案监督) is the node's, not the plugin's: ``liandong report supervision``
lists 应立未立 from the transfer copies and 应移未移 from the shared penalty data, with the
thresholds of ``[supervision.thresholds]``.

Config: ``[plugins.procuratorate] folder = "local"``, ``cleared_for = "internal"``, and
``[plugins.procuratorate.recipients]`` (what each recipient may get),
``[[plugins.procuratorate.review]]`` (cases answered on arrival); all in
:mod:`plugins.adapters`. Case changes go to the drop folder's ``cases/`` log.
"""

from plugins.adapters import AgencyAdapters

_plugin = AgencyAdapters("procuratorate")

liandong_node_started = _plugin.liandong_node_started
liandong_poll_local_system = _plugin.liandong_poll_local_system
liandong_review_inbound = _plugin.liandong_review_inbound
liandong_hand_off = _plugin.liandong_hand_off
liandong_redact = _plugin.liandong_redact
liandong_deliveries_confirmed = _plugin.liandong_deliveries_confirmed
liandong_cases_changed = _plugin.liandong_cases_changed
