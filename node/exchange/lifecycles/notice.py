"""信息通报: a notice to several agencies — major incident or public opinion (重大舆情), case
status, periodic data sharing (quarterly penalty and monitoring data, 001 §七), meeting
minutes. Each recipient's receipt and read acknowledgement are tracked separately (one case
per recipient).
"""

from node.exchange.lifecycles import RECEIPT, Lifecycle, Role, transition

LIFECYCLE = Lifecycle(
    family="notice",
    title="notice 信息通报",
    transitions=(RECEIPT, transition("read", "received", "read", Role.ADDRESSEE, "已阅")),
    final=frozenset({"read"}),
)
