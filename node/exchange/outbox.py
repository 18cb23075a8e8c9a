"""Sending: the transactional outbox.

``submit`` composes, signs, stores and audits a message in one transaction and
only then returns its id; delivery happens afterwards (node.exchange.delivery),
so a node killed at any instant either has the message, signed and queued, or
never acknowledged it.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message as ProtoMessage
from sqlalchemy import select

from node._pb.liandong.v1 import envelope_pb2
from node.audit import log as audit
from node.audit.log import AuditEvent
from node.envelope import MESSAGE_PAYLOAD_TYPE, serialize_envelope, sign_envelope
from node.exchange.attachments import BlobStore
from node.exchange.context import NodeContext
from node.exchange.delivery import Due
from node.exchange.errors import ExchangeError, Reason
from node.exchange.messages import (
    AttachmentInput,
    compose_message,
    effective_marking,
    file_name_problem,
)
from node.federation import Registry
from node.store.models import ATTACHMENTS, DELIVERIES, MESSAGES, message_row
from node.store.writer import Batch, BatchWriter


@dataclass(frozen=True)
class Submission:
    family: str
    recipients: Sequence[str]
    body: Mapping[str, Any] | ProtoMessage
    body_type: str = ""
    case_ref: str = ""
    in_reply_to: str = ""
    confidentiality: str = "internal"
    attachment_paths: Sequence[Path] = field(default_factory=tuple)
    client_key: str = ""
    deadline: datetime | None = None
    field_markings: Mapping[str, str] = field(default_factory=dict)


RedactFor = Callable[[Submission, str], "Submission | None"]
"""The version of a submission one recipient may get (``None``: the submission as it is);
raises ExchangeError to refuse the whole submission. The runtime asks the plugins
(``liandong_redact``)."""

# What a redacted version may differ in; the rest is the message's identity and thread.
REDACTABLE = ("body", "confidentiality", "field_markings", "attachment_paths")


@dataclass(frozen=True)
class _Prepared:
    row: dict[str, Any]
    recipients: list[str]
    attachments: list[AttachmentInput]
    message: envelope_pb2.Message


class Outbox:
    def __init__(
        self,
        context: NodeContext,
        writer: BatchWriter,
        blobs: BlobStore,
        on_queued: Callable[[list[Due]], None] = lambda _items: None,
        redact_for: RedactFor | None = None,
    ) -> None:
        self.context = context
        self.writer = writer
        self.blobs = blobs
        self.on_queued = on_queued
        self.redact_for = redact_for

    async def submit(self, submission: Submission) -> str:
        """Store, sign and audit a new outbound message; return its id."""
        [outcome] = await self.submit_many([submission])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def submit_many(self, submissions: Sequence[Submission]) -> list[str | Exception]:
        """submit() for each, sharing one commit: the message id or the refusal, in order.

        A submission redacted differently for some recipients becomes one message per version
        (each stored, signed and audited like any other); its outcome is the first version's
        id, which the later versions name in ``version_of``.
        """
        files: list[list[AttachmentInput] | ExchangeError] = []
        for submission in submissions:
            try:
                if submission.attachment_paths:  # no copying for a message that is refused
                    self._check_recipients(submission, datetime.now(UTC))
                # Copying and hashing a file may take seconds: not on the event loop.
                files.append(
                    [
                        await asyncio.to_thread(self._ingest, Path(path))
                        for path in submission.attachment_paths
                    ]
                )
            except ExchangeError as error:
                files.append(error)
        # Redacting (plugin code), composing and signing off the loop too: Ed25519 releases
        # the GIL.
        composed = await asyncio.to_thread(self._prepare_all, submissions, files)
        outcomes: list[str | Exception] = []
        prepared: list[tuple[int, list[_Prepared]]] = []
        for position, ready in enumerate(composed):
            if isinstance(ready, ExchangeError):
                outcomes.append(ready)
            else:
                prepared.append((position, ready))
                outcomes.append("")
        # One unit per submission: its versions are stored together or not at all.
        stored = await self.writer.run_many(
            [partial(self._store_versions, versions) for _, versions in prepared]
        )
        queued: list[Due] = []
        for (position, versions), result in zip(prepared, stored, strict=True):
            if isinstance(result, Exception):
                outcomes[position] = result
                continue
            first_id, new = result
            outcomes[position] = first_id
            if not new:  # a repeat of an earlier submission, whose versions are all stored
                continue
            queued.extend(
                Due(
                    recipient,
                    p.row["message_id"],
                    p.row["family"],
                    p.row["envelope"],
                    p.row["envelope_sha256"],
                    0,
                )
                for p in versions
                for recipient in p.recipients
            )
        if queued:
            self.on_queued(queued)
        return outcomes

    def _prepare_all(
        self,
        submissions: Sequence[Submission],
        files: Sequence[list[AttachmentInput] | ExchangeError],
    ) -> list[list[_Prepared] | ExchangeError]:
        results: list[list[_Prepared] | ExchangeError] = []
        for submission, attachments in zip(submissions, files, strict=True):
            if isinstance(attachments, ExchangeError):
                results.append(attachments)
                continue
            try:
                self._check_distinct(submission)  # before the plugins see it
                versions: list[_Prepared] = []
                for version in self._versions(submission):
                    held = dict(zip(submission.attachment_paths, attachments, strict=True))
                    version_files = [held[path] for path in version.attachment_paths]
                    first = versions[0].message.message_id if versions else ""
                    # A later version names the first, and every recipient of every version,
                    # so that its recipients follow replies to the first from those (and
                    # only those) who got one (docs/protocol.md 5.3).
                    everyone = tuple(submission.recipients) if first else ()
                    versions.append(
                        self._prepare(version, version_files, version_of=first, everyone=everyone)
                    )
                results.append(versions)
            except ExchangeError as error:
                results.append(error)
        return results

    def _versions(self, submission: Submission) -> list[Submission]:
        """The submission as each recipient may get it, one per distinct version, in the
        order of their first recipients."""
        if self.redact_for is None:
            return [submission]
        asked = [(r, self.redact_for(submission, r)) for r in submission.recipients]
        if all(version is None for _, version in asked):
            return [submission]  # the common case: nothing to compare
        groups: dict[str, tuple[Submission, list[str]]] = {}
        for recipient, redacted in asked:
            version = redacted or submission
            for name in Submission.__dataclass_fields__:
                if name not in REDACTABLE and _comparable(getattr(version, name)) != _comparable(
                    getattr(submission, name)
                ):
                    raise ExchangeError(
                        Reason.INVALID,
                        f"liandong_redact changed '{name}' for recipient '{recipient}'; a "
                        f"redaction may change only {', '.join(REDACTABLE)}",
                    )
            extra = set(version.attachment_paths) - set(submission.attachment_paths)
            if extra:
                raise ExchangeError(
                    Reason.INVALID,
                    f"liandong_redact added attachment {sorted(map(str, extra))[0]} for "
                    f"recipient '{recipient}'; a redaction may only leave attachments out",
                )
            groups.setdefault(_version_key(version), (version, []))[1].append(recipient)
        versions: list[Submission] = []
        for version, recipients in groups.values():
            key = submission.client_key
            if key and versions:  # the first version keeps the submitter's idempotency key
                key = f"{key}#{','.join(recipients)}"
            versions.append(replace(version, recipients=tuple(recipients), client_key=key))
        return versions

    def _prepare(
        self,
        submission: Submission,
        attachments: list[AttachmentInput],
        version_of: str = "",
        everyone: Sequence[str] = (),
    ) -> _Prepared:
        """Check, compose and sign one submission: the row to store (nothing stored yet)."""
        now = datetime.now(UTC)
        registry = self._check_recipients(submission, now)
        message = compose_message(
            sender=self.context.agency,
            family=submission.family,
            recipients=submission.recipients,
            body=submission.body,
            body_type=submission.body_type,
            created_at=now,
            case_ref=submission.case_ref,
            in_reply_to=submission.in_reply_to,
            confidentiality=submission.confidentiality,
            attachments=attachments,
            deadline=submission.deadline,
            field_markings=submission.field_markings,
            version_of=version_of,
            all_recipients=everyone,
        )
        for recipient in submission.recipients:
            if not registry.is_permitted(submission.family, self.context.agency, recipient):
                raise ExchangeError(
                    Reason.PERMISSION_DENIED,
                    f"registry serial {registry.serial} does not permit "
                    f"'{self.context.agency}' to send {submission.family} to '{recipient}'",
                )
        envelope = sign_envelope(
            message.SerializeToString(deterministic=True),
            MESSAGE_PAYLOAD_TYPE,
            self.context.signing_key,
        )
        signed, digest = serialize_envelope(envelope)
        if len(signed) > self.context.limits.max_envelope_bytes:
            raise ExchangeError(
                Reason.TOO_LARGE,
                f"the message is {len(signed)} bytes signed, over the limit of "
                f"{self.context.limits.max_envelope_bytes}; send long content as an attachment",
            )
        row = message_row(
            message_id=message.message_id,
            direction="out",
            sender=self.context.agency,
            recipients=json.dumps(list(message.recipients)),
            family=submission.family,
            body_type=message.WhichOneof("body") or "",
            case_ref=message.case_ref,
            in_reply_to=message.in_reply_to,
            confidentiality=submission.confidentiality,
            created_at=now,
            stored_at=now,
            envelope=signed,
            envelope_sha256=digest.hex(),
            client_key=submission.client_key or None,
            version_of=version_of or None,
        )
        return _Prepared(row, list(message.recipients), attachments, message)

    def _check_distinct(self, submission: Submission) -> None:
        """Each recipient once, and never this node (receivers refuse both, check 4)."""
        if len(set(submission.recipients)) != len(submission.recipients):
            raise ExchangeError(Reason.INVALID, "a recipient is listed twice; list each once")
        if self.context.agency in submission.recipients:
            raise ExchangeError(
                Reason.INVALID,
                f"'{self.context.agency}' is this node: a node does not send to itself",
            )

    def _check_recipients(self, submission: Submission, now: datetime) -> Registry:
        self._check_distinct(submission)
        registry = self.context.usable_registry(now)
        for recipient in submission.recipients:
            if registry.member(recipient) is None:
                raise ExchangeError(
                    Reason.INVALID,
                    f"recipient '{recipient}' is not a member of federation registry serial "
                    f"{registry.serial}",
                )
        return registry

    def _ingest(self, path: Path) -> AttachmentInput:
        # Before copying anything: a name no receiver can store refuses the whole message.
        problem = file_name_problem(path.name)
        if problem:
            raise ExchangeError(
                Reason.INVALID, f"attachment {path}: the file name {problem}; rename the file"
            )
        if not path.is_file():
            raise ExchangeError(Reason.INVALID, f"attachment {path}: no such file")
        size = path.stat().st_size
        if size > self.context.limits.max_attachment_bytes:
            raise ExchangeError(
                Reason.TOO_LARGE,
                f"attachment {path} is {size} bytes, over the limit of "
                f"{self.context.limits.max_attachment_bytes}",
            )
        digest, size = self.blobs.ingest_file(path)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return AttachmentInput(digest, size, media_type, path.name)

    def _store_versions(self, versions: list[_Prepared], batch: Batch) -> tuple[str, bool]:
        """Store every version of one submission: (the first version's id, whether they are
        new). A repeat of the submitter's key returns the id stored the first time and stores
        nothing: its versions were stored with it, in the same unit, whatever the redaction
        would give now."""
        key = versions[0].row["client_key"]
        if key:
            earlier = batch.session.scalar(
                select(MESSAGES.c.message_id).where(MESSAGES.c.client_key == key)
            )
            if earlier is not None:
                return str(earlier), False
        for prepared in versions:
            self._store(prepared, batch)
        return str(versions[0].row["message_id"]), True

    def _store(self, prepared: _Prepared, batch: Batch) -> None:
        row, recipients, attachments = prepared.row, prepared.recipients, prepared.attachments
        batch.insert(MESSAGES, row)
        # The case moves with the message, or neither is stored (an illegal transition).
        if row["family"] == "reply":
            self.context.cases.reply_sent(batch, prepared.message, row["stored_at"])
        else:
            self.context.cases.open_sent(
                batch,
                prepared.message,
                row["family"],
                effective_marking(prepared.message),
                row["stored_at"],
            )
        for recipient in recipients:
            batch.insert(
                DELIVERIES,
                {
                    "message_id": row["message_id"],
                    "recipient": recipient,
                    "state": "pending",
                    "attempts": 0,
                    "next_attempt_at": row["created_at"],
                    "last_error": "",
                },
            )
        for attachment in attachments:
            sha_hex = attachment.sha256.hex()
            held = batch.session.scalar(
                select(ATTACHMENTS.c.sha256).where(ATTACHMENTS.c.sha256 == sha_hex)
            )
            if held is None:
                batch.insert(
                    ATTACHMENTS,
                    {"sha256": sha_hex, "size": attachment.size, "stored_at": row["stored_at"]},
                )
        audit.append(
            batch,
            AuditEvent.SENT,
            node=self.context.agency,
            at=row["stored_at"],
            message_id=row["message_id"],
            envelope_sha256=row["envelope_sha256"],
            peer=",".join(recipients),
            family=row["family"],
        )


def _comparable(value: Any) -> Any:
    """Lists and tuples of the same items compare equal (recipients come as either)."""
    return tuple(value) if isinstance(value, list | tuple) else value


def _version_key(version: Submission) -> str:
    """Equal for versions with the same content, whatever the body's form."""
    body: Any = version.body
    if isinstance(body, ProtoMessage):
        body = json_format.MessageToDict(body, preserving_proto_field_name=True)
    else:
        body = dict(body)
    return json.dumps(
        [
            body,
            version.confidentiality,
            sorted(version.field_markings.items()),
            [str(path) for path in version.attachment_paths],
        ],
        sort_keys=True,
        default=str,
    )
