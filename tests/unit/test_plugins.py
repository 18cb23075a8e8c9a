"""Plugin loading, hook semantics, and the meta-test that every hook is tested and documented."""

from __future__ import annotations

import inspect
import json
import types
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pluggy
import pytest
import structlog

from node import hookspecs
from node.exchange.review import VerdictError, answer_for, check_verdict, to_review
from node.hookspecs import hookimpl
from node.plugin_api import (
    Accept,
    AttachmentFile,
    CaseChange,
    Decline,
    Draft,
    DraftRejected,
    HandOffWithheld,
    InboundItem,
    NodeAPI,
)
from node.plugins import ENTRY_POINT_GROUP, PluginError, PluginHooks, load_plugin_manager
from tests.fakes import FakeNodeAPI
from tests.unit.test_dropfolder import case_change

REPO = Path(__file__).resolve().parents[2]
BUILTINS = {"ecology", "police", "procuratorate"}


class FakeAPI(FakeNodeAPI):
    def __init__(self, data_dir: Path, agency: str = "police.sz") -> None:
        super().__init__(data_dir, agency=agency)


def make_item(recipients: tuple[str, ...] = ("police.sz",)) -> InboundItem:
    now = datetime(2025, 3, 1, 2, 15, tzinfo=UTC)
    return InboundItem(
        message_id="msg-1",
        family="crime_transfer",
        body_type="crime_transfer",
        sender="ecology.sz",
        recipients=recipients,
        created_at=now,
        received_at=now,
        case_ref="",
        in_reply_to="",
        confidentiality="internal",
        body={"title": "t"},
        attachments=(),
        envelope_sha256="00" * 32,
    )


def plugin(**hooks: Any) -> types.SimpleNamespace:
    """A plugin object whose attributes are the given hook implementations."""
    return types.SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})


def test_fake_api_satisfies_protocol(tmp_path: Path) -> None:
    assert isinstance(FakeAPI(tmp_path), NodeAPI)


def test_entry_points_load_the_builtins() -> None:
    pm = load_plugin_manager()
    assert set(PluginHooks(pm).names) >= BUILTINS
    assert ENTRY_POINT_GROUP == hookspecs.PROJECT_NAME == "liandong"


def test_enabled_keeps_only_named_plugins() -> None:
    pm = load_plugin_manager(enabled=["police"])
    assert PluginHooks(pm).names == ["police"]


def test_enabled_unknown_name_is_a_plugin_error() -> None:
    with pytest.raises(PluginError, match=r"'polize'.*installed: .*police"):
        load_plugin_manager(enabled=["police", "polize"])


def test_misspelt_hook_fails_check_pending() -> None:
    typo = plugin(liandong_hand_of=lambda item, api: "x")
    with pytest.raises(PluginError, match="liandong_hand_of"):
        load_plugin_manager(enabled=[], extra=[typo])


def test_wrong_argument_name_fails_at_registration() -> None:
    bad = plugin(liandong_hand_off=lambda message, api: "x")
    with pytest.raises(PluginError, match="message"):
        load_plugin_manager(enabled=[], extra=[bad])


def test_liandong_hand_off_first_result_wins(tmp_path: Path) -> None:
    calls: list[str] = []

    def declines(item: InboundItem) -> None:
        calls.append("declines")
        return None

    def takes(item: InboundItem) -> str:
        calls.append("takes")
        return "case-42"

    def never_asked(item: InboundItem) -> str:
        calls.append("never_asked")
        return "other"

    # pluggy calls the last registered first.
    extra = [
        plugin(liandong_hand_off=never_asked),
        plugin(liandong_hand_off=takes),
        plugin(liandong_hand_off=declines),
    ]
    hooks = PluginHooks(load_plugin_manager(enabled=[], extra=extra))
    assert hooks.hand_off(make_item(), FakeAPI(tmp_path)) == "case-42"
    assert calls == ["declines", "takes"]


def test_liandong_hand_off_none_when_nobody_takes_it(tmp_path: Path) -> None:
    hooks = PluginHooks(load_plugin_manager(enabled=["police"]))
    # Addressed to another agency: the police plugin declines.
    assert hooks.hand_off(make_item(("procuratorate.sz",)), FakeAPI(tmp_path)) is None


def test_liandong_hand_off_exception_propagates_for_retry(tmp_path: Path) -> None:
    def broken(item: InboundItem) -> str:
        raise OSError("disk full")

    hooks = PluginHooks(load_plugin_manager(enabled=[], extra=[plugin(liandong_hand_off=broken)]))
    with pytest.raises(OSError, match="disk full"):
        hooks.hand_off(make_item(), FakeAPI(tmp_path))


def test_broadcast_hooks_isolate_a_failing_plugin(tmp_path: Path) -> None:
    seen: list[str] = []

    def fails(api: NodeAPI) -> None:
        raise RuntimeError("local system down")

    extra = [
        plugin(
            liandong_node_started=lambda api: seen.append("started"),
            liandong_poll_local_system=lambda api: seen.append("polled"),
            liandong_deliveries_confirmed=lambda confirmations: seen.append("confirmed"),
        ),
        plugin(liandong_node_started=fails, liandong_poll_local_system=fails),
    ]
    hooks = PluginHooks(load_plugin_manager(enabled=[], extra=extra))
    api = FakeAPI(tmp_path)
    with structlog.testing.capture_logs() as logs:
        hooks.node_started(api)
        hooks.poll_local_system(api)
        hooks.deliveries_confirmed([], api)
    assert seen == ["started", "polled", "confirmed"]
    failures = [entry for entry in logs if entry["event"] == "plugin hook failed"]
    assert [f["hook"] for f in failures] == [
        "liandong_node_started",
        "liandong_poll_local_system",
    ]


def test_broadcast_with_a_wrapper_still_calls_every_plugin(tmp_path: Path) -> None:
    seen: list[str] = []

    def around(api: NodeAPI) -> Any:
        seen.append("before")
        yield
        seen.append("after")

    wrapper = types.SimpleNamespace(liandong_poll_local_system=hookimpl(wrapper=True)(around))
    extra = [plugin(liandong_poll_local_system=lambda api: seen.append("polled")), wrapper]
    hooks = PluginHooks(load_plugin_manager(enabled=[], extra=extra))
    hooks.poll_local_system(FakeAPI(tmp_path))
    assert seen == ["before", "polled", "after"]


def test_builtin_plugins_run_through_the_facade(tmp_path: Path) -> None:
    hooks = PluginHooks(load_plugin_manager(enabled=["police"]))
    api = FakeAPI(tmp_path)
    hooks.node_started(api)
    assert (tmp_path / "local" / "drafts" / "processed").is_dir()
    (tmp_path / "local" / "drafts" / "a.json").write_text(
        '{"family": "notice", "to": ["ecology.sz"], "body": {"title": "t"}}', encoding="utf-8"
    )
    hooks.poll_local_system(api)
    assert [d.family for d in api.submitted] == ["notice"]
    ref = hooks.hand_off(make_item(), api)
    assert ref == str(tmp_path / "local" / "inbound" / "msg-1.json")


class ConfiguredAPI(FakeAPI):
    def __init__(self, data_dir: Path, settings: Mapping[str, Any]) -> None:
        super().__init__(data_dir, agency="140400/ecology")
        self.settings = settings

    def plugin_config(self, name: str) -> Mapping[str, Any]:
        return self.settings


def test_liandong_redact_first_result_wins(tmp_path: Path) -> None:
    draft = Draft(family="notice", recipients=("a/x", "b/y"), body={"title": "t", "text": "x"})
    shorter = replace(draft, body={"title": "t"})
    calls: list[str] = []

    def passes(recipient: str) -> None:
        calls.append(f"passes {recipient}")

    def redacts(draft: Draft, recipient: str) -> Draft | None:
        calls.append(f"redacts {recipient}")
        return shorter if recipient == "b/y" else None

    def never(draft: Draft) -> Draft:
        raise AssertionError("asked after a first result")

    # pluggy asks the last registered first.
    extra = [plugin(liandong_redact=never), plugin(liandong_redact=redacts)]
    extra.append(plugin(liandong_redact=passes))
    hooks = PluginHooks(load_plugin_manager(enabled=[], extra=extra))
    assert hooks.redacts
    with pytest.raises(AssertionError, match="first result"):
        hooks.redact(draft, "a/x", FakeAPI(tmp_path))  # no one answered: the third is asked
    calls.clear()
    assert hooks.redact(draft, "b/y", FakeAPI(tmp_path)) == shorter
    assert calls == ["passes b/y", "redacts b/y"]
    assert not PluginHooks(load_plugin_manager(enabled=[])).redacts


def test_adapters_redact_by_recipient_clearance(tmp_path: Path) -> None:
    from plugins.adapters import AgencyAdapters

    adapters = AgencyAdapters("ecology")
    api = ConfiguredAPI(tmp_path, {"recipients": {"140400/discipline": "internal"}})
    draft = Draft(
        family="notice",
        recipients=("140400/police", "140400/discipline"),
        body={"title": "重大舆情", "text": "涉事企业：某电镀厂", "kind": "KIND_MAJOR_INCIDENT"},
        confidentiality="internal",
        field_markings={"text": "confidential"},
    )
    assert adapters.liandong_redact(draft, "140400/police", api) is None  # not listed: whole
    version = adapters.liandong_redact(draft, "140400/discipline", api)
    assert version is not None
    assert version.body == {"title": "重大舆情", "kind": "KIND_MAJOR_INCIDENT"}
    assert version.field_markings == {}
    assert replace(version, body=draft.body, field_markings=draft.field_markings) == draft
    # A field spelt the JSON way is taken out as well.
    camel = replace(
        draft,
        body={"title": "t", "legalBasis": "x"},
        field_markings={"legal_basis": "confidential"},
    )
    assert adapters.liandong_redact(camel, "140400/discipline", api).body == {"title": "t"}  # type: ignore[union-attr]
    # Nothing above the recipient's clearance: nothing to do.
    plain = replace(draft, field_markings={})
    assert adapters.liandong_redact(plain, "140400/discipline", api) is None
    with pytest.raises(DraftRejected, match="'140400/discipline' may get at most internal"):
        adapters.liandong_redact(
            replace(draft, confidentiality="confidential"), "140400/discipline", api
        )
    typo = ConfiguredAPI(tmp_path, {"recipients": {"140400/discipine": "internal"}})
    with pytest.raises(ValueError, match="'140400/discipine'"):
        adapters.liandong_redact(draft, "140400/discipline", typo)
    broken = ConfiguredAPI(tmp_path, {"recipients": {"140400/discipline": "secret"}})
    with pytest.raises(ValueError, match=r"\[plugins.ecology.recipients\] '140400/discipline'"):
        adapters.liandong_redact(draft, "140400/discipline", broken)


def test_adapters_hand_off_without_the_fields_above_clearance(tmp_path: Path) -> None:
    from plugins.adapters import AgencyAdapters

    adapters = AgencyAdapters("police")
    api = FakeAPI(tmp_path)  # cleared for internal, the default
    item = replace(
        make_item(),
        body={"title": "t", "suspect": "某电镀厂"},
        field_markings={"suspect": "confidential"},
    )
    reference = adapters.liandong_hand_off(item, api)
    assert reference is not None and reference.endswith("(without suspect: above internal)")
    written = json.loads(Path(reference.split(" (")[0]).read_bytes())
    assert written["body"] == {"title": "t"} and written["withheld_fields"] == ["suspect"]
    with pytest.raises(HandOffWithheld, match="marked confidential"):
        adapters.liandong_hand_off(
            replace(item, confidentiality="confidential", field_markings={}), api
        )


# -- meta-tests: every hook is tested and documented (after datasette's test_plugins.py) -----


def test_liandong_review_inbound_first_result_wins(tmp_path: Path) -> None:
    calls: list[str] = []

    def undecided(item: InboundItem) -> None:
        calls.append("undecided")

    def declines(item: InboundItem) -> Decline:
        calls.append("declines")
        return Decline("线索未附证据材料")

    def never(item: InboundItem) -> Accept:
        raise AssertionError("asked after a first result")

    # pluggy asks the last registered first.
    extra = [
        plugin(liandong_review_inbound=never),
        plugin(liandong_review_inbound=declines),
        plugin(liandong_review_inbound=undecided),
    ]
    hooks = PluginHooks(load_plugin_manager(enabled=[], extra=extra))
    assert hooks.reviews
    assert hooks.review_inbound(make_item(), FakeAPI(tmp_path)) == Decline("线索未附证据材料")
    assert calls == ["undecided", "declines"]
    assert not PluginHooks(load_plugin_manager(enabled=[])).reviews


def test_verdicts_are_checked_against_the_lifecycle_on_arrival() -> None:
    check_verdict("clue", Accept())
    check_verdict("clue", Decline("不属本院管辖", "forwarded"))
    check_verdict("crime_transfer", Accept("filed"))
    check_verdict("notice", Accept("read"))
    with pytest.raises(VerdictError, match=r"'filed' on arrival .*accepted, declined, forwarded"):
        check_verdict("clue", Accept("filed"))
    with pytest.raises(VerdictError, match="needs a reason"):
        check_verdict("crime_transfer", Accept("not_filed"))
    with pytest.raises(VerdictError, match="declining with 'declined' needs a reason"):
        check_verdict("clue", Decline(" "))
    with pytest.raises(VerdictError, match=r"evidence_request case cannot .* 'delayed'"):
        check_verdict("evidence_request", Accept("delayed", "人手不足"))
    with pytest.raises(VerdictError, match="not a str"):
        check_verdict("clue", "accepted")  # type: ignore[arg-type]
    with pytest.raises(VerdictError, match="opens no case"):
        check_verdict("reply", Accept())


def test_the_procuratorates_copy_of_a_crime_transfer_is_not_answered_on_arrival() -> None:
    transfer = make_item(("140400/police", "140400/procuratorate"))
    assert to_review(transfer, "140400/police")
    assert not to_review(transfer, "140400/procuratorate")  # 抄送: filing is the police's
    clue = replace(transfer, family="clue", body_type="clue", recipients=("140400/procuratorate",))
    assert to_review(clue, "140400/procuratorate")
    assert not to_review(replace(clue, family="reply", body_type="feedback"), "140400/police")


def test_an_answer_goes_to_the_sender_and_a_transfers_other_recipients() -> None:
    transfer = make_item(("police.sz", "procuratorate.sz"))
    answer = answer_for(transfer, Accept("filed"), "police.sz")
    assert answer.recipients == ("ecology.sz", "procuratorate.sz")
    assert (answer.family, answer.body_type, answer.in_reply_to) == ("reply", "feedback", "msg-1")
    assert answer.body == {"status": "filed"}
    assert answer.source == "review:msg-1"  # one answer per item, however often asked
    clue = replace(transfer, family="clue", body_type="clue", confidentiality="confidential")
    declined = answer_for(clue, Decline("不属本院管辖", "forwarded"), "police.sz")
    assert declined.recipients == ("ecology.sz",)
    assert declined.body == {"status": "forwarded", "text": "不属本院管辖"}
    assert declined.confidentiality == "confidential"


def test_adapters_review_by_the_first_matching_rule(tmp_path: Path) -> None:
    from plugins.adapters import AgencyAdapters

    adapters = AgencyAdapters("procuratorate")
    rules = [
        {"family": "clue", "without_attachments": True, "decline": "declined", "reason": "无证据"},
        {"family": "clue", "from": "140400/ecology", "accept": "accepted"},
    ]
    api = ConfiguredAPI(tmp_path, {"review": rules})
    clue = replace(
        make_item(("140400/ecology",)), family="clue", body_type="clue", sender="140400/ecology"
    )
    assert adapters.liandong_review_inbound(clue, api) == Decline("无证据")
    attachment = AttachmentFile("a.pdf", "00" * 32, 1, "application/pdf", tmp_path / "a")
    with_evidence = replace(clue, attachments=(attachment,))
    assert adapters.liandong_review_inbound(with_evidence, api) == Accept("accepted")
    from_police = replace(with_evidence, sender="140400/police")
    assert adapters.liandong_review_inbound(from_police, api) is None
    transfer = replace(with_evidence, family="crime_transfer", body_type="crime_transfer")
    assert adapters.liandong_review_inbound(transfer, api) is None
    # Not addressed to this node: none of its business.
    assert adapters.liandong_review_inbound(replace(clue, recipients=("x/y",)), api) is None


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ({"family": "clue"}, "either accept = EVENT or decline = EVENT"),
        ({"family": "clue", "accept": "a", "decline": "b"}, "either accept"),
        ({"accept": "accepted"}, "family is required"),
        ({"family": "clue", "accept": "filed"}, "cannot be answered with 'filed'"),
        ({"family": "clue", "decline": "declined"}, "needs a reason"),
        ({"family": "clue", "accept": "accepted", "form": "x"}, "unknown key form"),
        ({"family": "clue", "accept": "accepted", "from": "ecology"}, r"#1 from: "),
        ({"family": "clue", "accept": "accepted", "without_attachments": "yes"}, "true or false"),
    ],
)
def test_adapters_review_rules_are_checked(
    tmp_path: Path, rule: dict[str, Any], problem: str
) -> None:
    from plugins.adapters import AgencyAdapters

    api = ConfiguredAPI(tmp_path, {"review": [rule]})
    with pytest.raises(ValueError, match=problem) as raised:
        AgencyAdapters("police").review_rules(api)
    assert "[[plugins.police.review]] #1" in str(raised.value)


def test_liandong_cases_changed_reaches_each_plugin_on_its_own_and_the_drop_folder(
    tmp_path: Path,
) -> None:
    seen: list[int] = []

    def fails(changes: Sequence[CaseChange]) -> None:
        raise OSError("local system down")

    change = case_change(3)
    extra = [
        plugin(liandong_cases_changed=lambda changes: seen.extend(c.sequence for c in changes)),
        plugin(liandong_cases_changed=fails),
    ]
    hooks = PluginHooks(load_plugin_manager(enabled=["ecology"], extra=extra))
    watchers = hooks.case_watchers
    assert len(watchers) == 3 and "ecology" in watchers
    api = FakeAPI(tmp_path)
    failed = []
    for name in watchers:
        try:
            hooks.cases_changed(name, [change], api)
        except OSError:
            failed.append(name)
    assert seen == [3]
    assert len(failed) == 1 and failed[0] != "ecology"
    [line] = (tmp_path / "local" / "cases" / "2026-11-25.jsonl").read_text().splitlines()
    assert json.loads(line)["to_state"] == "not_filed"


def test_a_hook_wrapper_on_case_changes_makes_one_watcher_of_the_whole_hook(
    tmp_path: Path,
) -> None:
    calls: list[str] = []

    class Wrapper:
        @hookimpl(wrapper=True)
        def liandong_cases_changed(self, changes: Sequence[CaseChange]) -> Any:
            calls.append("before")
            result = yield
            calls.append("after")
            return result

    seen = plugin(liandong_cases_changed=lambda changes: calls.append("plugin"))
    hooks = PluginHooks(load_plugin_manager(enabled=[], extra=[seen, Wrapper()]))
    assert hooks.case_watchers == ["*"]
    hooks.cases_changed("*", [case_change(1)], FakeAPI(tmp_path))
    assert calls == ["before", "plugin", "after"]


def _hook_names() -> list[str]:
    return sorted(
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("liandong_") and hasattr(fn, "liandong_spec")
    )


def test_liandong_deadline_rules_all_results_later_plugins_win_config_wins_over_all(
    tmp_path: Path,
) -> None:
    from dataclasses import replace

    from node.exchange.deadlines import Deadlines

    base = Deadlines()
    feedback = base.rule("clue.feedback")
    filing = base.rule("crime_transfer.filing")
    assert feedback is not None and filing is not None
    first = [replace(feedback, amount=20), replace(filing, amount=5)]
    second = [replace(feedback, amount=25)]

    def broken(api: NodeAPI) -> Any:
        raise RuntimeError("no rules table")

    extra = [
        plugin(liandong_deadline_rules=lambda api: first),
        plugin(liandong_deadline_rules=lambda: second),
        plugin(liandong_deadline_rules=broken),
    ]
    hooks = PluginHooks(load_plugin_manager(enabled=[], extra=extra))
    with structlog.testing.capture_logs() as logs:
        rules = hooks.deadline_rules(FakeAPI(tmp_path))
    assert [(r.name, r.amount) for r in rules] == [
        ("clue.feedback", 20),
        ("crime_transfer.filing", 5),
        ("clue.feedback", 25),
    ]
    assert [e["hook"] for e in logs if e["event"] == "plugin hook failed"] == [
        "liandong_deadline_rules"
    ]
    merged = base.with_plugin_rules(rules)
    assert merged.rule("clue.feedback").amount == 25  # type: ignore[union-attr]
    configured = replace(base, configured=frozenset({"crime_transfer.filing"}))
    assert configured.with_plugin_rules(rules).rule("crime_transfer.filing") == filing
    assert configured.with_plugin_rules(rules).rule("clue.feedback").amount == 25  # type: ignore[union-attr]


def test_hookspecs_are_discovered() -> None:
    assert _hook_names() == [
        "liandong_cases_changed",
        "liandong_deadline_rules",
        "liandong_deliveries_confirmed",
        "liandong_hand_off",
        "liandong_node_started",
        "liandong_poll_local_system",
        "liandong_redact",
        "liandong_review_inbound",
    ]


def test_every_hook_has_a_test() -> None:
    texts = [
        path.read_text(encoding="utf-8")
        for path in (REPO / "tests").rglob("test_*.py")
        if path.resolve() != Path(__file__).resolve()
    ]
    # This file lists every hook name in the meta-tests, so here only the source of the
    # other test functions counts; otherwise this test could never fail.
    meta = {"test_hookspecs_are_discovered", "test_every_hook_has_a_test"}
    texts += [
        inspect.getsource(fn)
        for name, fn in list(globals().items())
        if name.startswith("test_") and name not in meta and inspect.isfunction(fn)
    ]
    missing = [name for name in _hook_names() if not any(name in text for text in texts)]
    assert not missing, f"hooks with no test mentioning them by name: {missing}"


def test_every_hook_is_documented() -> None:
    docs = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    missing = [name for name in _hook_names() if f"### `{name}(" not in docs]
    assert not missing, f"hooks with no section in docs/plugins.md: {missing}"


def test_every_hook_has_a_docstring_and_types() -> None:
    for name in _hook_names():
        fn = getattr(hookspecs, name)
        assert inspect.getdoc(fn), f"{name} has no docstring"
        hints = fn.__annotations__
        assert "return" in hints, f"{name} has no return annotation"
        assert set(inspect.signature(fn).parameters) <= set(hints), f"{name} has untyped params"


def test_hookspec_markers_are_pluggy_markers() -> None:
    assert isinstance(hookspecs.hookspec, pluggy.HookspecMarker)
    assert isinstance(hookspecs.hookimpl, pluggy.HookimplMarker)
