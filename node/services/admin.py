"""The local admin API (unix socket): submit and read items without touching the database."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message as ProtoMessage
from sqlalchemy.orm import Session, sessionmaker

from node._pb.liandong.v1 import admin_pb2, admin_pb2_grpc, audit_pb2
from node.audit import log as audit
from node.audit.export import LogIdentity, export_bundle
from node.audit.service import AuditLog
from node.exchange import queries
from node.exchange.cases import CaseView
from node.exchange.context import NodeContext
from node.exchange.errors import ExchangeError, Reason
from node.exchange.handoff import reoffer
from node.exchange.messages import CONFIDENTIALITY_LABELS, UUID_RE
from node.exchange.outbox import Outbox, Submission
from node.exchange.supervision import supervision_report
from node.services.audit import checkpoint_message, inclusion_message
from node.services.status import domain_errors, item_status
from node.services.streams import answer_concurrently
from node.store.writer import BatchWriter

# Submissions one SubmitBatch may carry.
MAX_SUBMIT_BATCH = 256


def parse_time(text: str, what: str) -> datetime | None:
    """An RFC 3339 time with its zone (a bare local time is ambiguous for an audit)."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ExchangeError(
            Reason.INVALID, f"{what} '{text}' is not a time like 2026-11-23T08:00:00+08:00"
        ) from None
    if moment.tzinfo is None:
        raise ExchangeError(
            Reason.INVALID,
            f"{what} '{text}' has no time zone; add one, e.g. {text}+08:00 (Beijing) or {text}Z",
        )
    return moment


def _time(moment: datetime | None) -> str:
    return "" if moment is None else moment.isoformat().replace("+00:00", "Z")


def item_message(view: queries.ItemView) -> admin_pb2.Item:
    return admin_pb2.Item(
        message_id=view.message_id,
        direction=view.direction,
        family=view.family,
        body_type=view.body_type,
        sender=view.sender,
        recipients=view.recipients,
        created_at=_time(view.created_at),
        case_ref=view.case_ref,
        in_reply_to=view.in_reply_to,
        confidentiality=view.confidentiality,
        body_json=view.body_json,
        envelope_sha256=view.envelope_sha256,
        attachments=view.attachments,
        deliveries=[
            admin_pb2.Delivery(
                recipient=d.recipient,
                state=d.state,
                attempts=d.attempts,
                last_error=d.last_error,
                delivered_at=_time(d.delivered_at),
                receipt_sha256=d.receipt_sha256,
                receiver_log_index=d.receiver_log_index or 0,
            )
            for d in view.deliveries
        ],
        received_at=_time(view.stored_at) if view.direction == "inbox" else "",
        handed_off=view.handed_off or "",
        field_markings=view.field_markings,
        version_of=view.version_of,
        handoff_attempts=view.handoff_attempts,
        handoff_error=view.handoff_error,
        handoff_retry_at=_time(view.handoff_retry_at),
    )


def case_message(view: CaseView, history: list[dict[str, Any]]) -> admin_pb2.Case:
    return admin_pb2.Case(
        case_id=view.case_id,
        peer=view.peer,
        family=view.family,
        role=view.role,
        state=view.state,
        title=view.title,
        confidentiality=view.confidentiality,
        opened_at=_time(view.opened_at),
        updated_at=_time(view.updated_at),
        history=[
            admin_pb2.CaseEvent(
                event=e["event"],
                from_state=e["from_state"],
                to_state=e["to_state"],
                actor=e["actor"],
                message_id=e["message_id"] or "",
                reason=e["reason"],
                at=_time(e["at"]),
            )
            for e in history
        ],
    )


def submission_from(request: admin_pb2.SubmitRequest) -> Submission:
    """Translate a local submission; the body comes typed or as JSON."""
    typed = request.WhichOneof("typed_body")
    body: dict[str, object] | ProtoMessage
    if typed is not None:
        body = getattr(request, typed)
        body_type = request.body_type or typed
    else:
        try:
            body = json.loads(request.body_json or "{}")
        except json.JSONDecodeError as error:
            raise ExchangeError(Reason.INVALID, f"body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise ExchangeError(Reason.INVALID, "body must be a JSON object")
        body_type = request.body_type
    field_markings: dict[str, str] = {}
    for name, marking in sorted(request.field_markings.items()):
        if marking not in CONFIDENTIALITY_LABELS:
            raise ExchangeError(
                Reason.INVALID,
                f"field_markings: field '{name}' has no marking; use public, internal or "
                "confidential",
            )
        field_markings[name] = CONFIDENTIALITY_LABELS[marking]
    return Submission(
        family=request.family,
        recipients=list(request.recipients),
        body=body,
        body_type=body_type,
        case_ref=request.case_ref,
        in_reply_to=request.in_reply_to,
        confidentiality=CONFIDENTIALITY_LABELS.get(request.confidentiality, "internal"),
        attachment_paths=[Path(p) for p in request.attachment_paths],
        client_key=request.client_key,
        deadline=parse_time(request.deadline, "deadline"),
        field_markings=field_markings,
    )


class LocalAdminServicer(admin_pb2_grpc.LocalAdminServicer):
    def __init__(
        self,
        context: NodeContext,
        outbox: Outbox,
        sessions: sessionmaker[Session],
        endpoint: str,
        audit_log: AuditLog,
        log_identity: Callable[[], LogIdentity],
        writer: BatchWriter,
        poll_hand_off: Callable[[], None] = lambda: None,
    ) -> None:
        self.writer = writer
        # Tells the hand-off worker to look now (HandOffWorker.poll); without it a message
        # re-offered is found by its next round, within [handoff] retry_seconds.
        self.poll_hand_off = poll_hand_off
        self.context = context
        self.outbox = outbox
        self.audit_log = audit_log
        self.log_identity = log_identity
        self.sessions = sessions
        self.endpoint = endpoint
        # Set when the node stops: open SubmitStreams finish what they hold and end.
        self.draining = asyncio.Event()

    async def Submit(
        self, request: admin_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SubmitResponse:
        async with domain_errors(context, "Submit"):
            message_id = await self.outbox.submit(submission_from(request))
            return admin_pb2.SubmitResponse(message_id=message_id)
        raise AssertionError("unreachable")

    async def SubmitStream(
        self,
        request_iterator: AsyncIterator[admin_pb2.SubmitBatch],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[admin_pb2.SubmitResults]:
        """Each batch is stored in one commit and answered whole; batches run concurrently."""

        async def submit_batch(batch: admin_pb2.SubmitBatch) -> admin_pb2.SubmitResults:
            requests = batch.requests
            outcomes: list[str | Exception]
            if len(requests) > MAX_SUBMIT_BATCH:
                error = ExchangeError(
                    Reason.TOO_LARGE,
                    f"a batch of {len(requests)} submissions is over the limit of "
                    f"{MAX_SUBMIT_BATCH}; send the rest in another batch",
                )
                outcomes = [error] * len(requests)
            else:
                submissions: list[Submission] = []
                refused: dict[int, Exception] = {}
                for position, request in enumerate(requests):
                    try:
                        submissions.append(submission_from(request))
                    except ExchangeError as error:
                        refused[position] = error
                try:
                    accepted = iter(await self.outbox.submit_many(submissions))
                except Exception as error:  # e.g. the node is stopping: every request gets it
                    accepted = iter([error] * len(submissions))
                outcomes = [refused.get(n) or next(accepted) for n in range(len(requests))]
            results = admin_pb2.SubmitResults()
            for request, outcome in zip(requests, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    code, message = item_status(outcome, "SubmitStream")
                    results.results.add(seq=request.seq, code=code, message=message)
                else:
                    results.results.add(seq=request.seq, message_id=outcome)
            return results

        async for results in answer_concurrently(request_iterator, submit_batch, self.draining):
            yield results

    async def ListItems(
        self, request: admin_pb2.ListItemsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListItemsResponse:
        async with domain_errors(context, "ListItems"):
            direction = "out" if request.direction == request.DIRECTION_OUTBOX else "in"
            limit = request.limit or 100
            views = await asyncio.to_thread(self._read, queries.list_items, direction, limit)
            return admin_pb2.ListItemsResponse(items=[item_message(v) for v in views])
        raise AssertionError("unreachable")

    async def GetItem(
        self, request: admin_pb2.GetItemRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Item:
        async with domain_errors(context, "GetItem"):
            view = await asyncio.to_thread(self._read, queries.get_item, request.message_id)
            return item_message(view)
        raise AssertionError("unreachable")

    async def RetryHandOff(
        self, request: admin_pb2.RetryHandOffRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Item:
        async with domain_errors(context, "RetryHandOff"):
            message_id = request.message_id
            if not UUID_RE.match(message_id):
                raise ExchangeError(Reason.INVALID, f"'{message_id}' is not a message id (a UUID)")
            await self.writer.run(partial(reoffer, message_id))
            self.poll_hand_off()
            view = await asyncio.to_thread(self._read, queries.get_item, message_id)
            return item_message(view)
        raise AssertionError("unreachable")

    async def NodeInfo(
        self, request: admin_pb2.NodeInfoRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.NodeInfoResponse:
        async with domain_errors(context, "NodeInfo"):
            entries, pending = await asyncio.to_thread(self._counts)
            registry = self.context.registry
            return admin_pb2.NodeInfoResponse(
                agency=self.context.agency,
                endpoint=self.endpoint,
                registry_serial=registry.serial,
                registry_expires_at=_time(registry.expires_at),
                audit_entries=entries,
                pending_deliveries=pending,
            )
        raise AssertionError("unreachable")

    async def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.SignedCheckpoint:
        async with domain_errors(context, "GetCheckpoint"):
            found = await asyncio.to_thread(self.audit_log.checkpoint, request.size)
            return checkpoint_message(found)
        raise AssertionError("unreachable")

    async def GetInclusionProof(
        self, request: audit_pb2.InclusionProofRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.InclusionProof:
        async with domain_errors(context, "GetInclusionProof"):
            return await asyncio.to_thread(inclusion_message, self.audit_log, request, None)
        raise AssertionError("unreachable")

    async def ExportAudit(
        self, request: admin_pb2.ExportAuditRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.ExportProgress]:
        """Write the bundle in a worker thread; relay its progress, then the summary."""
        async with domain_errors(context, "ExportAudit"):
            since = parse_time(request.since, "since")
            until = parse_time(request.until, "until")
            loop = asyncio.get_running_loop()
            updates: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

            def progress(done: int, total: int) -> None:
                loop.call_soon_threadsafe(updates.put_nowait, (done, total))

            work = asyncio.ensure_future(
                asyncio.to_thread(
                    export_bundle,
                    self.sessions,
                    Path(request.path),
                    self.log_identity(),
                    since=since,
                    until=until,
                    progress=progress,
                )
            )
            while not work.done() or not updates.empty():
                waiting = asyncio.ensure_future(updates.get())
                await asyncio.wait({work, waiting}, return_when=asyncio.FIRST_COMPLETED)
                if waiting.done():
                    done, total = waiting.result()
                    yield admin_pb2.ExportProgress(done=done, total=total)
                else:
                    waiting.cancel()
            summary = work.result()
            yield admin_pb2.ExportProgress(
                finished=True,
                path=str(summary.path),
                done=summary.end_index - summary.first_index,
                total=summary.end_index - summary.first_index,
                first_index=summary.first_index,
                end_index=summary.end_index,
                checkpoints=summary.checkpoints,
                messages=summary.messages,
                size_bytes=summary.size_bytes,
            )

    async def ListCases(
        self, request: admin_pb2.ListCasesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListCasesResponse:
        async with domain_errors(context, "ListCases"):
            book = self.context.cases
            if request.case_id:
                views = await asyncio.to_thread(
                    self._read, partial(book.cases, case_id=request.case_id)
                )
                if not views:
                    raise ExchangeError(Reason.NOT_FOUND, f"no case {request.case_id} here")
                history = await asyncio.to_thread(self._read, book.history, request.case_id)
                return admin_pb2.ListCasesResponse(
                    cases=[
                        case_message(v, [e for e in history if e["peer"] == v.peer]) for v in views
                    ]
                )
            views = await asyncio.to_thread(
                self._read, partial(book.cases, state=request.state, limit=request.limit or 200)
            )
            return admin_pb2.ListCasesResponse(cases=[case_message(v, []) for v in views])
        raise AssertionError("unreachable")

    async def DecideCase(
        self, request: admin_pb2.DecideCaseRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Case:
        async with domain_errors(context, "DecideCase"):
            book = self.context.cases
            peer = request.peer
            if not peer:
                views = await asyncio.to_thread(
                    self._read, partial(book.cases, case_id=request.case_id)
                )
                if len(views) != 1:
                    raise ExchangeError(
                        Reason.INVALID if views else Reason.NOT_FOUND,
                        f"case {request.case_id} is held with "
                        + (
                            ", ".join(v.peer for v in views) + "; name the peer"
                            if views
                            else "no peer here"
                        ),
                    )
                peer = views[0].peer
            view = await self.writer.run(
                partial(
                    book.decide,
                    case_id=request.case_id,
                    peer=peer,
                    event=request.event,
                    reason=request.reason,
                    date=parse_time(request.date, "date"),
                    at=datetime.now(UTC),
                )
            )
            return case_message(view, [])
        raise AssertionError("unreachable")

    async def ListDeadlines(
        self, request: admin_pb2.ListDeadlinesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListDeadlinesResponse:
        async with domain_errors(context, "ListDeadlines"):
            clocks = await asyncio.to_thread(
                self._read,
                partial(
                    self.context.cases.open_clocks,
                    overdue_only=request.overdue,
                    agency=request.agency,
                    limit=request.limit or 500,
                ),
            )
            now = datetime.now(UTC)
            return admin_pb2.ListDeadlinesResponse(
                deadlines=[
                    admin_pb2.Deadline(
                        case_id=c.case_id,
                        peer=c.peer,
                        family=c.family,
                        title=c.title,
                        rule=c.rule,
                        responsible=c.responsible,
                        due_at=_time(c.due_at),
                        state=c.state,
                        seconds_left=int((c.due_at - now).total_seconds()),
                        confidentiality=c.confidentiality,
                    )
                    for c in clocks
                ]
            )
        raise AssertionError("unreachable")

    async def SupervisionReport(
        self, request: admin_pb2.SupervisionReportRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SupervisionReportResponse:
        async with domain_errors(context, "SupervisionReport"):
            findings = await asyncio.to_thread(
                self._read,
                supervision_report,
                self.context.cases,
                datetime.now(UTC),
                self.outbox.blobs.read,
                self.context.thresholds,
            )
            return admin_pb2.SupervisionReportResponse(
                findings=[
                    admin_pb2.SupervisionFinding(
                        finding=f.finding,
                        case_id=f.case_id,
                        transferred_by=f.transferred_by,
                        title=f.title,
                        state=f.state,
                        received_at=_time(f.received_at),
                        due_at=_time(f.due_at),
                        overdue_days=f.overdue_days,
                        reason=f.reason,
                        decided_by=f.decided_by,
                    )
                    for f in findings
                ]
            )
        raise AssertionError("unreachable")

    def _read(self, query, *args):  # type: ignore[no-untyped-def]
        with self.sessions() as session:
            return query(session, *args)

    def _counts(self) -> tuple[int, int]:
        with self.sessions() as session:
            return audit.size(session), queries.pending_deliveries(session)
