"""公益诉讼线索移送: a clue for public-interest litigation, any agency -> procuratorate.

Seeds 000 §五, 001 §三, 003 §1: the procuratorate registers the clue, decides to accept it,
decline it or forward it to the competent procuratorate, and tells the sender how it handled
it within one month of receipt (the "clue_feedback" clock).
"""

from node.exchange.lifecycles import RECEIPT, Lifecycle, Role, transition

ADDRESSEE = Role.ADDRESSEE

LIFECYCLE = Lifecycle(
    family="clue",
    title="litigation clue 公益诉讼线索",
    transitions=(
        RECEIPT,
        transition("accepted", "received", "accepted", ADDRESSEE, "受理"),
        transition("declined", "received", "declined", ADDRESSEE, "不予受理", needs_reason=True),
        transition("forwarded", "received", "forwarded", ADDRESSEE, "移送管辖", needs_reason=True),
        transition("feedback", "accepted declined forwarded", "feedback_sent", ADDRESSEE, "反馈"),
    ),
    final=frozenset({"feedback_sent"}),
)
