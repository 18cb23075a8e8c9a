"""检察建议: a procuratorial recommendation, procuratorate -> agency.

Seeds 000 §八, 001 §四, 003 §14–15: the agency rectifies and replies in writing within two
months of receipt, 15 days when the recommendation is marked urgent (harm spreading); no reply
means a reminder (催办) and then a referral to the supervising agency. The procuratorate
reviews the reply and closes the case or follows up.
"""

from node.exchange.lifecycles import RECEIPT, Lifecycle, Role, transition

ADDRESSEE, OPENER = Role.ADDRESSEE, Role.OPENER

LIFECYCLE = Lifecycle(
    family="recommendation",
    title="procuratorial recommendation 检察建议",
    transitions=(
        RECEIPT,
        transition("rectifying", "received", "rectifying", ADDRESSEE, "整改中"),
        transition("replied", "received rectifying", "replied", ADDRESSEE, "书面回复"),
        transition("reviewed", "replied", "reviewed", OPENER, "审查"),
        transition("closed", "reviewed", "closed", OPENER, "结案"),
        transition("follow_up", "reviewed", "follow_up", OPENER, "跟进监督"),
    ),
    final=frozenset({"closed"}),
    body_events={"recommendation_reply": "replied"},
)
