"""The drop-folder adapter and the built-in plugins' hooks, on real files in tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from node.plugin_api import (
    AttachmentFile,
    CaseChange,
    Confidentiality,
    DeliveryConfirmation,
    Draft,
    DraftRejected,
    HandOffWithheld,
    InboundItem,
)
from plugins import police
from plugins.dropfolder import DropFolder, safe_file_name
from tests.fakes import FakeNodeAPI

NOW = datetime(2025, 3, 1, 2, 15, tzinfo=UTC)


class Submitter:
    """Stands in for NodeAPI.submit, including its dedup on `source`."""

    def __init__(self, reject: Mapping[str, str] | None = None) -> None:
        self.reject = dict(reject or {})
        self.calls: list[Draft] = []
        self.by_source: dict[str, str] = {}

    def __call__(self, draft: Draft) -> str:
        self.calls.append(draft)
        reason = self.reject.get(draft.body.get("title", ""))
        if reason:
            raise DraftRejected(reason)
        if draft.source not in self.by_source:
            self.by_source[draft.source] = f"msg-{len(self.by_source) + 1}"
        return self.by_source[draft.source]


class FakeAPI(FakeNodeAPI):
    def __init__(self, data_dir: Path, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(data_dir, agency="police.sz", plugin="police", config=config)
        self.submitter = Submitter()

    def submit(self, draft: Draft) -> str:
        return self.submitter(draft)


def make_attachment(tmp_path: Path, name: str, data: bytes) -> AttachmentFile:
    store = tmp_path / "node-store"
    store.mkdir(exist_ok=True)
    path = store / hashlib.sha256(data).hexdigest()
    path.write_bytes(data)
    return AttachmentFile(
        file_name=name,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        media_type="application/pdf",
        path=path,
    )


def make_item(
    attachments: tuple[AttachmentFile, ...] = (),
    recipients: tuple[str, ...] = ("police.sz",),
    confidentiality: Confidentiality = "confidential",
) -> InboundItem:
    return InboundItem(
        message_id="01J9Z3K6N2",
        family="crime_transfer",
        body_type="crime_transfer",
        sender="ecology.sz",
        recipients=recipients,
        created_at=NOW.astimezone(timezone(timedelta(hours=8))),
        received_at=NOW.replace(tzinfo=None),
        case_ref="深环罚〔2025〕12号",
        in_reply_to="",
        confidentiality=confidentiality,
        body={"title": "非法倾倒危险废物", "facts": "5 t"},
        attachments=attachments,
        envelope_sha256="ab" * 32,
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def drop(folder: DropFolder, name: str, content: object | str) -> Path:
    folder.drafts.mkdir(parents=True, exist_ok=True)
    path = folder.drafts / name
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    return path


GOOD = {"family": "clue", "to": ["procuratorate.sz"], "body": {"title": "good"}}


# -- inbound -------------------------------------------------------------------------------


def test_write_inbound_content(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    path = folder.write_inbound(make_item())
    assert path == tmp_path / "local" / "inbound" / "01J9Z3K6N2.json"
    text = path.read_text(encoding="utf-8")
    assert "非法倾倒危险废物" in text  # ensure_ascii=False
    assert text.startswith("{\n  ")  # indented
    doc = json.loads(text)
    assert doc["created_at"] == "2025-03-01T02:15:00Z"
    assert doc["received_at"] == "2025-03-01T02:15:00Z"  # naive taken as UTC
    assert doc["recipients"] == ["police.sz"]
    assert doc["confidentiality"] == "confidential"
    assert doc["envelope_sha256"] == "ab" * 32
    assert doc["body"] == {"title": "非法倾倒危险废物", "facts": "5 t"}
    assert doc["attachments"] == []
    assert set(doc) == {
        "message_id",
        "family",
        "body_type",
        "sender",
        "recipients",
        "created_at",
        "received_at",
        "case_ref",
        "in_reply_to",
        "confidentiality",
        "field_markings",
        "marking",
        "envelope_sha256",
        "body",
        "withheld_fields",
        "attachments",
    }
    assert (doc["field_markings"], doc["marking"], doc["withheld_fields"]) == (
        {},
        "confidential",
        [],
    )


def test_write_inbound_leaves_out_withheld_fields_and_says_so(tmp_path: Path) -> None:
    item = replace(
        make_item(),
        confidentiality="internal",
        field_markings={"facts": "confidential"},
        version_of="0190f5b4-1c2d-7e3f-8a4b-5c6d7e8f9a0b",
    )
    assert item.marking == "confidential"
    doc = json.loads(DropFolder(tmp_path / "local").write_inbound(item, ["facts"]).read_bytes())
    assert doc["body"] == {"title": "非法倾倒危险废物"}
    assert doc["withheld_fields"] == ["facts"]
    # What the file holds is internal: the confidential field is not in it.
    assert (doc["field_markings"], doc["marking"]) == ({}, "internal")
    assert doc["version_of"] == "0190f5b4-1c2d-7e3f-8a4b-5c6d7e8f9a0b"
    whole = json.loads(DropFolder(tmp_path / "other").write_inbound(item).read_bytes())
    assert whole["body"]["facts"] == "5 t"
    assert (whole["field_markings"], whole["marking"]) == (
        {"facts": "confidential"},
        "confidential",
    )


def test_write_inbound_is_idempotent_and_leaves_no_temp_files(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    item = make_item((make_attachment(tmp_path, "report.pdf", b"%PDF-1 data"),))
    first = folder.write_inbound(item)
    content = first.read_bytes()
    mtime = first.stat().st_mtime_ns
    second = folder.write_inbound(item)
    assert second == first
    assert second.read_bytes() == content
    assert second.stat().st_mtime_ns == mtime  # identical content is not rewritten
    assert sorted(p.name for p in folder.inbound.iterdir()) == ["01J9Z3K6N2", "01J9Z3K6N2.json"]
    assert leftovers(folder.root) == []


def test_write_inbound_replaces_a_stale_file_atomically(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    folder.inbound.mkdir(parents=True)
    (folder.inbound / "01J9Z3K6N2.json").write_text("half a fi", encoding="utf-8")
    path = folder.write_inbound(make_item())
    assert json.loads(path.read_text(encoding="utf-8"))["message_id"] == "01J9Z3K6N2"
    assert leftovers(folder.root) == []


def test_write_inbound_copies_attachments(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    report = make_attachment(tmp_path, "监测报告.pdf", b"%PDF-1 monitoring")
    photo = make_attachment(tmp_path, "photo.jpg", b"\xff\xd8 jpeg")
    doc = json.loads(folder.write_inbound(make_item((report, photo))).read_text("utf-8"))
    copies = [Path(a["path"]) for a in doc["attachments"]]
    assert copies == [
        folder.inbound / "01J9Z3K6N2" / "监测报告.pdf",
        folder.inbound / "01J9Z3K6N2" / "photo.jpg",
    ]
    assert copies[0].read_bytes() == b"%PDF-1 monitoring"
    assert doc["attachments"][0] == {
        "file_name": "监测报告.pdf",
        "sha256": report.sha256,
        "size": report.size,
        "media_type": "application/pdf",
        "path": str(copies[0]),
    }


def test_write_inbound_refuses_a_corrupted_attachment(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    attachment = make_attachment(tmp_path, "a.pdf", b"original")
    attachment.path.write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        folder.write_inbound(make_item((attachment,)))
    assert not (folder.inbound / "01J9Z3K6N2.json").exists()
    assert leftovers(folder.root) == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("..", "file"),
        (".hidden", "hidden"),
        ("a/b/../c.pdf", "c.pdf"),
        ("报告 1.pdf", "报告_1.pdf"),
        ("nul\x00byte.txt", "nulbyte.txt"),
        ("", "file"),
    ],
)
def test_safe_file_name(name: str, expected: str) -> None:
    assert safe_file_name(name) == expected


def test_write_inbound_sanitizes_attachment_names(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    evil = make_attachment(tmp_path, "../../../escape.sh", b"#!/bin/sh")
    dup = make_attachment(tmp_path, "sub/escape.sh", b"#!/bin/sh other")
    dots = make_attachment(tmp_path, "..", b"dots")
    doc = json.loads(folder.write_inbound(make_item((evil, dup, dots))).read_text("utf-8"))
    paths = [Path(a["path"]) for a in doc["attachments"]]
    assert [p.name for p in paths] == ["escape.sh", "escape-2.sh", "attachment-3"]
    assert all(p.parent == folder.inbound / "01J9Z3K6N2" for p in paths)
    assert not (tmp_path / "escape.sh").exists()
    assert doc["attachments"][0]["file_name"] == "../../../escape.sh"  # the sender's name


def test_a_name_too_long_for_the_file_system_is_cut_keeping_its_extension(
    tmp_path: Path,
) -> None:
    # A 362-byte name once made every hand-off fail with "File name too long", for ever.
    assert len(safe_file_name("a" * 362).encode()) == 200
    cut = safe_file_name("报" * 120 + ".pdf")
    assert cut.endswith(".pdf") and len(cut.encode()) <= 200
    assert cut.encode().decode() == cut  # no character split
    folder = DropFolder(tmp_path / "local")
    long_name = "报告" * 60 + ".pdf"  # 364 bytes
    first = make_attachment(tmp_path, long_name, b"one")
    second = make_attachment(tmp_path, "x/" + long_name, b"two")
    doc = json.loads(folder.write_inbound(make_item((first, second))).read_text("utf-8"))
    names = [Path(a["path"]).name for a in doc["attachments"]]
    assert names[1] == names[0][: -len(".pdf")] + "-2.pdf"
    assert all(len(name.encode()) <= 210 and name.endswith(".pdf") for name in names)
    assert [Path(a["path"]).read_bytes() for a in doc["attachments"]] == [b"one", b"two"]


# -- drafts --------------------------------------------------------------------------------


def test_good_draft_is_submitted_and_processed(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    (tmp_path / "local" / "drafts" / "evidence").mkdir(parents=True)
    (tmp_path / "local" / "drafts" / "evidence" / "photo.jpg").write_bytes(b"jpeg")
    draft_json = {
        **GOOD,
        "body_type": "",
        "case_ref": "C-1",
        "in_reply_to": "m0",
        "confidentiality": "confidential",
        "attachments": ["evidence/photo.jpg"],
    }
    drop(folder, "001.json", draft_json)
    submit = Submitter()
    outcomes = folder.collect_drafts(submit)
    assert [(o.path, o.message_id, o.error) for o in outcomes] == [
        (folder.processed / "001.json", "msg-1", None)
    ]
    (draft,) = submit.calls
    assert draft.family == "clue"
    assert draft.recipients == ("procuratorate.sz",)
    assert draft.body == {"title": "good"}
    assert draft.case_ref == "C-1"
    assert draft.in_reply_to == "m0"
    assert draft.confidentiality == "confidential"
    assert draft.attachments == ((folder.drafts / "evidence" / "photo.jpg").resolve(),)
    assert draft.attachments[0].is_absolute()
    assert str(folder.drafts / "001.json") in draft.source
    assert (folder.processed / "001.json.message_id").read_text() == "msg-1\n"
    assert not (folder.drafts / "001.json").exists()
    assert list(folder.processing.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"family": "clue", "to": [', "not valid UTF-8 JSON"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ({"to": ["x"], "body": {}}, "field 'family'"),
        ({"family": "clue", "to": "procuratorate.sz", "body": {}}, "field 'to'"),
        ({"family": "clue", "to": [3], "body": {}}, "field 'to[0]'"),
        ({"family": "clue", "to": ["x"]}, "field 'body'"),
        ({"family": "clue", "to": ["x"], "body": {}, "case_ref": 7}, "field 'case_ref'"),
        ({**GOOD, "confidentiality": "secret"}, "field 'confidentiality'"),
        ({**GOOD, "recipients": ["x"]}, "unknown field(s) 'recipients'"),
        ({**GOOD, "attachments": ["missing.pdf"]}, "field 'attachments[0]': file not found"),
        ({**GOOD, "attachments": "a.pdf"}, "field 'attachments'"),
        ({**GOOD, "attachments": ["/etc/hostname"]}, "must be relative"),
        ({**GOOD, "attachments": ["../../outside.txt"]}, "outside the drop folder"),
        ({**GOOD, "body": {"title": "bad-recipient"}}, "rejected by the node: to[0]: unknown"),
    ],
)
def test_bad_draft_goes_to_failed_and_does_not_block_others(
    tmp_path: Path, content: object, problem: str
) -> None:
    folder = DropFolder(tmp_path / "local")
    (tmp_path / "outside.txt").write_text("secret", encoding="utf-8")
    drop(folder, "001-bad.json", content)
    drop(folder, "002-good.json", GOOD)
    submit = Submitter(reject={"bad-recipient": "to[0]: unknown agency 'x'"})
    outcomes = folder.collect_drafts(submit)
    bad, good = outcomes
    assert bad.message_id is None
    assert bad.path == folder.failed / "001-bad.json"
    assert bad.error is not None
    assert problem in bad.error
    error_text = (folder.failed / "001-bad.json.error.txt").read_text(encoding="utf-8")
    assert str(folder.drafts / "001-bad.json") in error_text  # names the file
    assert problem in error_text
    assert good.message_id == "msg-1"
    assert (folder.processed / "002-good.json").exists()
    assert sorted(p.name for p in folder.drafts.iterdir() if p.is_file()) == []


def test_drafts_are_processed_in_name_order(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    for name in ["b.json", "c.json", "a.json"]:
        drop(folder, name, {**GOOD, "body": {"title": name}})
    submit = Submitter()
    folder.collect_drafts(submit)
    assert [d.body["title"] for d in submit.calls] == ["a.json", "b.json", "c.json"]


def test_ignored_names_are_left_alone(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    for name in [".x.json", "x.tmp", "x.json.tmp", "notes.txt"]:
        drop(folder, name, GOOD)
    submit = Submitter()
    assert folder.collect_drafts(submit) == []
    assert submit.calls == []
    assert sorted(p.name for p in folder.drafts.iterdir() if p.is_file()) == [
        ".x.json",
        "notes.txt",
        "x.json.tmp",
        "x.tmp",
    ]


def test_draft_left_in_processing_is_resubmitted_with_the_same_source(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    drop(folder, "001.json", GOOD)
    submit = Submitter()

    # Simulate a crash after the node accepted the draft but before the file moved on.
    def crash_after_submit(draft: Draft) -> str:
        submit(draft)
        raise SystemExit("node killed")

    with pytest.raises(SystemExit):
        folder.collect_drafts(crash_after_submit)
    assert (folder.processing / "001.json").exists()

    outcomes = folder.collect_drafts(submit)
    first, second = submit.calls
    assert second.source == first.source
    assert [o.message_id for o in outcomes] == ["msg-1"]  # the same message, not a second one
    assert (folder.processed / "001.json.message_id").read_text() == "msg-1\n"
    assert list(folder.processing.iterdir()) == []


def test_reused_draft_name_with_new_content_is_a_new_message(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    submit = Submitter()
    drop(folder, "daily.json", GOOD)
    folder.collect_drafts(submit)
    drop(folder, "daily.json", {**GOOD, "body": {"title": "next day"}})
    (outcome,) = folder.collect_drafts(submit)
    assert outcome.message_id == "msg-2"
    assert outcome.path == folder.processed / "daily-1.json"
    assert (folder.processed / "daily.json.message_id").read_text() == "msg-1\n"


def test_transient_submit_error_keeps_the_draft_for_retry(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    drop(folder, "001.json", GOOD)

    def unavailable(draft: Draft) -> str:
        raise ConnectionError("database unavailable")

    (outcome,) = folder.collect_drafts(unavailable)
    assert outcome.path == folder.processing / "001.json"
    assert outcome.error is not None
    assert "will retry" in outcome.error
    assert list(folder.failed.iterdir()) == []
    (retried,) = folder.collect_drafts(Submitter())
    assert retried.message_id == "msg-1"


def test_drafts_go_to_the_node_in_batches_in_name_order(tmp_path: Path) -> None:
    from plugins.dropfolder import DRAFT_BATCH

    folder = DropFolder(tmp_path / "local")
    submit = Submitter(reject={"refused": "recipient unknown"})
    batches: list[int] = []

    def submit_many(drafts: Sequence[Draft]) -> list[str | Exception]:
        batches.append(len(drafts))
        results: list[str | Exception] = []
        for draft in drafts:
            if draft.body.get("title") == "later":
                results.append(ConnectionError("node busy"))
                continue
            try:
                results.append(submit(draft))
            except DraftRejected as error:
                results.append(error)
        return results

    many = DRAFT_BATCH + 6
    for n in range(many):
        drop(folder, f"a{n:03}.json", {**GOOD, "body": {"title": f"good {n}"}})
    drop(folder, "b-bad.json", "{not json")
    drop(folder, "c-refused.json", {**GOOD, "body": {"title": "refused"}})
    drop(folder, "d-later.json", {**GOOD, "body": {"title": "later"}})
    drop(folder, "e.csv", "family,to,body.title\nclue,procuratorate.sz,row one\nclue,,no one\n")
    drop(folder, "f-last.json", GOOD)
    outcomes = folder.collect_drafts(lambda draft: "never one by one", submit_many)

    names = [o.path.name for o in outcomes]
    assert names[:many] == [f"a{n:03}.json" for n in range(many)]
    assert names[many:] == ["b-bad.json", "c-refused.json", "d-later.json", "e.csv", "f-last.json"]
    # One call per batch: the JSON before the CSV, the CSV's rows, the JSON after it.
    assert batches == [DRAFT_BATCH, 6 + 2, 1, 1]
    assert [o.message_id for o in outcomes[:3]] == ["msg-1", "msg-2", "msg-3"]
    assert (folder.processed / "a000.json.message_id").read_text() == "msg-1\n"
    bad, refused, later, csv_file, last = outcomes[many:]
    assert bad.path.parent == folder.failed and "not valid UTF-8 JSON" in (bad.error or "")
    assert refused.path.parent == folder.failed and "recipient unknown" in (refused.error or "")
    assert later.path == folder.processing / "d-later.json" and "will retry" in (later.error or "")
    assert csv_file.path.parent == folder.failed and "row 3: field 'to'" in (csv_file.error or "")
    assert last.path.parent == folder.processed and last.message_id


def test_names_chosen_in_one_batch_do_not_collide(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    folder.ensure_folders()
    (folder.processed / "a.json").write_text("{}", encoding="utf-8")  # from an earlier day
    drop(folder, "a-1.json", {**GOOD, "body": {"title": "first"}})
    drop(folder, "a.json", {**GOOD, "body": {"title": "second"}})
    submit = Submitter()
    first, second = folder.collect_drafts(submit, partial(_one_at_a_time, submit))
    # "a.json" is taken on disk and "a-1.json" by the batch: the second goes to "a-2.json".
    assert (first.path.name, second.path.name) == ("a-1.json", "a-2.json")
    assert json.loads(first.path.read_bytes())["body"]["title"] == "first"
    assert json.loads(second.path.read_bytes())["body"]["title"] == "second"
    assert (folder.processed / "a-1.json.message_id").read_text() == "msg-1\n"
    assert (folder.processed / "a-2.json.message_id").read_text() == "msg-2\n"


def _one_at_a_time(submit: Submitter, drafts: Sequence[Draft]) -> list[str | Exception]:
    return [submit(draft) for draft in drafts]


def test_draft_with_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    folder.drafts.mkdir(parents=True)
    (folder.drafts / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode())
    (outcome,) = folder.collect_drafts(Submitter())
    assert outcome.message_id == "msg-1"


# -- receipts ------------------------------------------------------------------------------


def confirmation(message_id: str, delivered_at: datetime = NOW) -> DeliveryConfirmation:
    return DeliveryConfirmation(
        message_id=message_id,
        recipient="procuratorate/sz",
        delivered_at=delivered_at,
        receipt_sha256="cd" * 32,
        receiver_log_index=4711,
    )


def test_confirmations_are_appended_to_the_days_log(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    [path] = folder.append_confirmations([confirmation("01J9Z3K6N2"), confirmation("01J9Z3K6N3")])
    assert path == folder.receipts / "2025-03-01.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {
            "message_id": message_id,
            "recipient": "procuratorate/sz",
            "delivered_at": "2025-03-01T02:15:00Z",
            "receipt_sha256": "cd" * 32,
            "receiver_log_index": 4711,
        }
        for message_id in ("01J9Z3K6N2", "01J9Z3K6N3")
    ]
    # A later group goes after them; one delivered the next (UTC) day goes to that day's log.
    later = folder.append_confirmations(
        [confirmation("01J9Z3K6N4"), confirmation("01J9Z3K6N5", NOW + timedelta(days=1))]
    )
    assert later == [path, folder.receipts / "2025-03-02.jsonl"]
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3
    assert sorted(os.listdir(folder.receipts)) == ["2025-03-01.jsonl", "2025-03-02.jsonl"]


def test_a_line_cut_short_by_a_crash_does_not_swallow_the_next(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    [path] = folder.append_confirmations([confirmation("01J9Z3K6N2")])
    with path.open("ab") as fh:
        fh.write(b'{"message_id": "01J9Z3K6N3", "recip')  # the node died mid-write
    folder.append_confirmations([confirmation("01J9Z3K6N4")])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    assert json.loads(lines[2])["message_id"] == "01J9Z3K6N4"


# -- the built-in plugin's hooks -----------------------------------------------------------


def test_police_plugin_hooks_use_the_configured_folder(tmp_path: Path) -> None:
    api = FakeAPI(tmp_path, {"folder": "case-system"})
    root = tmp_path / "case-system"

    police.liandong_node_started(api)
    assert (root / "drafts" / "failed").is_dir()
    assert (root / "receipts").is_dir()

    drop(DropFolder(root), "001.json", GOOD)
    police.liandong_poll_local_system(api)
    assert [d.family for d in api.submitter.calls] == ["clue"]

    # make_item() is marked confidential: the adapter is cleared for internal by default.
    with pytest.raises(HandOffWithheld, match=r"marked confidential; .* cleared for internal"):
        police.liandong_hand_off(make_item(), api)
    assert not (root / "inbound" / "01J9Z3K6N2.json").exists()
    internal = make_item(confidentiality="internal")
    assert police.liandong_hand_off(internal, api) == str(root / "inbound" / "01J9Z3K6N2.json")
    assert police.liandong_hand_off(make_item(recipients=("ecology.sz",)), api) is None
    cleared = FakeAPI(tmp_path, {"folder": "case-system", "cleared_for": "confidential"})
    assert police.liandong_hand_off(make_item(), cleared) == str(
        root / "inbound" / "01J9Z3K6N2.json"
    )

    police.liandong_deliveries_confirmed(
        [DeliveryConfirmation("m1", "ecology.sz", NOW, "00" * 32, 1)], api
    )
    log = (root / "receipts" / "2025-03-01.jsonl").read_text(encoding="utf-8")
    assert json.loads(log)["message_id"] == "m1"


def test_plugin_folder_must_be_a_string(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[plugins.police\] folder"):
        police.liandong_node_started(FakeAPI(tmp_path, {"folder": 3}))


def test_an_unknown_clearance_stops_the_plugin_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cleared_for: 'secret' is not one of public, internal"):
        police.liandong_node_started(FakeAPI(tmp_path, {"cleared_for": "secret"}))


def test_attachment_names_never_collide(tmp_path: Path) -> None:
    import hashlib
    from datetime import UTC, datetime

    from node.plugin_api import AttachmentFile, InboundItem

    files = []
    for n, name in enumerate(["a-3.txt", "a.txt", "a.txt"]):
        source = tmp_path / f"src{n}"
        source.write_bytes(f"content {n}".encode())
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        files.append(AttachmentFile(name, digest, source.stat().st_size, "text/plain", source))
    item = InboundItem(
        message_id="01a2087f-397b-7d93-9e6b-dca9fcaac36a",
        family="clue",
        body_type="clue",
        sender="140400/ecology",
        recipients=("140400/procuratorate",),
        created_at=datetime.now(UTC),
        received_at=datetime.now(UTC),
        case_ref="",
        in_reply_to="",
        confidentiality="internal",
        body={"title": "x"},
        attachments=tuple(files),
        envelope_sha256="00" * 32,
    )
    folder = DropFolder(tmp_path / "local")
    written = json.loads(folder.write_inbound(item).read_text(encoding="utf-8"))
    paths = [Path(a["path"]) for a in written["attachments"]]
    assert len(set(paths)) == 3
    for entry, path in zip(written["attachments"], paths, strict=True):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]


CSV_HEADER = "family,to,case_ref,confidentiality,body.title,body.evidence[]\n"


def test_csv_rows_are_drafts_and_a_bad_row_blocks_nothing(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "local")
    drop(
        folder,
        "penalties.csv",
        "\ufeff"  # a byte-order mark, as spreadsheet programs write
        + CSV_HEADER
        + "clue,procuratorate.sz;police.sz,C-1,confidential,漳河排污,笔录;监测报告\n"
        + ",procuratorate.sz,C-2,internal,no family,\n"
        + "clue,procuratorate.sz,C-3,secret,bad marking,\n"
        + "clue,procuratorate.sz,C-4,internal,good too,\n",
    )
    drop(folder, "z-after.json", GOOD)
    submit = Submitter()
    csv_outcome, json_outcome = folder.collect_drafts(submit)
    first, last = submit.calls[0], submit.calls[1]
    assert first.recipients == ("procuratorate.sz", "police.sz")
    assert first.body == {"title": "漳河排污", "evidence": ["笔录", "监测报告"]}
    assert first.confidentiality == "confidential" and first.case_ref == "C-1"
    assert last.body == {"title": "good too"}
    # The file goes to failed/, naming each bad row and field; the good rows went.
    assert csv_outcome.path == folder.failed / "penalties.csv"
    error = (folder.failed / "penalties.csv.error.txt").read_text(encoding="utf-8")
    assert "row 3: field 'family'" in error and "row 4: field 'confidentiality'" in error
    sent = (folder.failed / "penalties.csv.message_id").read_text(encoding="utf-8")
    assert sent == "row 2: msg-1\nrow 5: msg-2\n"
    assert json_outcome.message_id == "msg-3"

    # Fixed and dropped again: the rows that went before get their first ids back.
    drop(
        folder,
        "penalties.csv",
        CSV_HEADER
        + "clue,procuratorate.sz;police.sz,C-1,confidential,漳河排污,笔录;监测报告\n"
        + "clue,procuratorate.sz,C-4,internal,good too,\n",
    )
    (again,) = folder.collect_drafts(submit)
    assert again.path == folder.processed / "penalties.csv"
    assert again.message_id == "msg-1,msg-2"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "no header row"),
        ("to,body.title\nx,y\n", "missing column(s) 'family'"),
        ("family,to,recipients\nclue,x,y\n", "unknown column(s) 'recipients'"),
        ("family,to,body.title\nclue,procuratorate.sz,a,extra\n", "row 2: has 3 columns"),
    ],
)
def test_a_malformed_csv_file_is_named(tmp_path: Path, content: str, problem: str) -> None:
    folder = DropFolder(tmp_path / "local")
    drop(folder, "bad.csv", content)
    (outcome,) = folder.collect_drafts(Submitter())
    assert outcome.path == folder.failed / "bad.csv"
    assert problem in (folder.failed / "bad.csv.error.txt").read_text(encoding="utf-8")


def case_change(sequence: int, marking: str = "internal") -> CaseChange:
    return CaseChange(
        sequence=sequence,
        case_id="01J9Z3K6N2",
        peer="140400/police",
        family="crime_transfer",
        role="opener",
        event="not_filed",
        from_state="received",
        to_state="not_filed",
        actor="140400/police",
        message_id=f"m{sequence}",
        reason="证据不足",
        at=datetime(2026, 11, 24, 23, 59, tzinfo=timezone(timedelta(hours=-1))),
        title="暗管排放",
        confidentiality=marking,  # type: ignore[arg-type]
    )


def test_case_changes_are_logged_once_and_without_content_above_clearance(
    tmp_path: Path,
) -> None:
    folder = DropFolder(tmp_path / "local")
    reported = tmp_path / "state" / "cases-reported"
    [path] = folder.append_case_changes(
        [case_change(1), case_change(2, "confidential")], "internal", reported
    )
    assert path.name == "2026-11-25.jsonl"  # the UTC day
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert (first["sequence"], first["title"], first["reason"]) == (1, "暗管排放", "证据不足")
    assert "withheld_fields" not in first
    assert (second["title"], second["reason"]) == ("", "")
    assert second["withheld_fields"] == ["reason", "title"]
    # The node offers a group again after a crash: what was written is not written twice.
    assert folder.append_case_changes([case_change(2), case_change(3)], "internal", reported)
    assert [json.loads(line)["sequence"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert folder.append_case_changes([case_change(3)], "internal", reported) == []
