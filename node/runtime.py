"""The running node: loads and checks everything at start-up, then wires the parts.

Start-up fails fast with one line naming the file and the problem: a missing key
file, a registry whose signature is invalid or that has expired, a malformed
agency id, a database that cannot be reached.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, cast

import structlog
from google.protobuf import json_format
from google.protobuf.message import Message as ProtoMessage
from grpc_health.v1 import health_pb2
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from node.audit import log as audit
from node.audit import note
from node.audit.check import LogMismatch, check_log
from node.audit.checkpoint import log_origin
from node.audit.export import LogIdentity
from node.audit.log import AuditEvent
from node.audit.refusals import FLUSH_SECONDS
from node.audit.service import AuditLog
from node.audit.tree import TreeSequencer
from node.audit.witness import Witness, split_views
from node.config import NodeConfig, default_plugins
from node.envelope import sign_note
from node.exchange.attachments import BlobStore, expire_pending
from node.exchange.case_changes import CaseChangeFeed
from node.exchange.context import NodeContext
from node.exchange.delivery import Confirmation, DeliveryWorker
from node.exchange.errors import ExchangeError, Reason
from node.exchange.handoff import HandOffDeclined, HandOffWorker
from node.exchange.inbound import Receiver
from node.exchange.outbox import Outbox, Submission
from node.exchange.review import VerdictError, answer_for, to_review
from node.exchange.scheduler import DeadlineScheduler
from node.federation import Registry, RegistryError, verify_registry
from node.identity import IdentityError, load_public_key, load_signing_key
from node.peers import GrpcPeerTransport
from node.pki import SetupError, check_node_tls
from node.plugin_api import (
    CaseChange,
    Confidentiality,
    Decline,
    DeliveryConfirmation,
    Draft,
    DraftRejected,
    InboundItem,
)
from node.plugins import PluginError, PluginHooks, load_plugin_manager
from node.server import build_admin_server, build_peer_server
from node.services.admin import LocalAdminServicer
from node.services.audit import AuditServicer
from node.services.exchange import ExchangeServicer
from node.services.health import NodeHealth
from node.store.db import SequencerBusy, SequencerLock, make_engine, session_factory, upgrade
from node.store.models import NODE_STATE, REGISTRIES, NodeStateRecord
from node.store.writer import Batch, BatchWriter

log = structlog.get_logger(__name__)
REGISTRY_SERIAL_KEY = "registry_serial"
HEALTH_INTERVAL_SECONDS = 5.0
PENDING_SWEEP_SECONDS = 3600.0
# Health service that says whether every peer has shown this node one consistent history.
WITNESS_HEALTH = "liandong.v1.Witness"


# Refusals that are the draft's own fault; anything else is worth retrying later.
DRAFT_FAULTS = {Reason.INVALID, Reason.PERMISSION_DENIED, Reason.TOO_LARGE, Reason.NOT_FOUND}
WORKER_RESTART_SECONDS = 1.0


class StartupError(Exception):
    """The node cannot start; the message names the file and the problem."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StartupError(f"{what} {path}: file not found") from None
    except OSError as error:
        raise StartupError(f"{what} {path}: {error.strerror}") from None


class PluginAPI:
    """The NodeAPI handed to plugins: no session, no keys; submit goes through the outbox."""

    def __init__(self, node: Node, loop: asyncio.AbstractEventLoop) -> None:
        self._node = node
        self._loop = loop
        self._log = structlog.get_logger("plugin")

    @property
    def agency(self) -> str:
        return self._node.config.agency

    @property
    def data_dir(self) -> Path:
        return self._node.config.data_dir

    @property
    def log(self) -> Any:
        return self._log

    def plugin_config(self, name: str) -> Mapping[str, Any]:
        return self._node.config.plugin_settings.get(name, {})

    def submit(self, draft: Draft) -> str:
        """Called from a plugin's worker thread; blocks until the message is stored."""
        [outcome] = self.submit_many([draft])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def submit_many(self, drafts: Sequence[Draft]) -> list[str | Exception]:
        """Called from a plugin's worker thread; blocks until the messages are stored."""
        submissions = [
            submission_of(draft, f"plugin:{draft.source}" if draft.source else "")
            for draft in drafts
        ]
        future = asyncio.run_coroutine_threadsafe(
            self._node.outbox.submit_many(submissions), self._loop
        )
        try:
            outcomes = future.result()
        except Exception as error:  # e.g. the database is down: every draft waits for later
            log.warning("drafts not stored", drafts=len(drafts), error=str(error))
            return [RuntimeError(f"the node could not store the drafts: {error}")] * len(drafts)
        return [_for_plugin(outcome) for outcome in outcomes]


def _for_plugin(outcome: str | Exception) -> str | Exception:
    """An outbox outcome as plugins see it: the id, DraftRejected, or a reason to retry."""
    if not isinstance(outcome, ExchangeError):
        return outcome
    if outcome.reason in DRAFT_FAULTS:
        return DraftRejected(outcome.message)
    # Not the draft's fault (e.g. the registry expired): the plugin keeps it and retries.
    return RuntimeError(outcome.message)


class _BodyOf(Mapping[str, Any]):
    """A typed body as the mapping plugins read, converted only when a plugin reads it:
    most redactors look at the recipient and the markings first, and most return None."""

    def __init__(self, message: ProtoMessage) -> None:
        self.message = message
        self._converted: dict[str, Any] | None = None

    def _dict(self) -> dict[str, Any]:
        if self._converted is None:
            self._converted = json_format.MessageToDict(
                self.message, preserving_proto_field_name=True
            )
        return self._converted

    def __getitem__(self, key: str) -> Any:
        return self._dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())


def draft_of(submission: Submission) -> Draft:
    """A submission as the plugins see it (``liandong_redact``)."""
    body = submission.body
    if isinstance(body, ProtoMessage):
        body = _BodyOf(body)
    return Draft(
        family=submission.family,
        recipients=tuple(submission.recipients),
        body=body,
        body_type=submission.body_type,
        case_ref=submission.case_ref,
        in_reply_to=submission.in_reply_to,
        confidentiality=cast(Confidentiality, submission.confidentiality),
        attachments=tuple(Path(path) for path in submission.attachment_paths),
        field_markings=cast(Mapping[str, Confidentiality], submission.field_markings),
        source=submission.client_key,
    )


def submission_of(draft: Draft, client_key: str, deadline: datetime | None = None) -> Submission:
    """A draft as the outbox takes it: a plugin's, or a redactor's version of a submission."""
    body: Mapping[str, Any] | ProtoMessage = draft.body
    if isinstance(body, _BodyOf):  # a redactor gave it back unread: the typed body submitted
        body = body.message
    return Submission(
        family=draft.family,
        recipients=tuple(draft.recipients),
        body=body,
        body_type=draft.body_type,
        case_ref=draft.case_ref,
        in_reply_to=draft.in_reply_to,
        confidentiality=draft.confidentiality,
        attachment_paths=tuple(draft.attachments),
        client_key=client_key,
        deadline=deadline,
        field_markings=dict(draft.field_markings),
    )


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        signing_key_path = config.signing_key
        try:
            self.signing_key = load_signing_key(signing_key_path)
            self.operator_key = load_public_key(config.operator_key)
        except IdentityError as error:
            raise StartupError(str(error)) from None
        self.tls_key = _read(config.tls_key, "TLS key")
        self.tls_cert = _read(config.tls_cert, "TLS certificate")
        self.ca_cert = _read(config.ca_cert, "federation CA certificate")
        registry_bytes = _read(config.registry, "federation registry")
        try:
            self.tls_fingerprint = check_node_tls(
                self.tls_cert,
                self.tls_key,
                self.ca_cert,
                config.agency,
                cert_path=config.tls_cert,
                key_path=config.tls_key,
                ca_path=config.ca_cert,
            )
        except SetupError as error:
            raise StartupError(str(error)) from None
        shown_url = make_url(config.database_url).render_as_string(hide_password=True)
        try:
            self.engine = make_engine(config.database_url)
            self.sequencer_lock = SequencerLock(self.engine)
            upgrade(self.engine)
        except SequencerBusy as error:
            raise StartupError(f"database {shown_url}: {error}") from None
        except SQLAlchemyError as error:
            raise StartupError(
                f"database {shown_url}: {error.__class__.__name__}: {str(error).splitlines()[0]}"
            ) from None
        self.sessions = session_factory(self.engine)
        self.registry = self._verify_registry(registry_bytes)
        self.registry_bytes = registry_bytes
        self._check_own_membership(self.registry)
        self._registry_mtime = config.registry.stat().st_mtime
        self.log_origin = log_origin(self.registry.federation, config.agency)
        self.log_verifier = note.parse_vkey(
            note.vkey(self.log_origin, self.signing_key.public_bytes())
        )
        self._check_audit_log(shown_url)
        try:
            self.hooks = PluginHooks(load_plugin_manager(default_plugins(config)))
        except PluginError as error:
            raise StartupError(f"config {config.path}: plugins: {error}") from None
        self.context = NodeContext(
            agency=config.agency,
            signing_key=self.signing_key,
            registry=self.registry,
            registry_grace=timedelta(seconds=config.registry_grace_seconds),
            limits=config.limits,
            deadlines=config.deadlines,
            thresholds=config.supervision_thresholds,
        )
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(config.data_dir / "blobs")
        self.stopped = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._background: list[asyncio.Task[None]] = []

    def _check_audit_log(self, shown_url: str) -> None:
        """Refuse to run on an audit log that does not match the checkpoints this node signed."""
        with self.sessions() as session:
            try:
                checked = check_log(session, self.log_verifier, self.log_origin)
            except LogMismatch as error:
                raise StartupError(
                    f"audit log in {shown_url}: first bad index {error.index}: {error}; the "
                    "node will not add to a log that does not match what it signed. Restore the "
                    "database from a backup (docs/operations.md) and keep this copy for the "
                    "auditors"
                ) from None
        log.info("audit log checked", entries=checked.size, checkpoints=checked.checkpoints)

    def _log_identity(self) -> LogIdentity:
        """Who this log is, with the registry file and operator key an auditor needs."""
        return LogIdentity(
            agency=self.config.agency,
            origin=self.log_origin,
            federation=self.registry.federation,
            registry=self.config.registry.read_bytes(),
            operator_key_pem=self.config.operator_key.read_bytes(),
        )

    def _check_own_membership(self, registry: Registry) -> None:
        """This node's agency, signing key and TLS certificate must be the registry's."""
        source = f"federation registry {self.config.registry} (serial {registry.serial})"
        agency = self.config.agency
        member = registry.member(agency)
        if member is None:
            raise StartupError(
                f"{source}: agency '{agency}' (from config {self.config.path}) is not a member; "
                "ask the operator to add it"
            )
        if not registry.key_valid_at(agency, self.signing_key.key_id, datetime.now(UTC)):
            raise StartupError(
                f"{source}: signing key {self.signing_key.key_id} "
                f"({self.config.signing_key}) is not a valid key of '{agency}'; peers would "
                "refuse every message. Ask the operator to publish it"
            )
        if self.tls_fingerprint not in member.tls_fingerprints:
            raise StartupError(
                f"{source}: TLS certificate {self.config.tls_cert} is not the one registered "
                f"for '{agency}'; peers would refuse the connection. Install the certificate "
                "the operator issued with this registry"
            )

    def _verify_registry(self, data: bytes) -> Registry:
        with self.sessions() as session:
            state = session.get(NodeStateRecord, REGISTRY_SERIAL_KEY)
            min_serial = int(state.value) if state else 0
        try:
            return verify_registry(
                data,
                self.operator_key,
                now=datetime.now(UTC),
                grace=timedelta(seconds=self.config.registry_grace_seconds),
                min_serial=min_serial,
                source=f"federation registry {self.config.registry}",
            )
        except RegistryError as error:
            raise StartupError(str(error)) from None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tree = TreeSequencer(
            self.log_origin, partial(sign_note, name=self.log_origin, key=self.signing_key)
        )
        self.writer = BatchWriter(self.sessions, sequencer=self.tree)
        self.writer.start()
        await self.writer.run(self._record_registry)
        self.api = PluginAPI(self, loop)
        plugin_rules = await asyncio.to_thread(self.hooks.deadline_rules, self.api)
        if plugin_rules:
            deadlines = self.config.deadlines.with_plugin_rules(plugin_rules)
            self.context.deadlines = self.context.cases.deadlines = deadlines
            log.info("deadline rules from plugins", rules=[r.name for r in plugin_rules])
        self._confirmations: asyncio.Queue[DeliveryConfirmation] = asyncio.Queue()
        self.transport = GrpcPeerTransport(
            self.ca_cert, self.tls_key, self.tls_cert, self.config.delivery.rpc_timeout_seconds
        )
        self.handoff = HandOffWorker(
            self.config.agency,
            self.writer,
            self.sessions,
            self.blobs,
            self._hand_off,
            self.config.handoff,
        )
        self.receiver = Receiver(
            self.context,
            self.writer,
            self.sessions,
            self.blobs,
            self.handoff.offer,
            self._proof_for,
        )
        self.delivery = DeliveryWorker(
            self.context,
            self.writer,
            self.sessions,
            self.blobs,
            self.transport,
            self.config.delivery,
            self._confirmed,
        )
        self.outbox = Outbox(
            self.context,
            self.writer,
            self.blobs,
            self.delivery.enqueue,
            self._redact_for if self.hooks.redacts else None,
        )
        self.health = NodeHealth()
        self.exchange_servicer = ExchangeServicer(self.receiver, self.blobs)
        self.audit_log = AuditLog(self.context, self.sessions, self.writer)
        self.peer_server = build_peer_server(
            self.exchange_servicer,
            AuditServicer(self.audit_log),
            self.health,
            self.config.listen,
            limits=self.config.limits,
            ca_pem=self.ca_cert,
            key_pem=self.tls_key,
            cert_pem=self.tls_cert,
        )
        socket_path = self.config.admin_socket
        if socket_path.exists():
            socket_path.unlink()  # left behind by a killed node
        self.admin_servicer = LocalAdminServicer(
            self.context,
            self.outbox,
            self.sessions,
            self.config.listen,
            self.audit_log,
            self._log_identity,
            self.writer,
            self.handoff.poll,
        )
        self.admin_server = build_admin_server(
            self.admin_servicer,
            self.health,
            str(socket_path),
            max_envelope_bytes=self.config.limits.max_envelope_bytes,
        )
        await self.peer_server.start()
        await self.admin_server.start()
        os.chmod(socket_path, 0o600)  # only this node's user may use the admin API
        await self._update_health()
        self.witness = Witness(
            self.context,
            self.sessions,
            self.writer,
            self.transport,
            self.config.witness_interval_seconds,
            self._split_view_seen,
        )
        self.scheduler = DeadlineScheduler(
            self.context, self.sessions, self.writer, self.outbox, self.config.deadline_scan_seconds
        )
        self._workers = [
            loop.create_task(self._supervise("delivery", self.delivery.run)),
            loop.create_task(self._supervise("hand-off", self.handoff.run)),
            loop.create_task(self._supervise("deadlines", self.scheduler.run)),
        ]
        if self.config.witness_interval_seconds > 0:
            self._workers.append(loop.create_task(self._supervise("witness", self.witness.run)))
        self.case_changes: CaseChangeFeed | None = None
        if watchers := self.hooks.case_watchers:
            self.case_changes = CaseChangeFeed(
                self.writer,
                self.sessions,
                watchers,
                self._report_case_changes,
                self.config.poll_seconds,
            )
            self._workers.append(
                loop.create_task(self._supervise("case changes", self.case_changes.run))
            )
        self._background = [
            loop.create_task(self._poll()),
            loop.create_task(self._watch()),
            loop.create_task(self._notify_confirmations()),
            loop.create_task(self._expire_pending_uploads()),
            loop.create_task(self._write_refusal_counts()),
        ]
        await asyncio.to_thread(self.hooks.node_started, self.api)
        log.info(
            "node serving",
            agency=self.config.agency,
            listen=self.config.listen,
            admin_socket=str(socket_path),
            registry_serial=self.registry.serial,
            plugins=self.hooks.names,
        )

    def _record_registry(self, batch: Batch) -> None:
        if (
            batch.session.scalar(
                select(REGISTRIES.c.serial).where(REGISTRIES.c.serial == self.registry.serial)
            )
            is None
        ):
            batch.insert(
                REGISTRIES,
                {
                    "serial": self.registry.serial,
                    "data": self.registry_bytes,
                    "accepted_at": datetime.now(UTC),
                },
            )
        stored = batch.session.scalar(
            select(NODE_STATE.c.value).where(NODE_STATE.c.key == REGISTRY_SERIAL_KEY)
        )
        if stored is not None and int(stored) >= self.registry.serial:
            return
        if stored is None:
            batch.insert(
                NODE_STATE, {"key": REGISTRY_SERIAL_KEY, "value": str(self.registry.serial)}
            )
        else:
            batch.update(
                NODE_STATE, {"key": REGISTRY_SERIAL_KEY}, {"value": str(self.registry.serial)}
            )
        audit.append(
            batch,
            AuditEvent.REGISTRY_ACCEPTED,
            node=self.config.agency,
            detail=f"federation={self.registry.federation} serial={self.registry.serial} "
            f"expires_at={self.registry.expires_at.isoformat()}",
        )

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Keep a worker running: a fault (say, the database went away) is logged and the
        worker restarted, instead of the node going on without it."""
        while True:
            try:
                await run()
                return  # it stopped because the node is stopping
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker failed; restarting", worker=name)
                await asyncio.sleep(WORKER_RESTART_SECONDS)

    def _redact_for(self, submission: Submission, recipient: str) -> Submission | None:
        """Ask the plugins for ``recipient``'s version (in the outbox's worker thread)."""
        try:
            version = self.hooks.redact(draft_of(submission), recipient, self.api)
        except DraftRejected as error:
            raise ExchangeError(Reason.INVALID, f"refused by liandong_redact: {error}") from None
        except Exception as error:
            log.exception("plugin hook failed", hook="liandong_redact", recipient=recipient)
            raise ExchangeError(
                Reason.UNAVAILABLE,
                f"liandong_redact failed for recipient '{recipient}' ({error.__class__.__name__}: "
                f"{error}); nothing was sent, try again once the plugin is fixed",
            ) from None
        if version is None:
            return None
        if not isinstance(version, Draft):
            raise ExchangeError(
                Reason.UNAVAILABLE,
                f"liandong_redact returned a {type(version).__name__} for recipient "
                f"'{recipient}', not a Draft or None; nothing was sent",
            )
        # What a version may not change is checked by the outbox (REDACTABLE).
        return submission_of(version, version.source, submission.deadline)

    def _hand_off(self, item: InboundItem) -> str | None:
        """Review the item (``liandong_review_inbound``), then hand it to the local system
        unless the review declined it (in the hand-off worker's thread)."""
        if self.hooks.reviews and to_review(item, self.config.agency):
            self._review(item)
        return self.hooks.hand_off(item, self.api)

    def _review(self, item: InboundItem) -> None:
        """Send the answer a plugin's verdict calls for; raise HandOffDeclined for a decline.

        A plugin's exception propagates: the hand-off is retried, and the answer's
        idempotency key keeps it from going out twice.
        """
        verdict = self.hooks.review_inbound(item, self.api)
        if verdict is None:
            return
        try:
            answer_id = self.api.submit(answer_for(item, verdict, self.config.agency))
        except (VerdictError, DraftRejected, RuntimeError) as error:
            # The verdict does not fit (any more: an officer decided first), or the node
            # cannot send now (registry expired): the officer decides. Were the node unable
            # to store anything, the hand-off's own record fails too and this is asked again.
            log.warning(
                "verdict not sent; the item goes to the local system for a person to decide",
                hook="liandong_review_inbound",
                message_id=item.message_id,
                error=str(error),
            )
            return
        log.info("answered on arrival", message_id=item.message_id, answer=verdict.event)
        if isinstance(verdict, Decline):
            raise HandOffDeclined(f"{verdict.event} ({verdict.reason}), answer {answer_id}")

    def _report_case_changes(self, plugin: str, changes: Sequence[CaseChange]) -> None:
        self.hooks.cases_changed(plugin, changes, self.api)

    async def _confirmed(self, confirmations: list[Confirmation]) -> None:
        """Queue the plugins' notification; delivery does not wait for the local system."""
        for confirmation in confirmations:
            self._confirmations.put_nowait(
                DeliveryConfirmation(
                    message_id=confirmation.message_id,
                    recipient=confirmation.recipient,
                    delivered_at=confirmation.delivered_at,
                    receipt_sha256=confirmation.receipt_sha256,
                    receiver_log_index=confirmation.receiver_log_index,
                )
            )

    async def _notify_confirmations(self) -> None:
        while True:
            group = [await self._confirmations.get()]
            while not self._confirmations.empty():
                group.append(self._confirmations.get_nowait())
            await asyncio.to_thread(self._call_confirmation_hooks, group)

    def _call_confirmation_hooks(self, group: list[DeliveryConfirmation]) -> None:
        if not group:
            return
        try:
            self.hooks.deliveries_confirmed(group, self.api)
        except Exception as error:  # a plugin's failure must not stop the node
            log.error("deliveries_confirmed hook failed", error=str(error))

    async def _poll(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.hooks.poll_local_system, self.api)
            except Exception as error:  # a plugin's failure must not stop the node
                log.error("poll_local_system hook failed", error=str(error))
            await asyncio.sleep(self.config.poll_seconds)

    async def _write_refusal_counts(self) -> None:
        """Refusals past a caller's audit budget are counted; each kind's count is written
        as one entry every few seconds (node.audit.refusals)."""
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self._flush_refusal_counts()

    async def _flush_refusal_counts(self) -> None:
        summaries = self.context.refusals.take_summaries()
        if not summaries:
            return

        def write(batch: Batch) -> None:
            for summary in summaries:
                audit.append(
                    batch,
                    summary.event,
                    node=self.config.agency,
                    peer=summary.peer,
                    detail=summary.detail,
                )

        try:
            await self.writer.run(write)
        except Exception:  # the counts are in the log line at least
            log.exception(
                "refusal counts not written",
                counts={f"{s.peer} {s.event}": s.count for s in summaries},
            )
            return
        log.warning(
            "refusals over their audit budget counted",
            counts={f"{s.peer} {s.event}": s.count for s in summaries},
        )

    async def _expire_pending_uploads(self) -> None:
        """What a peer uploaded and no message it delivered cites (unfinished, or verified
        and never cited) is deleted after `[limits] pending_upload_ttl_seconds`: a peer must
        not fill the disk with files it never sends a message for."""
        ttl = self.config.limits.pending_upload_ttl_seconds
        while True:
            try:
                removed = await expire_pending(self.blobs, ttl)
                if removed:
                    log.info("uploads no message cited expired", files=removed, ttl_seconds=ttl)
            except Exception:  # keep sweeping; the next round may succeed
                log.exception("expiring uploads failed")
            await asyncio.sleep(min(max(ttl / 4, 1.0), PENDING_SWEEP_SECONDS))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_SECONDS)
            try:
                await self._reload_registry_if_changed()
                await self._update_health()
            except Exception:  # keep watching; the next round may succeed
                log.exception("health or registry check failed")

    async def _reload_registry_if_changed(self) -> None:
        """Take a newly published registry without a restart; keep the old one if it is bad."""
        try:
            mtime = self.config.registry.stat().st_mtime
        except OSError:
            return
        if mtime == self._registry_mtime:
            return
        self._registry_mtime = mtime
        try:
            data = self.config.registry.read_bytes()
            registry = await asyncio.to_thread(self._verify_registry, data)
            self._check_own_membership(registry)
        except (OSError, StartupError) as error:
            log.error("new registry file refused; keeping the current one", error=str(error))
            return
        if registry.serial == self.registry.serial:
            return
        self.registry = registry
        self.registry_bytes = data
        self.context.registry = registry
        await self.writer.run(self._record_registry)
        log.info(
            "registry reloaded",
            serial=registry.serial,
            expires_at=registry.expires_at.isoformat(),
        )

    async def _update_health(self) -> None:
        serving = True
        try:
            self.context.usable_registry(datetime.now(UTC))
        except ExchangeError as error:
            log.error("registry unusable", error=error.message)
            serving = False
        try:
            await asyncio.to_thread(self._ping_database)
        except SQLAlchemyError as error:
            log.error("database unusable", error=str(error).splitlines()[0])
            serving = False
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", "liandong.v1.Exchange", "liandong.v1.Audit", "liandong.v1.LocalAdmin"):
            await self.health.set(service, status)
        caught = await asyncio.to_thread(split_views, self.sessions)
        if caught:
            log.error("split view recorded; see the audit log (event split_view)", peers=caught)
        await self.health.set(
            WITNESS_HEALTH,
            health_pb2.HealthCheckResponse.NOT_SERVING
            if caught or not serving
            else health_pb2.HealthCheckResponse.SERVING,
        )

    def _proof_for(self, index: int) -> bytes:
        proof = self.tree.take_proof(index)
        return b"" if proof is None else proof.text()

    def _split_view_seen(self, peer: str) -> None:
        # At once, not at the next health round: monitoring should see it now.
        asyncio.get_running_loop().create_task(
            self.health.set(WITNESS_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING)
        )

    def _ping_database(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    async def stop(self, grace: float = 10.0) -> None:
        """Drain in-flight calls, finish queued writes, stop the workers."""
        await self.health.enter_graceful_shutdown()
        for task in self._background:
            task.cancel()
        self.handoff.stop()
        self.witness.stop()
        self.scheduler.stop()
        if self.case_changes is not None:
            self.case_changes.stop()
        self.exchange_servicer.draining.set()
        self.admin_servicer.draining.set()
        await asyncio.gather(self.peer_server.stop(grace), self.admin_server.stop(grace))
        await self.delivery.stop(grace)
        leftovers = []
        while not self._confirmations.empty():
            leftovers.append(self._confirmations.get_nowait())
        await asyncio.to_thread(self._call_confirmation_hooks, leftovers)
        await asyncio.gather(*self._workers, *self._background, return_exceptions=True)
        await self._flush_refusal_counts()  # what was counted since the last flush
        await self.writer.stop()
        await self.transport.close()
        self.sequencer_lock.release()
        self.engine.dispose()
        self.config.admin_socket.unlink(missing_ok=True)
        log.info(
            "node stopped",
            agency=self.config.agency,
            write_batches=self.writer.batches,
            write_jobs=self.writer.jobs,
            delivered=self.delivery.delivered,
        )
        self.stopped.set()
