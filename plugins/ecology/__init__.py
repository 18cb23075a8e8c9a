"""Ecology bureau (生态环境局) plugin.

The bureau's case system is reached through the shared adapters (:mod:`plugins.adapters`): a
drop folder for drafts and inbound messages — evidence requests and recommendations arrive in
``inbound/`` as tasks, the results go back as reply drafts — and SQL sources. On top of them,
this plugin reads the bureau's **enforcement and penalty records** and acts on each:

* it classifies the record against the crime thresholds (:mod:`node.exchange.thresholds`):
  one that meets a crime threshold becomes a crime transfer (涉嫌犯罪案件移送) to the police,
  copied to the procuratorate; one that damages the public interest becomes a litigation clue
  (公益诉讼线索) to the procuratorate; the evidence files the record names go as attachments;
  a record whose ``transfer_decision`` is ``no`` (the bureau's leader decided against it) is
  not transferred — and the procuratorate's 应移未移 check will see it in the shared data;
* it keeps the record for the quarterly data sharing (001 §七): once a quarter is over, the
  quarter's records go to the procuratorate as a data-sharing notice with a JSON file
  (``liandong.penalty-records/1``), and again as an addendum if late records arrive.

Config::

    [plugins.ecology]
    police = "140400/police"                 # default: this region's police
    procuratorate = "140400/procuratorate"   # default: this region's procuratorate
    share_with = ["140400/procuratorate"]    # default: [procuratorate]
    evidence_dir = "evidence"                # record evidence paths resolve inside it

    [plugins.ecology.records.penalties]      # a SQL source (plugins.sqlsource)
    url = "postgresql+psycopg://reader@db.hb.local/enforcement"
    query = "SELECT * FROM penalty_records WHERE id > :after ORDER BY id LIMIT 1000"
    key = "id"
    [plugins.ecology.records.penalties.columns]   # record field = column
    record_id = "decision_no"
    decided_on = "decided_on"
    party = "party_name"
    hazardous_waste_tonnes = "hw_tonnes"

    [plugins.ecology.thresholds.hazardous_waste]  # change or switch off a threshold
    at_least = 1

A record's fields: ``record_id``, ``decided_on`` (YYYY-MM-DD) and ``party`` are required;
``facts``, ``location``, ``penalty``, ``evidence`` (``;``-separated paths),
``confidentiality``, ``approved_by``, ``approved_at``, ``transfer_letter_no``,
``transfer_decision`` and the fields the thresholds read are optional; others are shared as
they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

from node.exchange.sharing import (
    penalty_document,
    quarter_end,
    quarter_of,
)
from node.exchange.thresholds import (
    Met,
    Threshold,
    ThresholdError,
    actions_of,
    classify,
    thresholds_from_config,
)
from node.hookspecs import hookimpl
from node.identity import agency_region
from node.plugin_api import (
    MARKINGS,
    Draft,
    DraftRejected,
    NodeAPI,
)
from plugins.adapters import AgencyAdapters
from plugins.sqlsource import RowError, SqlSource

_NO = frozenset({"no", "n", "false", "0", "否", "不移送"})
_YES = frozenset({"", "yes", "y", "true", "1", "是", "移送"})
QUARTER = re.compile(r"[0-9]{4}-Q[1-4]")
FIRST_YEAR, LAST_YEAR = 1949, 2199  # outside: a typo, not a penalty decision
BEIJING = timezone(timedelta(hours=8))

_adapters = AgencyAdapters("ecology")


@dataclass(frozen=True)
class EcologySettings:
    police: str
    procuratorate: str
    share_with: tuple[str, ...]
    evidence_dir: Path
    thresholds: tuple[Threshold, ...]


_settings: dict[Path, EcologySettings] = {}


def settings_of(api: NodeAPI) -> EcologySettings:
    """The plugin's settings, read once per node (config does not change while it runs)."""
    settings = _settings.get(api.data_dir)
    if settings is None:
        settings = _settings.setdefault(api.data_dir, read_settings(api))
    return settings


def read_settings(api: NodeAPI) -> EcologySettings:
    """The plugin's settings, with the defaults filled in; errors name the key."""
    table = api.plugin_config("ecology")
    region = agency_region(api.agency)
    police = table.get("police", f"{region}/police")
    procuratorate = table.get("procuratorate", f"{region}/procuratorate")
    for key, value in (("police", police), ("procuratorate", procuratorate)):
        if not isinstance(value, str) or "/" not in value:
            raise ValueError(f"[plugins.ecology] {key}: expected an agency id, got {value!r}")
    share_with = table.get("share_with", [procuratorate])
    if not isinstance(share_with, list) or not all(isinstance(a, str) for a in share_with):
        raise ValueError("[plugins.ecology] share_with: expected a list of agency ids")
    evidence = table.get("evidence_dir", "evidence")
    if not isinstance(evidence, str) or not evidence:
        raise ValueError("[plugins.ecology] evidence_dir: expected a path")
    try:
        thresholds = thresholds_from_config(
            table.get("thresholds"), where="[plugins.ecology.thresholds]"
        )
    except ThresholdError as error:
        raise ValueError(str(error)) from None
    return EcologySettings(
        police=police,
        procuratorate=procuratorate,
        share_with=tuple(share_with),
        evidence_dir=api.data_dir / evidence,
        thresholds=thresholds,
    )


def decided_on(record: Mapping[str, Any]) -> date:
    """The record's decision date; a record without a usable one raises RowError."""
    for key in ("record_id", "decided_on"):
        if str(record.get(key) or "").strip() == "":
            raise RowError(f"field {key!r}: required")
    try:
        day = date.fromisoformat(str(record["decided_on"])[:10])
    except ValueError:
        raise RowError(f"field 'decided_on': {record['decided_on']!r} is not a date") from None
    if not FIRST_YEAR <= day.year <= LAST_YEAR:
        raise RowError(f"field 'decided_on': {day} is outside {FIRST_YEAR}..{LAST_YEAR}")
    return day


def transfer_allowed(record: Mapping[str, Any]) -> bool:
    """The leader's decision on a crime transfer: empty means "as the thresholds say"."""
    raw = record.get("transfer_decision")
    value = "" if raw is None else str(raw).strip().lower()
    if value in _NO:
        return False
    if value in _YES:
        return True
    raise RowError(
        f"field 'transfer_decision': {record.get('transfer_decision')!r} is neither yes "
        "(是, 1) nor no (否, 0); the record is not transferred until it is one of them"
    )


def evidence_files(record: Mapping[str, Any], folder: Path) -> tuple[Path, ...]:
    raw = record.get("evidence") or ""
    names = raw if isinstance(raw, list) else [p.strip() for p in str(raw).split(";")]
    root = folder.resolve()
    files: list[Path] = []
    for name in filter(None, names):
        try:
            path = (folder / str(name)).resolve()
            found = path.is_file()
        except (OSError, ValueError) as error:  # a NUL byte, a name too long
            raise RowError(f"field 'evidence': {str(name)[:80]!r}: {error}") from None
        if not path.is_relative_to(root):
            raise RowError(f"field 'evidence': {name!r} points outside the evidence folder")
        if not found:
            raise RowError(f"field 'evidence': file not found: {path}")
        files.append(path)
    return tuple(files)


def _timestamp(value: Any, field: str) -> str | None:
    """A date or time from the bureau's system as RFC 3339 (a bare date: 00:00 Beijing time)."""
    if value in (None, ""):
        return None
    text = str(value).strip()
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RowError(f"field {field!r}: {text!r} is not a date or time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=BEIJING)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def drafts_for(record: Mapping[str, Any], settings: EcologySettings) -> list[Draft]:
    """The transfers a record calls for: a crime transfer, a clue, both or none."""
    for key in ("party",):
        if str(record.get(key) or "").strip() == "":
            raise RowError(f"field {key!r}: required")
    try:
        met = classify(record, settings.thresholds)
    except ThresholdError as error:
        raise RowError(str(error)) from None
    grouped = actions_of(met)
    if grouped.get("crime_transfer") and not transfer_allowed(record):
        del grouped["crime_transfer"]  # the leader decided against it; a clue still goes
    if not grouped:
        return []
    record_id = str(record["record_id"])
    party = str(record["party"])
    marking = str(record.get("confidentiality") or "internal")
    if marking not in MARKINGS:
        raise RowError(f"field 'confidentiality': {marking!r} is not one of {', '.join(MARKINGS)}")
    attachments = evidence_files(record, settings.evidence_dir)
    evidence = [m.describe() for m in met] + [f"证据材料：{p.name}" for p in attachments]

    def draft(family: str, to: tuple[str, ...], body: dict[str, Any]) -> Draft:
        return Draft(
            family=family,
            recipients=to,
            body={k: v for k, v in body.items() if v not in ("", None, [])},
            case_ref=record_id,
            confidentiality=marking,
            attachments=attachments,
            source=f"ecology:record:{record_id}:{family}",
        )

    drafts: list[Draft] = []
    crimes: list[Met] = grouped.get("crime_transfer", [])
    if crimes:
        drafts.append(
            draft(
                "crime_transfer",
                (settings.police, settings.procuratorate),
                {
                    "title": f"涉嫌污染环境罪案件移送：{party}",
                    "facts": str(record.get("facts") or ""),
                    "suspect": party,
                    "location": str(record.get("location") or ""),
                    "suspected_offence": "污染环境罪",
                    "transfer_letter_no": str(record.get("transfer_letter_no") or ""),
                    "approved_by": str(record.get("approved_by") or ""),
                    "approved_at": _timestamp(record.get("approved_at"), "approved_at"),
                    "evidence": evidence,
                },
            )
        )
    clues: list[Met] = grouped.get("clue", [])
    if clues:
        drafts.append(
            draft(
                "clue",
                (settings.procuratorate,),
                {
                    "title": f"公益诉讼线索：{party}",
                    "facts": str(record.get("facts") or ""),
                    "subject": party,
                    "location": str(record.get("location") or ""),
                    "legal_basis": "；".join(m.threshold.basis for m in clues),
                    "evidence": evidence,
                },
            )
        )
    return drafts


class Ledger:
    """The records picked up, one JSON-lines file per quarter, for the quarterly sharing."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def add(self, quarter: str, record: Mapping[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps(
            {k: v for k, v in record.items() if not k.startswith("_")},
            ensure_ascii=False,
            sort_keys=True,
            default=str,
        )
        path = self.folder / f"{quarter}.jsonl"
        with path.open("a+b") as fh:
            # A line a crash cut short is ended first, so this one stays whole.
            torn = fh.tell() > 0 and (fh.seek(-1, os.SEEK_END) or fh.read(1) != b"\n")
            fh.write((b"\n" if torn else b"") + line.encode("utf-8") + b"\n")
            fh.flush()
            os.fsync(fh.fileno())

    def quarters(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.jsonl") if QUARTER.fullmatch(p.stem))

    def records(self, quarter: str) -> list[dict[str, Any]]:
        """The quarter's records, one per record id (a record picked up again after a crash,
        or corrected in the bureau's system and read again, counts once, as last read).
        A line a crash cut short is skipped."""
        by_id: dict[str, dict[str, Any]] = {}
        path = self.folder / f"{quarter}.jsonl"
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                by_id[str(record["record_id"])] = record
            except (ValueError, KeyError, TypeError):
                continue
        return list(by_id.values())

    def size(self, quarter: str) -> int:
        return (self.folder / f"{quarter}.jsonl").stat().st_size

    def shared(self, quarter: str) -> tuple[str, str, int]:
        """What the last sharing of ``quarter`` carried: its digest ("": never shared), its
        message id, and the ledger's size when it was read (-1: not recorded)."""
        try:
            fields = (self.folder / f"{quarter}.shared").read_text().split()
        except FileNotFoundError:
            fields = []
        fields += ["", "", "-1"][len(fields) :]
        return fields[0], fields[1], int(fields[2]) if fields[2].lstrip("-").isdigit() else -1

    def mark_shared(self, quarter: str, digest: str, message_id: str, size: int) -> None:
        (self.folder / f"{quarter}.shared").write_text(f"{digest} {message_id} {size}\n")


def ledger_of(api: NodeAPI) -> Ledger:
    return Ledger(_adapters.state_dir(api) / "ledger")


def take_record(api: NodeAPI, settings: EcologySettings, record: Mapping[str, Any]) -> None:
    """Keep, classify and transfer one penalty record (idempotent: drafts carry a source).

    The record is kept for the quarterly sharing before anything else: one that cannot be
    transferred (no party, a missing evidence file) still reaches the procuratorate's
    应移未移 check, which is there for exactly such records.
    """
    ledger_of(api).add(quarter_of(decided_on(record)), record)
    for draft in drafts_for(record, settings):
        try:
            message_id = api.submit(draft)
        except DraftRejected as error:
            raise RowError(f"{draft.family} rejected by the node: {error}") from None
        api.log.info(
            "penalty record transferred",
            record=str(record["record_id"]),
            family=draft.family,
            message_id=message_id,
        )


def share_quarters(api: NodeAPI, settings: EcologySettings, now: datetime) -> list[str]:
    """Share every finished quarter not yet shared, or changed since (late or corrected
    records: an addendum with the whole quarter); return the message ids."""
    ledger = ledger_of(api)
    sent: list[str] = []
    for quarter in ledger.quarters():
        if quarter_end(quarter) > now:
            continue
        try:
            sent.extend(_share(api, settings, ledger, quarter))
        except Exception:  # one quarter must not hold up the others; retried next poll
            api.log.exception("quarter not shared; will retry", quarter=quarter)
    return sent


def _share(api: NodeAPI, settings: EcologySettings, ledger: Ledger, quarter: str) -> list[str]:
    before, shared_id, shared_size = ledger.shared(quarter)
    # The ledger only grows: at the size it was shared at, nothing was added since. Read
    # before the records, so a record added meanwhile is read at the next poll.
    size = ledger.size(quarter)
    if size == shared_size:
        return []
    records = ledger.records(quarter)
    document = penalty_document(api.agency, quarter, records)
    data = (json.dumps(document, ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()[:16]
    if digest == before:  # records read again, unchanged: not shared again, not read again
        ledger.mark_shared(quarter, digest, shared_id, size)
        return []
    if not records:
        return []
    folder = _adapters.state_dir(api) / "shared"
    folder.mkdir(parents=True, exist_ok=True)
    attachment = folder / f"penalty-records-{quarter}-{digest}.json"
    attachment.write_bytes(data)
    # The notice is marked as its most restricted record: a confidential record must not
    # travel in a notice the receiving adapters take as internal.
    marking = max(
        (str(r.get("confidentiality") or "internal") for r in records),
        key=lambda m: MARKINGS.index(m) if m in MARKINGS else len(MARKINGS) - 1,
    )
    addendum = "（补充）" if before else ""
    message_id = api.submit(
        Draft(
            family="notice",
            recipients=settings.share_with,
            body={
                "kind": "KIND_DATA_SHARING",
                "title": f"{quarter} 行政处罚信息和监测数据{addendum}",
                "text": f"{quarter}：行政处罚记录 {len(records)} 条，见附件。",
            },
            confidentiality=marking if marking in MARKINGS else "confidential",
            attachments=(attachment,),
            # The quarter, so the receiving node closes its clock for that quarter.
            case_ref=quarter,
            source=f"ecology:share:{quarter}:{digest}",
        )
    )
    ledger.mark_shared(quarter, digest, message_id, size)
    api.log.info("quarter shared", quarter=quarter, records=len(records), message_id=message_id)
    return [message_id]


def record_sources(api: NodeAPI) -> list[SqlSource]:
    return _adapters.sql_sources(api, "records")


@hookimpl
def liandong_node_started(api: NodeAPI) -> None:
    _adapters.liandong_node_started(api)
    settings = settings_of(api)
    api.log.info(
        "ecology ready",
        records=[s.query.name for s in record_sources(api)],
        police=settings.police,
        procuratorate=settings.procuratorate,
        thresholds=[t.name for t in settings.thresholds if t.enabled],
    )


@hookimpl
def liandong_poll_local_system(api: NodeAPI) -> None:
    _adapters.liandong_poll_local_system(api)
    settings = settings_of(api)
    caught_up = True
    for source in record_sources(api):
        picked = source.pick_up(partial(take_record, api, settings))
        _adapters.report(api, source, picked)
        caught_up &= picked.error is None and picked.read < source.batch
    if caught_up:  # a backlog is read whole before a quarter goes out, not in pieces
        share_quarters(api, settings, datetime.now(UTC))


# What the drop folder does for every agency, as police and procuratorate take it.
liandong_review_inbound = _adapters.liandong_review_inbound
liandong_hand_off = _adapters.liandong_hand_off
liandong_redact = _adapters.liandong_redact
liandong_deliveries_confirmed = _adapters.liandong_deliveries_confirmed
liandong_cases_changed = _adapters.liandong_cases_changed
