"""The drop-folder adapter: an agency's local system exchanges JSON files with the node.

Layout under the folder ``root`` (plugin config key ``folder``, default ``local``, relative to
the node's data directory)::

    root/inbound/<message_id>.json           inbound messages, written by the node
    root/inbound/<message_id>/<file_name>    their attachments, written before the JSON
    root/drafts/*.json                       outbound drafts, dropped by the local system
    root/drafts/*.csv                        outbound drafts, one per row (drafts_from_csv)
    root/drafts/processing/                  drafts being submitted (the node's, do not touch)
    root/drafts/processed/<name>             submitted drafts, <name>.message_id beside each
    root/drafts/failed/<name>                refused drafts, <name>.error.txt beside each
    root/receipts/<YYYY-MM-DD>.jsonl         delivery confirmations, one JSON line each
    root/cases/<YYYY-MM-DD>.jsonl            case state changes, one JSON line each

Every file the node writes appears atomically (temp file named ``.*.tmp`` in the same folder,
fsync, rename), so the local system never reads half a file; receipts and case changes are
appended to logs instead, whole lines at a time; it must write its drafts the same
way, because files whose names start with ``.`` or end in ``.tmp`` are ignored. The formats are
documented in docs/plugins.md.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, cast

from node.plugin_api import (
    MARKINGS,
    CaseChange,
    Confidentiality,
    DeliveryConfirmation,
    Draft,
    DraftRejected,
    InboundItem,
    cleared,
    most_restricted,
)

__all__ = ["DraftError", "DraftOutcome", "DropFolder", "draft_from_json", "flat_draft"]

_DRAFT_KEYS = frozenset(
    [
        "family",
        "to",
        "body_type",
        "body",
        "case_ref",
        "in_reply_to",
        "confidentiality",
        "attachments",
        "field_markings",
    ]
)
_UNSAFE_CHARS = re.compile(r"[^\w.\-]")
_COPY_CHUNK = 1 << 20


DRAFT_BATCH = 64  # drafts per call of submit_many (a commit each)
SubmitMany = Callable[[Sequence[Draft]], Sequence[str | Exception]]
"""Submit drafts together: per draft, its message id, DraftRejected (the draft's fault) or
another exception (try again later); NodeAPI.submit_many."""


def _one_by_one(submit: Callable[[Draft], str], drafts: Sequence[Draft]) -> list[str | Exception]:
    results: list[str | Exception] = []
    for draft in drafts:
        try:
            results.append(submit(draft))
        except Exception as exc:
            results.append(exc)
    return results


class DraftError(ValueError):
    """A draft file cannot become a :class:`Draft`; the message names the field and problem."""


@dataclass(frozen=True)
class DraftOutcome:
    """What happened to one draft file during :meth:`DropFolder.collect_drafts`."""

    path: Path
    """Where the file is now: in ``processed/``, ``failed/``, or still in ``processing/`` when
    the node could not take it right now and it will be retried on the next poll."""
    message_id: str | None = None
    error: str | None = None


def _rfc3339(value: datetime) -> str:
    # A naive datetime from the node is UTC by convention; astimezone() would take it as
    # local time and shift it by eight hours on a server set to Asia/Shanghai.
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


# UTF-8 bytes of a name safe_file_name gives: with the "-N" a second file of the same name
# gets and the temporary name written beside it (".NAME.PID.N.tmp"), well within the 255
# bytes of a file name on common file systems. The protocol allows 200 (docs/protocol.md 5).
MAX_NAME_BYTES = 200


def safe_file_name(name: str, fallback: str = "file") -> str:
    """A name that stays inside its folder: no separators, no ``..``, no leading dot, at
    most MAX_NAME_BYTES bytes (cut in the stem, the extension kept).

    Inbound attachment names come from another agency; a name like ``../../etc/cron.d/x``
    must not write outside the message's folder, nor one too long fail every write.
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable())
    base = _UNSAFE_CHARS.sub("_", base).lstrip(".")
    if len(base.encode("utf-8")) > MAX_NAME_BYTES:
        stem, suffix = os.path.splitext(base)
        if len(suffix.encode("utf-8")) > 16:  # not an extension worth keeping
            stem, suffix = base, ""
        room = MAX_NAME_BYTES - len(suffix.encode("utf-8"))
        base = stem.encode("utf-8")[:room].decode("utf-8", "ignore") + suffix
    return base or fallback


def _slug(value: str, fallback: str) -> str:
    """``value`` as one file-name component, e.g. ``procuratorate/sz`` -> ``procuratorate_sz``."""
    return _UNSAFE_CHARS.sub("_", value).lstrip(".") or fallback


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):  # not supported on every platform/filesystem
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_TEMP_NUMBERS = itertools.count()


def _create_temp(target: Path) -> tuple[int, Path]:
    """A new, empty, private temp file beside `target` (its folder is made if missing).

    Named from the process id and a counter rather than by tempfile.mkstemp: the adapter
    writes one per inbound message, and mkstemp's random names cost more than the write.
    """
    while True:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{next(_TEMP_NUMBERS)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp
        except FileExistsError:  # left by an earlier process with the same pid
            continue
        except FileNotFoundError:
            target.parent.mkdir(parents=True, exist_ok=True)
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp


@contextlib.contextmanager
def _atomic_file(target: Path, *, sync_dir: bool = True) -> Iterator[Any]:
    """Yield a binary file object; on success it replaces ``target`` atomically.

    ``sync_dir=False`` leaves making the rename durable to the caller, which syncs the folder
    once for many files."""
    fd, tmp = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        _fsync_dir(target.parent)


def _write_atomic(target: Path, data: bytes, *, sync_dir: bool = True) -> None:
    # Rewriting identical content is skipped so a repeated hand-off does not touch the file
    # (local systems often watch modification times).
    with contextlib.suppress(OSError):
        if target.read_bytes() == data:
            return
    with _atomic_file(target, sync_dir=sync_dir) as fh:
        fh.write(data)


def _json_bytes(value: Mapping[str, Any]) -> bytes:
    return (json.dumps(value, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def _free_name(directory: Path, name: str, taken: set[str] | None = None) -> Path:
    """``directory/name``, or ``name`` with ``-1``, ``-2``... before the suffix if taken: by a
    file there, or by a name in ``taken`` (chosen for another file not moved yet), which
    gets the chosen name added."""
    taken = set() if taken is None else taken
    target = directory / name
    stem, suffix = os.path.splitext(name)
    n = 0
    while target.exists() or target.name in taken:
        n += 1
        target = directory / f"{stem}-{n}{suffix}"
    taken.add(target.name)
    return target


def _is_draft_name(name: str) -> bool:
    return name.endswith((".json", ".csv")) and not name.startswith(".")


def drafts_from_csv(text: str) -> Iterator[tuple[int, dict[str, Any] | DraftError]]:
    """(row number, draft fields as a JSON draft would have them, or why not) per data row.

    Columns: ``family``, ``to`` (agency ids separated by ``;``), ``body_type``, ``case_ref``,
    ``in_reply_to``, ``confidentiality``, ``attachments`` (``;``-separated),
    ``field_markings`` (``suspect=confidential;facts=confidential``), and one column per body
    field, ``body.<field>``; ``body.<field>[]`` holds a list, ``;``-separated.
    """
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    if not columns:
        yield 1, DraftError("the CSV file has no header row")
        return
    unknown = [c for c in columns if c not in _DRAFT_KEYS - {"body"} and not c.startswith("body.")]
    missing = [c for c in ("family", "to") if c not in columns]
    if unknown or missing:
        problem = []
        if missing:
            problem.append(f"missing column(s) {', '.join(map(repr, missing))}")
        if unknown:
            problem.append(f"unknown column(s) {', '.join(map(repr, unknown))}")
        yield 1, DraftError("header: " + "; ".join(problem))
        return
    for number, row in enumerate(reader, start=2):
        if None in row or any(value is None for value in row.values()):
            yield number, DraftError(f"has {len(columns)} columns in the header, not this many")
            continue
        yield number, flat_draft(row)


def flat_draft(row: Mapping[str, Any]) -> dict[str, Any]:
    """A draft as a JSON draft file would hold it, from flat fields: a CSV row or a SQL row.

    ``to`` and ``attachments`` hold ``;``-separated lists, ``field_markings``
    ``FIELD=MARKING`` pairs separated by ``;``, ``body.<field>`` one body field,
    ``body.<field>[]`` a ``;``-separated list; an empty or missing value leaves the field out.
    """
    draft: dict[str, Any] = {"body": {}}
    for column, raw in row.items():
        if raw is None:
            continue
        value = raw if isinstance(raw, str) else str(raw)
        if column.startswith("body."):
            name = column[len("body.") :]
            items = [v.strip() for v in value.split(";") if v.strip()]
            if name.endswith("[]"):
                if items:  # an empty cell leaves the field out, as for a string
                    draft["body"][name[:-2]] = items
            elif value != "":
                draft["body"][name] = value
        elif column in ("to", "attachments"):
            draft[column] = [v.strip() for v in value.split(";") if v.strip()]
        elif column == "field_markings":
            pairs = (v.partition("=") for v in value.split(";") if v.strip())
            # "suspect" without "=..." keeps an empty marking, which draft_from_json names.
            draft[column] = {name.strip(): marking.strip() for name, _, marking in pairs}
        elif value != "":
            draft[column] = value
    return draft


def _optional_str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise DraftError(f"field {key!r}: expected a string, got {type(value).__name__}")
    return value


def draft_from_json(data: object, *, base_dir: Path, root: Path, source: str) -> Draft:
    """Validate a parsed draft file and build the :class:`Draft`.

    :param base_dir: the folder the draft was dropped in; attachment paths are relative to it.
    :param root: attachments must resolve inside this folder, so a draft cannot make the node
        send an arbitrary file of the server.
    :raises DraftError: naming the field and the problem.
    """
    if not isinstance(data, dict):
        raise DraftError(f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _DRAFT_KEYS)
    if unknown:
        # Rejecting unknown keys catches typos such as "recipients" for "to" or "caseref",
        # which would otherwise send a message without the intended field.
        raise DraftError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(_DRAFT_KEYS))}"
        )
    family = data.get("family")
    if not isinstance(family, str) or not family:
        raise DraftError("field 'family': required, a non-empty string")
    to = data.get("to")
    if not isinstance(to, list) or not to:
        raise DraftError("field 'to': required, a non-empty list of agency ids")
    for i, recipient in enumerate(to):
        if not isinstance(recipient, str) or not recipient:
            raise DraftError(f"field 'to[{i}]': expected a non-empty agency id string")
    body = data.get("body")
    if not isinstance(body, dict):
        raise DraftError("field 'body': required, a JSON object")
    confidentiality = data.get("confidentiality", "internal")
    if confidentiality not in MARKINGS:
        raise DraftError(
            f"field 'confidentiality': {confidentiality!r} is not one of {', '.join(MARKINGS)}"
        )
    field_markings = data.get("field_markings", {})
    if not isinstance(field_markings, dict):
        raise DraftError(
            'field \'field_markings\': expected an object such as {"suspect": "confidential"}'
        )
    for name, marking in field_markings.items():
        if marking not in MARKINGS:
            raise DraftError(
                f"field 'field_markings': {name!r} is marked {marking!r}, not one of "
                f"{', '.join(MARKINGS)} (in CSV: FIELD=MARKING;FIELD=MARKING)"
            )
    raw_attachments = data.get("attachments", [])
    if not isinstance(raw_attachments, list):
        raise DraftError("field 'attachments': expected a list of relative paths")
    attachments: list[Path] = []
    resolved_root = root.resolve()
    for i, rel in enumerate(raw_attachments):
        field = f"attachments[{i}]"
        if not isinstance(rel, str) or not rel:
            raise DraftError(f"field {field!r}: expected a relative path string")
        if Path(rel).is_absolute():
            raise DraftError(f"field {field!r}: {rel!r} must be relative to the draft's folder")
        path = (base_dir / rel).resolve()
        if not path.is_relative_to(resolved_root):
            raise DraftError(f"field {field!r}: {rel!r} points outside the drop folder")
        if not path.is_file():
            raise DraftError(f"field {field!r}: file not found: {path}")
        attachments.append(path)
    return Draft(
        family=family,
        recipients=tuple(to),
        body=body,
        body_type=_optional_str(data, "body_type"),
        case_ref=_optional_str(data, "case_ref"),
        in_reply_to=_optional_str(data, "in_reply_to"),
        confidentiality=cast(Confidentiality, confidentiality),
        attachments=tuple(attachments),
        field_markings=field_markings,
        source=source,
    )


class DropFolder:
    """One drop folder; every method may be called again after a crash with the same result."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inbound = root / "inbound"
        self.drafts = root / "drafts"
        self.processing = self.drafts / "processing"
        self.processed = self.drafts / "processed"
        self.failed = self.drafts / "failed"
        self.receipts = root / "receipts"
        self.cases = root / "cases"

    def ensure_folders(self) -> None:
        for folder in (
            self.inbound,
            self.drafts,
            self.processing,
            self.processed,
            self.failed,
            self.receipts,
            self.cases,
        ):
            folder.mkdir(parents=True, exist_ok=True)

    # -- inbound -----------------------------------------------------------------------------

    def inbound_path(self, message_id: str) -> Path:
        return self.inbound / f"{_slug(message_id, 'message')}.json"

    def write_inbound(self, item: InboundItem, withheld_fields: Sequence[str] = ()) -> Path:
        """Write ``item`` (attachments first, then the JSON) and return the JSON's path.

        ``withheld_fields`` are body fields left out because they are marked above what the
        local system is cleared for; the JSON lists them, so the officer knows to ask.
        """
        target = self.inbound_path(item.message_id)
        attachment_dir = self.inbound / target.stem
        kept_markings = {
            name: marking
            for name, marking in item.field_markings.items()
            if name not in withheld_fields
        }
        attachments: list[dict[str, Any]] = []
        used: set[str] = set()
        for i, attachment in enumerate(item.attachments):
            name = safe_file_name(attachment.file_name, f"attachment-{i + 1}")
            stem, suffix = os.path.splitext(name)
            counter = i + 1
            while name in used:  # "a.txt" twice, or beside an "a-3.txt": never overwrite one
                name = f"{stem}-{counter}{suffix}"
                counter += 1
            used.add(name)
            attachment_dir.mkdir(parents=True, exist_ok=True)
            copy = attachment_dir / name
            self._copy_verified(attachment.path, copy, attachment.sha256, attachment.size)
            attachments.append(
                {
                    "file_name": attachment.file_name,
                    "sha256": attachment.sha256,
                    "size": attachment.size,
                    "media_type": attachment.media_type,
                    "path": str(copy.absolute()),
                }
            )
        document = {
            "message_id": item.message_id,
            "family": item.family,
            "body_type": item.body_type,
            "sender": item.sender,
            "recipients": list(item.recipients),
            "created_at": _rfc3339(item.created_at),
            "received_at": _rfc3339(item.received_at),
            "case_ref": item.case_ref,
            "in_reply_to": item.in_reply_to,
            "confidentiality": item.confidentiality,
            "field_markings": kept_markings,
            # The most restricted marking of what this file holds.
            "marking": most_restricted(item.confidentiality, *kept_markings.values()),
            "envelope_sha256": item.envelope_sha256,
            "body": {k: v for k, v in item.body.items() if k not in withheld_fields},
            "withheld_fields": list(withheld_fields),
            "attachments": attachments,
        }
        if item.version_of:
            document["version_of"] = item.version_of
        # The JSON goes last: once the local system sees it, every attachment is complete.
        _write_atomic(target, _json_bytes(document))
        return target

    @staticmethod
    def _copy_verified(source: Path, target: Path, sha256: str, size: int) -> None:
        if (
            target.is_file()
            and target.stat().st_size == size
            and _sha256_file(target) == sha256.lower()
        ):
            return
        with _atomic_file(target) as out, source.open("rb") as src:
            digest = hashlib.sha256()
            while chunk := src.read(_COPY_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            # Re-hashing while copying costs nothing extra and means the local system never
            # gets a file that differs from what the sender signed.
            if digest.hexdigest() != sha256.lower():
                raise ValueError(f"attachment {source} does not match its sha256 {sha256}")

    # -- drafts ------------------------------------------------------------------------------

    def collect_drafts(
        self, submit: Callable[[Draft], str], submit_many: SubmitMany | None = None
    ) -> list[DraftOutcome]:
        """Submit every waiting draft, in name order; return what happened to each.

        Drafts left in ``processing/`` by an earlier crash go first. A bad draft goes to
        ``failed/`` and never blocks the others. An unexpected exception from ``submit``
        (the node cannot take it now) leaves the draft in ``processing/`` for the next poll.
        With ``submit_many`` (``NodeAPI.submit_many``), drafts go to the node up to
        ``DRAFT_BATCH`` at a time: one commit for all of them instead of one each.
        """
        self.ensure_folders()
        many: SubmitMany = submit_many or partial(_one_by_one, submit)
        outcomes: list[DraftOutcome] = []
        batch: list[Path] = []
        for claimed in self._claim_drafts():
            if claimed.name.endswith(".csv"):
                outcomes += self._process_json(batch, many)  # name order is kept
                batch = []
                outcomes.append(self._process_csv(claimed, many))
                continue
            batch.append(claimed)
            if len(batch) == DRAFT_BATCH:
                outcomes += self._process_json(batch, many)
                batch = []
        outcomes += self._process_json(batch, many)
        return outcomes

    def _claim_drafts(self) -> Iterator[Path]:
        """Each draft to process, claimed (in ``processing/``), as it is needed."""
        yield from sorted(p for p in self.processing.iterdir() if _is_draft_name(p.name))
        for dropped in sorted(p for p in self.drafts.iterdir() if _is_draft_name(p.name)):
            if not dropped.is_file():
                continue
            claimed = self.processing / dropped.name
            if claimed.exists():
                # A draft of the same name is still waiting to be retried; take this one on a
                # later poll rather than overwrite it.
                continue
            # Claim the file before submitting: if the node crashes after submit returns, the
            # draft is found in processing/ on restart instead of being submitted as new.
            os.replace(dropped, claimed)
            yield claimed

    def _source(self, path: Path, raw: bytes) -> str:
        # The node maps a non-empty `source` to an idempotency key and returns the same
        # message id when it sees the key again; a draft resubmitted after a crash therefore
        # is not sent twice. The content digest is part of the key so that a *different*
        # draft later dropped under a reused file name is a new message, not a duplicate.
        return f"{self.drafts / path.name}#sha256={hashlib.sha256(raw).hexdigest()}"

    def _read_json_draft(self, path: Path) -> Draft:
        raw = path.read_bytes()
        try:
            # utf-8-sig: Windows tools on agency desktops often write a byte-order mark.
            data = json.loads(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DraftError(f"not valid UTF-8 JSON: {exc}") from exc
        return draft_from_json(
            data, base_dir=self.drafts, root=self.root, source=self._source(path, raw)
        )

    def _process_json(self, paths: Sequence[Path], submit_many: SubmitMany) -> list[DraftOutcome]:
        """Submit the JSON drafts in ``paths`` together and file each where it belongs."""
        outcomes: dict[Path, DraftOutcome] = {}
        readable: list[tuple[Path, Draft]] = []
        for path in paths:
            try:
                readable.append((path, self._read_json_draft(path)))
            except (DraftError, OSError) as exc:
                outcomes[path] = self._fail(path, str(exc))
        results = submit_many([draft for _, draft in readable]) if readable else []
        went: list[tuple[Path, Path, str]] = []
        chosen: set[str] = set()  # names in processed/ given to drafts of this batch
        for (path, _), result in zip(readable, results, strict=True):
            if isinstance(result, DraftRejected):
                outcomes[path] = self._fail(path, f"rejected by the node: {result}")
            elif isinstance(result, Exception):
                # Not the draft's fault (database down, node shutting down): keep it claimed
                # and retry on the next poll with the same source.
                error = f"will retry: {type(result).__name__}: {result}"
                outcomes[path] = DraftOutcome(path=path, error=error)
            else:
                target = _free_name(self.processed, path.name, chosen)
                sidecar = target.with_name(target.name + ".message_id")
                _write_atomic(sidecar, f"{result}\n".encode(), sync_dir=False)
                went.append((path, target, result))
        if went:
            # Sidecars durable before any draft moves: a crash in between leaves drafts in
            # processing/, and their retry rewrites the same sidecars with the same ids.
            _fsync_dir(self.processed)
            for path, target, message_id in went:
                os.replace(path, target)
                outcomes[path] = DraftOutcome(path=target, message_id=message_id)
            _fsync_dir(self.processed)
        return [outcomes[path] for path in paths]

    def _process_csv(self, path: Path, submit_many: SubmitMany) -> DraftOutcome:
        """Each row is a draft: the good rows are submitted whatever the bad ones hold. The
        file goes to processed/ when every row went, else to failed/ with an error file
        naming each bad row and field; dropped again once fixed, the rows that went before
        get their first message ids back (each row's source is its own content)."""
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            return self._fail(path, f"not a readable UTF-8 CSV file: {exc}")
        sent: list[str] = []
        problems: list[str] = []
        rows: list[tuple[str, Draft]] = []
        for number, fields in drafts_from_csv(text):
            where = f"row {number}"
            try:
                if isinstance(fields, DraftError):
                    raise fields
                row_bytes = json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()
                draft = draft_from_json(
                    fields,
                    base_dir=self.drafts,
                    root=self.root,
                    source=self._source(path, row_bytes),
                )
                rows.append((where, draft))
            except DraftError as exc:
                problems.append(f"{where}: {exc}")
        for start in range(0, len(rows), DRAFT_BATCH):
            chunk = rows[start : start + DRAFT_BATCH]
            for (where, _), result in zip(
                chunk, submit_many([draft for _, draft in chunk]), strict=True
            ):
                if isinstance(result, DraftRejected):
                    problems.append(f"{where}: rejected by the node: {result}")
                elif isinstance(result, Exception):
                    # The node cannot take it now: keep the whole file claimed for the next
                    # poll (rows already sent come back with the same ids).
                    error = f"will retry: {type(result).__name__}: {result}"
                    return DraftOutcome(path=path, error=error)
                else:
                    sent.append(f"{where}: {result}")
        # Bad rows are reported in row order, whichever step found them.
        problems.sort(key=lambda problem: int(problem.split(":")[0].split()[1]))
        folder = self.failed if problems else self.processed
        target = _free_name(folder, path.name)
        if sent:
            _write_atomic(
                target.with_name(target.name + ".message_id"), ("\n".join(sent) + "\n").encode()
            )
        if problems:
            return self._fail(path, "; ".join(problems), target)
        os.replace(path, target)
        _fsync_dir(self.processed)
        return DraftOutcome(path=target, message_id=",".join(s.split(": ")[1] for s in sent))

    def _fail(self, path: Path, problem: str, target: Path | None = None) -> DraftOutcome:
        target = target or _free_name(self.failed, path.name)
        error = f"{self.drafts / path.name}: {problem}"
        _write_atomic(target.with_name(target.name + ".error.txt"), f"{error}\n".encode())
        os.replace(path, target)
        _fsync_dir(self.failed)
        return DraftOutcome(path=target, error=error)

    # -- receipts ----------------------------------------------------------------------------

    def receipts_log(self, moment: datetime) -> Path:
        """The day's receipts log (UTC date of delivery)."""
        day = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
        return self.receipts / f"{day:%Y-%m-%d}.jsonl"

    def append_confirmations(self, confirmations: Sequence[DeliveryConfirmation]) -> list[Path]:
        """Append one JSON line per confirmation to the day's log, durably; return the logs.

        One write and one fsync per log for the whole group: a file per receipt would cost a
        file creation each, the dearest thing this adapter does.
        """
        self.receipts.mkdir(parents=True, exist_ok=True)
        lines: dict[Path, list[bytes]] = {}
        for c in confirmations:
            document = {
                "message_id": c.message_id,
                "recipient": c.recipient,
                "delivered_at": _rfc3339(c.delivered_at),
                "receipt_sha256": c.receipt_sha256,
                "receiver_log_index": c.receiver_log_index,
            }
            line = json.dumps(document, ensure_ascii=False).encode("utf-8") + b"\n"
            lines.setdefault(self.receipts_log(c.delivered_at), []).append(line)
        for log_path, group in lines.items():
            _append_lines(log_path, group)
        return list(lines)

    # -- case changes ------------------------------------------------------------------------

    def append_case_changes(
        self, changes: Sequence[CaseChange], clearance: str, reported: Path
    ) -> list[Path]:
        """Append one JSON line per case change to the log of the day it happened (UTC).

        ``reported`` holds the highest sequence already written, so a group the node offers
        again after a crash is not written twice. A case marked above ``clearance`` is
        written without its title and the reason (they may quote confidential content).
        """
        done = _read_int(reported)
        lines: dict[Path, list[bytes]] = {}
        for change in changes:
            if change.sequence <= done:
                continue
            within = cleared(change.confidentiality, clearance)
            document = {
                "sequence": change.sequence,
                "case_id": change.case_id,
                "peer": change.peer,
                "family": change.family,
                "role": change.role,
                "event": change.event,
                "from_state": change.from_state,
                "to_state": change.to_state,
                "actor": change.actor,
                "message_id": change.message_id,
                "at": _rfc3339(change.at),
                "marking": change.confidentiality,
                "title": change.title if within else "",
                "reason": change.reason if within else "",
            }
            if not within:
                document["withheld_fields"] = ["reason", "title"]
            line = json.dumps(document, ensure_ascii=False).encode("utf-8") + b"\n"
            day = change.at.astimezone(UTC)
            lines.setdefault(self.cases / f"{day:%Y-%m-%d}.jsonl", []).append(line)
        if not lines:
            return []
        self.cases.mkdir(parents=True, exist_ok=True)
        for log_path, group in lines.items():
            _append_lines(log_path, group)
        reported.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(reported, str(changes[-1].sequence).encode())
        return list(lines)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return 0


def _append_lines(path: Path, lines: list[bytes]) -> None:
    created = not path.exists()
    with path.open("ab") as fh:
        if not created and fh.tell() > 0:
            with path.open("rb") as check:
                check.seek(-1, os.SEEK_END)
                if check.read(1) != b"\n":
                    # A crash cut the last write short: end that line so ours stay whole.
                    lines = [b"\n", *lines]
        fh.write(b"".join(lines))
        fh.flush()
        os.fsync(fh.fileno())
    if created:
        _fsync_dir(path.parent)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
