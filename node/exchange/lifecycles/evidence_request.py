"""配合调查取证: an evidence-assistance request, procuratorate or police -> an agency.

Seeds 000 §六, 001 §五, 003 §7–8: the agency accepts or declines (a refusal needs a reason and
may be escalated to the supervising agency, 001 §五), works on it — possibly sending a signed
delay notice with a reason and a new date — and sends the results with their evidence; the
requester acknowledges them and closes the request. The deadline is the request's own
(Message.deadline), or the rules table's default.
"""

from node.exchange.lifecycles import RECEIPT, Lifecycle, Role, transition

ADDRESSEE, OPENER = Role.ADDRESSEE, Role.OPENER

LIFECYCLE = Lifecycle(
    family="evidence_request",
    title="evidence-assistance request 配合调查取证",
    transitions=(
        RECEIPT,
        transition("accepted", "received", "accepted", ADDRESSEE, "接受"),
        transition(
            "declined", "received", "declined", ADDRESSEE, "拒绝", needs_reason=True, escalate=True
        ),
        transition("in_progress", "accepted delayed", "in_progress", ADDRESSEE, "办理中"),
        transition(
            "delayed",
            "accepted in_progress",
            "delayed",
            ADDRESSEE,
            "延期",
            needs_reason=True,
            needs_date=True,
        ),
        transition(
            "results", "accepted in_progress delayed", "results_sent", ADDRESSEE, "反馈结果"
        ),
        transition("acknowledged", "results_sent", "acknowledged", OPENER, "确认"),
        transition("completed", "acknowledged", "completed", OPENER, "办结"),
    ),
    final=frozenset({"completed", "declined"}),
    body_events={"evidence_response": "results"},
)
