"""Markings on real nodes (002 §五(三)): a field marked above its message, a recipient cleared
for less than it getting a redacted version of its own, a local system cleared for less
getting the item without the field, and the redacted copy still following the case."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import ECOLOGY, POLICE, PROCURATORATE, NodeProcess, wait_for
from tests.integration.test_agency_plugins import configure, inbound_documents
from tests.integration.test_cases import send, state
from tests.integration.test_exchange import cli
from tests.peer import audit_events


def show(node: NodeProcess, message_id: str) -> dict[str, Any]:
    result = cli("show", message_id, "--json", config=node.setup.config)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def outbox(node: NodeProcess) -> list[dict[str, Any]]:
    result = cli("outbox", "--json", config=node.setup.config)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


TRANSFER = {
    "title": "暗管排放含铬废水",
    "facts": "总铬超标3.08倍",
    "suspect": "长治市某电镀有限公司",
    "suspected_offence": "污染环境罪",
}


def test_a_marked_field_is_redacted_per_recipient_and_per_local_system(
    make_federation: Any, tmp_path: Path
) -> None:
    nodes: dict[str, NodeProcess] = make_federation((ECOLOGY, POLICE, PROCURATORATE))
    ecology, police, procuratorate = nodes[ECOLOGY], nodes[POLICE], nodes[PROCURATORATE]
    # The bureau sends the procuratorate nothing above internal; the procuratorate's case
    # system is cleared for confidential, the police's for internal (the default).
    configure(ecology, f'[plugins.ecology.recipients]\n"{PROCURATORATE}" = "internal"\n')
    configure(procuratorate, '[plugins.procuratorate]\ncleared_for = "confidential"\n')
    for node in nodes.values():
        node.start(wait=False)
    for node in nodes.values():
        node.wait_serving()

    first = send(
        ecology,
        tmp_path,
        "crime-transfer",
        [POLICE, PROCURATORATE],
        TRANSFER,
        "--mark",
        "suspect=confidential",
    )
    # Two messages: the whole one to the police, a version without the suspect to the
    # procuratorate, which names the first.
    [version] = [item for item in outbox(ecology) if item["message_id"] != first]
    whole = show(ecology, first)
    assert whole["recipients"] == [POLICE]
    assert whole["field_markings"] == {"suspect": "confidential"}
    assert whole["body"]["suspect"] == TRANSFER["suspect"]
    assert version["recipients"] == [PROCURATORATE]
    assert version["version_of"] == first
    assert "suspect" not in version["body"] and version.get("field_markings", {}) == {}
    table = cli("outbox", config=ecology.setup.config).stdout
    assert "internal; confidential: suspect" in table
    assert (
        f"version of   {first}"
        in cli("show", version["message_id"], config=ecology.setup.config).stdout
    )

    # Each side's node has what was signed for it.
    wait_for(lambda: len(inbound_documents(police)) == 1, what="the police hand-off")
    wait_for(lambda: len(inbound_documents(procuratorate)) == 1, what="the procuratorate's")
    [at_police] = inbound_documents(police)
    assert at_police["message_id"] == first
    # The police node holds the suspect; its case system, cleared for internal, does not.
    assert show(police, first)["body"]["suspect"] == TRANSFER["suspect"]
    assert "suspect" not in at_police["body"] and at_police["withheld_fields"] == ["suspect"]
    assert at_police["marking"] == "internal"
    [received] = json.loads(cli("inbox", "--json", config=police.setup.config).stdout)
    assert received["handed_off"].endswith("(without suspect: above internal)")
    [at_procuratorate] = inbound_documents(procuratorate)
    assert at_procuratorate["version_of"] == first
    assert "suspect" not in at_procuratorate["body"] and at_procuratorate["withheld_fields"] == []

    # The police file the transfer they got; the procuratorate's redacted copy follows.
    send(
        police,
        tmp_path,
        "reply",
        [ECOLOGY, PROCURATORATE],
        {"status": "filed", "text": "长公环立字〔2026〕15号"},
        "--body-type",
        "feedback",
        "--in-reply-to",
        first,
    )
    wait_for(lambda: state(ecology, first, POLICE) == "filed", what="the filing at the bureau")
    wait_for(
        lambda: state(procuratorate, version["message_id"], ECOLOGY) == "filed",
        what="the procuratorate's redacted copy following the filing",
    )

    # A message whose own marking is above the procuratorate's clearance is refused whole,
    # naming the recipient; nothing is stored, signed or sent.
    body = tmp_path / "confidential.json"
    body.write_text(json.dumps(TRANSFER, ensure_ascii=False), encoding="utf-8")
    sent_before = len(outbox(ecology))
    audited_before = len(audit_events(ecology.setup))
    refused = cli(
        "send",
        "crime-transfer",
        "--to",
        POLICE,
        "--to",
        PROCURATORATE,
        "--body",
        str(body),
        "--confidentiality",
        "confidential",
        config=ecology.setup.config,
    )
    assert refused.returncode != 0
    assert f"'{PROCURATORATE}' may get at most internal" in refused.stderr
    # A marking the node cannot apply names the field.
    typo = cli(
        "send",
        "crime-transfer",
        "--to",
        POLICE,
        "--body",
        str(body),
        "--mark",
        "suspekt=confidential",
        config=ecology.setup.config,
    )
    assert typo.returncode != 0 and "'suspekt' is not a field of crime_transfer" in typo.stderr
    assert len(outbox(ecology)) == sent_before
    assert "sent" not in [e["event"] for e in audit_events(ecology.setup)[audited_before:]]
