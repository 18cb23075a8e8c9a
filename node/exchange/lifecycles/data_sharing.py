"""信息共享: the quarterly sharing of penalty and monitoring data an agency owes another.

Seeds 001 §七: the enforcement agencies give the procuratorate their administrative penalty
information and monitoring data every quarter (定期(每季度)). No message opens this case: the
receiving node opens one per sharing agency and quarter when the quarter ends (``[deadlines]
sharing_from``), state "awaited", with the sharing agency responsible for the clock; the
agency's data-sharing notice for that quarter closes it.
"""

from node.exchange.lifecycles import Lifecycle, Role, transition

AWAITED = "awaited"

LIFECYCLE = Lifecycle(
    family="data_sharing",
    title="quarterly data sharing 信息共享",
    transitions=(
        transition("shared", AWAITED, "shared", Role.OPENER, "共享"),
        # Shared some other way (on paper, before the node was set up, a notice without
        # the quarter): the waiting agency closes it itself, saying how.
        transition(
            "shared_otherwise", AWAITED, "shared", Role.ADDRESSEE, "另行报送", needs_reason=True
        ),
    ),
    final=frozenset({"shared"}),
    opened=(AWAITED,),
)
