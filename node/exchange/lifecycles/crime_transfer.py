"""涉嫌犯罪案件移送: a suspected crime, ecology (or another agency) -> police.

环环监〔2017〕17号 and State Council Order 310 (seeds 002 §四–五, 004 §四): the police accept
and issue a receipt (回执) at once, decide on filing within 3 days (7 when the clue needs
checking, 30 for a major, complex case); a decision not to file gives reasons, and the
transferring agency may ask for reconsideration; after filing, the police report arrest
approval, prosecution or not, judgment and closing as case-status notices. The transfer
letter is copied to the procuratorate: that copy is a case of its own that stops at
"received" (the procuratorate's filing supervision reads it).
"""

from node.exchange.lifecycles import RECEIPT, Lifecycle, Role, transition

ADDRESSEE, OPENER = Role.ADDRESSEE, Role.OPENER

LIFECYCLE = Lifecycle(
    family="crime_transfer",
    title="crime transfer 涉嫌犯罪案件移送",
    transitions=(
        RECEIPT,
        transition("needs_checking", "received", "checking", ADDRESSEE, "需要核查"),
        transition("major_complex", "received checking", "major_complex", ADDRESSEE, "重大复杂"),
        transition(
            "filed", "received checking major_complex supplemented", "filed", ADDRESSEE, "立案"
        ),
        transition(
            "not_filed",
            "received checking major_complex supplemented",
            "not_filed",
            ADDRESSEE,
            "不予立案",
            needs_reason=True,
        ),
        transition(
            "returned",
            "received checking major_complex",
            "returned",
            ADDRESSEE,
            "退回补充调查",
            needs_reason=True,
        ),
        transition("supplemented", "returned", "supplemented", OPENER, "补充材料"),
        transition(
            "reconsideration_requested",
            "not_filed",
            "reconsideration_requested",
            OPENER,
            "提请复议",
            needs_reason=True,
        ),
        transition(
            "reconsidered_filed", "reconsideration_requested", "filed", ADDRESSEE, "复议立案"
        ),
        transition(
            "reconsidered_upheld",
            "reconsideration_requested",
            "not_filed_upheld",
            ADDRESSEE,
            "复议维持",
            needs_reason=True,
        ),
        transition("arrest_approved", "filed", "arrest_approved", ADDRESSEE, "批准逮捕"),
        transition("prosecuted", "filed arrest_approved", "prosecuted", ADDRESSEE, "提起公诉"),
        transition(
            "not_prosecuted",
            "filed arrest_approved",
            "not_prosecuted",
            ADDRESSEE,
            "不起诉",
            needs_reason=True,
        ),
        transition("judged", "prosecuted", "judged", ADDRESSEE, "判决"),
        transition("closed", "judged not_prosecuted not_filed_upheld", "closed", ADDRESSEE, "结案"),
    ),
    final=frozenset({"closed"}),
)
