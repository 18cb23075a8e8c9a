"""The `liandong` command: set up a federation and nodes, run a node, send and read.

Commands that work with a running node (send, inbox, outbox, show) talk to its
local admin API on a unix socket; none of them opens the database.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from node._pb.liandong.v1 import admin_pb2
from node.admin_client import AdminClient, AdminError
from node.config import CONFIG_FILE_NAME, ConfigError, load_config, render_config
from node.exchange.families import CLI_FAMILIES, FAMILY_BODIES
from node.exchange.messages import CONFIDENTIALITY_NAMES, marking_label
from node.federation import RegistryError
from node.identity import IdentityError
from node.plugin_api import MARKINGS
from node.progress import ProgressBar
from node.textable import render_table

T = TypeVar("T")
EXIT_ERROR = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    if not hasattr(options, "handler"):
        parser.print_help()
        return EXIT_USAGE
    try:
        result: int = options.handler(options)
        return result
    except (CommandError, ConfigError, IdentityError, RegistryError, AdminError) as error:
        print(f"liandong: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `liandong outbox | head`: the reader left; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def field_marking(text: str) -> tuple[str, str]:
    """``suspect=confidential`` -> ("suspect", "confidential")."""
    name, _, marking = text.partition("=")
    if not name or marking not in CONFIDENTIALITY_NAMES:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not FIELD=MARKING with MARKING one of {', '.join(MARKINGS)}"
        )
    return name, marking


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liandong",
        description="Liandong (联动): signed, audited exchange between enforcement agencies.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    federation = commands.add_parser(
        "federation", help="operator: create the federation, admit members, publish the registry"
    )
    fed_commands = federation.add_subparsers(title="federation commands", metavar="COMMAND")
    fed_init = fed_commands.add_parser("init", help="create the federation CA and registry key")
    fed_init.add_argument("--dir", type=Path, required=True, help="operator directory to create")
    fed_init.add_argument("--name", required=True, help="federation name, e.g. changzhi-env")
    fed_init.set_defaults(handler=cmd_federation_init)
    fed_add = fed_commands.add_parser(
        "add-member", help="issue a TLS certificate for an agency's request and record it"
    )
    fed_add.add_argument("request", type=Path, help="request.json written by `liandong init`")
    fed_add.add_argument("--dir", type=Path, default=Path("."), help="operator directory")
    fed_add.add_argument(
        "--valid-days", type=positive_int, default=365, help="certificate validity"
    )
    fed_add.set_defaults(handler=cmd_federation_add_member)
    fed_supervise = fed_commands.add_parser(
        "supervise",
        help="name the agency that escalation notices (督办) about a member go to",
        description="Record in the operator's state which member supervises AGENCY: when "
        "AGENCY misses a deadline and the grace period ends, the waiting agency's node sends "
        "the signed escalation notice there. Takes effect with the next published registry.",
    )
    fed_supervise.add_argument("agency", help="the member supervised, e.g. 140400/ecology")
    who = fed_supervise.add_mutually_exclusive_group(required=True)
    who.add_argument("--by", default="", help="the supervising member, e.g. 140400/discipline")
    who.add_argument("--none", action="store_true", help="remove the member's supervisor")
    fed_supervise.add_argument("--dir", type=Path, default=Path("."), help="operator directory")
    fed_supervise.set_defaults(handler=cmd_federation_supervise)
    fed_auditor = fed_commands.add_parser(
        "auditor",
        help="name or unname a member as an auditor, who may read every member's whole audit log",
        description="Record in the operator's state whether AGENCY is an auditor: an auditor "
        "reads every entry of every member's audit log over the Audit service; any other member "
        "only the entries it is a party to (checkpoints and proofs are open to all). Takes "
        "effect with the next published registry.",
    )
    fed_auditor.add_argument("agency", help="the member, e.g. 140400/discipline")
    change = fed_auditor.add_mutually_exclusive_group(required=True)
    change.add_argument("--add", action="store_true", help="name the member an auditor")
    change.add_argument("--remove", action="store_true", help="the member is no auditor any more")
    fed_auditor.add_argument("--dir", type=Path, default=Path("."), help="operator directory")
    fed_auditor.set_defaults(handler=cmd_federation_auditor)
    fed_publish = fed_commands.add_parser("publish", help="sign and write the member registry")
    fed_publish.add_argument("--out", type=Path, required=True, help="registry file to write")
    fed_publish.add_argument("--dir", type=Path, default=Path("."), help="operator directory")
    fed_publish.add_argument(
        "--valid-days", type=positive_int, default=30, help="registry validity"
    )
    fed_publish.set_defaults(handler=cmd_federation_publish)

    init = commands.add_parser("init", help="agency: create a node's keys, config and request")
    init.add_argument("--agency", required=True, help="agency id, e.g. 140400/ecology")
    init.add_argument("--endpoint", required=True, help="HOST:PORT peers will connect to")
    init.add_argument("--data-dir", type=Path, required=True, help="node directory to create")
    init.add_argument("--name", help="display name, e.g. 长治市生态环境局")
    init.add_argument("--database-url", default="", help="default: SQLite in the data directory")
    init.set_defaults(handler=cmd_init)

    serve = commands.add_parser("serve", help="run a node")
    serve.add_argument("--config", type=Path, required=True, help="the node's node.toml")
    serve.set_defaults(handler=cmd_serve)

    send = commands.add_parser("send", help="send a message through the running node")
    send.add_argument("family", choices=sorted(CLI_FAMILIES), help="exchange family")
    send.add_argument(
        "--to", action="append", required=True, metavar="ID", help="recipient (repeat)"
    )
    send.add_argument("--body", type=Path, required=True, help="JSON file with the body")
    send.add_argument("--attach", action="append", type=Path, default=[], metavar="FILE")
    send.add_argument(
        "--body-type",
        default="",
        choices=FAMILY_BODIES["reply"],
        help="for reply: evidence_response, recommendation_reply or feedback",
    )
    send.add_argument("--case-ref", default="", help="case reference (thread)")
    send.add_argument("--in-reply-to", default="", help="message id answered")
    send.add_argument(
        "--deadline",
        default="",
        help="RFC 3339 time the message sets as its deadline, e.g. 2026-12-20T17:00:00+08:00",
    )
    send.add_argument(
        "--confidentiality",
        default="internal",
        choices=sorted(CONFIDENTIALITY_NAMES),
        help="the marking of the message as a whole (default: internal)",
    )
    send.add_argument(
        "--mark",
        action="append",
        default=[],
        type=field_marking,
        metavar="FIELD=MARKING",
        help="mark one body field above the message, e.g. --mark suspect=confidential "
        "(repeatable; 002 §五(三): confidential content is marked explicitly)",
    )
    _client_options(send)
    send.set_defaults(handler=cmd_send)

    for name, help_text in (("inbox", "messages received"), ("outbox", "messages sent")):
        listing = commands.add_parser(name, help=help_text)
        listing.add_argument("--limit", type=positive_int, default=50, help="most recent N")
        _client_options(listing)
        listing.set_defaults(handler=cmd_list, direction=name)

    cases = commands.add_parser(
        "cases",
        help="cases: each opening message with each peer, and its lifecycle state",
        description="List the cases this node holds (newest first), or show one with its "
        "history. A case is an opening message (clue, crime transfer, evidence request, "
        "recommendation, notice) between this node and one peer.",
    )
    cases.add_argument("case_id", nargs="?", default="", help="one case, with its history")
    cases.add_argument("--state", default="", help="only cases in this state")
    cases.add_argument("--limit", type=positive_int, default=200, help="most recent N")
    _client_options(cases)
    cases.set_defaults(handler=cmd_cases)

    decide = commands.add_parser(
        "decide",
        help="record a decision on a case (e.g. accepted, needs_checking, completed)",
        description="Record a decision this agency made on a case, as its lifecycle allows "
        "(docs/workflows.md lists the events of each family). Decisions the other agency "
        "must hear about are sent instead: liandong send reply --body-type feedback with "
        '{"status": EVENT, "text": REASON}.',
    )
    decide.add_argument("case_id")
    decide.add_argument("event", help="the lifecycle event, e.g. accepted")
    decide.add_argument("--peer", default="", help="the other agency, when the case has several")
    decide.add_argument("--reason", default="", help="why (required by some events)")
    decide.add_argument("--date", default="", help="RFC 3339 new date (for a delay)")
    _client_options(decide)
    decide.set_defaults(handler=cmd_decide)

    deadlines = commands.add_parser(
        "deadlines",
        help="open legal deadlines with time left, most urgent first",
        description="Every running deadline clock on this node's cases — due soon, overdue, "
        "escalated — with the agency responsible and the time left, most urgent first.",
    )
    deadlines.add_argument("--overdue", action="store_true", help="only overdue ones")
    deadlines.add_argument("--agency", default="", help="only those this agency must meet")
    _client_options(deadlines)
    deadlines.set_defaults(handler=cmd_deadlines)

    report = commands.add_parser("report", help="reports for supervision")
    reports = report.add_subparsers(dest="report", required=True, metavar="REPORT")
    supervision = reports.add_parser(
        "supervision",
        help="filing supervision (立案监督): 应立未立, 不予立案, 应移未移",
        description="Crime transfers this node holds (the procuratorate: its copies) with no "
        "filing decision past their deadline (应立未立), most overdue first; those the "
        "police declined to file, with their reasons; and penalty records shared with this "
        "node that meet a crime threshold ([supervision.thresholds]) but were never "
        "transferred (应移未移), with the days since the penalty decision.",
    )
    supervision.add_argument(
        "--format", choices=["table", "csv", "json"], default="table", help="output format"
    )
    supervision.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("LIANDONG_CONFIG", CONFIG_FILE_NAME)),
        help="the node's node.toml (default: $LIANDONG_CONFIG or ./node.toml)",
    )
    supervision.set_defaults(handler=cmd_report_supervision, json=False)

    show = commands.add_parser("show", help="one message in full, with its deliveries")
    show.add_argument("message_id")
    _client_options(show)
    show.set_defaults(handler=cmd_show)

    handoff = commands.add_parser(
        "handoff", help="hand-offs of inbound messages to the agency's local system"
    )
    handoff_commands = handoff.add_subparsers(title="handoff commands", metavar="COMMAND")
    handoff_retry = handoff_commands.add_parser(
        "retry",
        help="offer an inbound message to the local system again, once its hand-off is fixed",
        description="A hand-off that failed [handoff] max_attempts times is not tried again "
        "(`liandong inbox` shows 'failed: ...'). Once the cause is fixed (e.g. the drop "
        "folder is writable again), this offers the message again, attempts counted anew; "
        "a message still being retried is tried at once.",
    )
    handoff_retry.add_argument("message_id")
    _client_options(handoff_retry)
    handoff_retry.set_defaults(handler=cmd_handoff_retry)

    audit = commands.add_parser(
        "audit", help="the node's audit log: signed checkpoints and proofs for auditors"
    )
    audit_commands = audit.add_subparsers(title="audit commands", metavar="COMMAND")
    checkpoint = audit_commands.add_parser(
        "checkpoint", help="print the node's latest signed checkpoint (C2SP tlog-checkpoint)"
    )
    checkpoint.add_argument(
        "--size", type=positive_int, help="the checkpoint of exactly this many entries"
    )
    _client_options(checkpoint)
    checkpoint.set_defaults(handler=cmd_audit_checkpoint)
    prove = audit_commands.add_parser(
        "prove",
        help="print an offline proof (C2SP tlog-proof) that the node logged a message",
        description="Print a C2SP tlog-proof of the first entry this node wrote about "
        'MESSAGE_ID ("received" on the receiving node, "sent" on the sender), against its '
        "latest signed checkpoint. The proof carries the entry itself as its extra data.",
    )
    prove.add_argument("message_id", nargs="?", help="a message id (UUID)")
    prove.add_argument("--index", type=int, help="prove the entry at this index instead")
    prove.add_argument("--out", type=Path, help="write the proof to this file")
    _client_options(prove)
    prove.set_defaults(handler=cmd_audit_prove)

    export = audit_commands.add_parser(
        "export",
        help="write a self-contained audit bundle of the node's log, for offline checking",
        description="Ask the running node to write an audit bundle: its log entries, the "
        "checkpoints it signed, the messages and receipts the entries name, and the "
        "federation registry and operator key needed to check them. TIMEs are RFC 3339 "
        "with a zone, e.g. 2026-11-01T00:00:00+08:00; the bundle is widened to whole "
        "checkpointed batches.",
    )
    export.add_argument("--out", type=Path, required=True, help="the bundle file to write")
    export.add_argument("--since", default="", metavar="TIME", help="entries from this time")
    export.add_argument("--until", default="", metavar="TIME", help="entries up to this time")
    _client_options(export)
    export.set_defaults(handler=cmd_audit_export)
    verify = audit_commands.add_parser(
        "verify",
        help="check audit bundles offline: signatures, tree, checkpoints, and across agencies",
        description="Check one or more audit bundles without any node: every checkpoint, "
        "envelope and receipt signature; the Merkle tree recomputed against every signed "
        "checkpoint; and, given several agencies' bundles, that every message one sent "
        "another was received with the same digest and receipt. Exits 1 on any problem.",
    )
    verify.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE")
    verify.add_argument("--json", action="store_true", help="machine-readable report")
    verify.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes checking signatures (default: one per core for large bundles; "
        "0: check in this process)",
    )
    verify.set_defaults(handler=cmd_audit_verify)

    demo = commands.add_parser(
        "demo", help="run three agencies' nodes on loopback through a full scenario"
    )
    demo.add_argument("--workdir", type=Path, help="keep every node's files here")
    demo.add_argument(
        "--speed",
        type=float,
        default=100_000.0,
        help="simulated clock: legal deadlines run N times faster (default 100000: the "
        "15 days of an urgent recommendation pass in 13 s)",
    )
    demo.set_defaults(handler=cmd_demo)
    return parser


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("LIANDONG_CONFIG", CONFIG_FILE_NAME)),
        help="the node's node.toml (default: $LIANDONG_CONFIG or ./node.toml)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


# -- operator and agency set-up ---------------------------------------------------------


def cmd_federation_init(options: argparse.Namespace) -> int:
    from node import pki

    _setup(lambda: pki.init_federation(options.dir, options.name))
    print(f"federation '{options.name}' created in {options.dir}")
    print(f"  CA certificate:      {options.dir / 'ca.crt'}   (give to every member)")
    print(f"  registry public key: {options.dir / 'operator.pub'}   (give to every member)")
    return 0


def cmd_federation_supervise(options: argparse.Namespace) -> int:
    from node import pki

    member = _setup(lambda: pki.set_supervisor(options.dir, options.agency, options.by))
    if member.supervisor:
        print(f"escalations about {member.agency_id} go to {member.supervisor}")
    else:
        print(f"{member.agency_id} has no supervisor in the registry now")
    print("publish the registry for it to take effect:")
    print(f"  liandong federation publish --dir {options.dir} --out FILE")
    return 0


def cmd_federation_auditor(options: argparse.Namespace) -> int:
    from node.pki import set_auditor

    member = _setup(lambda: set_auditor(options.dir, options.agency, options.add))
    if member.auditor:
        print(f"{member.agency_id} is an auditor: it may read every member's whole audit log")
    else:
        print(f"{member.agency_id} is no auditor: it reads only the audit entries it is a party to")
    print("publish the registry for it to take effect:")
    print(f"  liandong federation publish --dir {options.dir} --out FILE")
    return 0


def cmd_federation_add_member(options: argparse.Namespace) -> int:
    from node import pki

    cert = _setup(
        lambda: pki.add_member(options.dir, options.request, valid_days=options.valid_days)
    )
    print(f"issued TLS certificate {cert}")
    print("send it to the agency as tls.crt, then publish the registry:")
    print(f"  liandong federation publish --dir {options.dir} --out FILE")
    return 0


def cmd_federation_publish(options: argparse.Namespace) -> int:
    from node import pki

    registry = _setup(lambda: pki.publish(options.dir, options.out, valid_days=options.valid_days))
    print(
        f"registry serial {registry.serial} with {len(registry.members)} members written to "
        f"{options.out} (expires {registry.expires_at.isoformat()})"
    )
    return 0


def cmd_init(options: argparse.Namespace) -> int:
    from node import pki

    request = _setup(
        lambda: pki.init_agency(options.agency, options.endpoint, options.data_dir, options.name)
    )
    config_path = options.data_dir / CONFIG_FILE_NAME
    if not config_path.exists():
        config_path.write_text(
            render_config(
                agency=options.agency, listen=options.endpoint, database_url=options.database_url
            ),
            encoding="utf-8",
        )
    print(f"node for {options.agency} initialised in {options.data_dir}")
    print(
        f"  send {request} to the federation operator; put what comes back in {options.data_dir}:"
    )
    print("  tls.crt, ca.crt, operator.pub, registry.json; then run:")
    print(f"  liandong serve --config {config_path}")
    return 0


def _setup(action: Callable[[], T]) -> T:
    from node.pki import SetupError

    try:
        return action()
    except SetupError as error:
        raise CommandError(str(error)) from None


# -- running a node ---------------------------------------------------------------------


def cmd_serve(options: argparse.Namespace) -> int:
    from node.logging import configure_logging
    from node.runtime import Node, StartupError
    from node.server import ServerBuildError

    config = load_config(options.config)
    configure_logging(config.log_format, config.log_level)
    # Message contents are not for other users of the host; the agency's group may read
    # (its local system may run as another user in that group).
    os.umask(os.umask(0) | 0o027)  # never looser than what the service manager set
    try:
        node = Node(config)
    except StartupError as error:
        raise CommandError(str(error)) from None

    async def run() -> None:
        # Handlers first: the admin API answers while start() is still finishing, and a
        # SIGTERM in that window must still mean a graceful stop.
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        await node.start()
        await stopping.wait()
        await node.stop()

    try:
        asyncio.run(run())
    except ServerBuildError as error:
        raise CommandError(str(error)) from None
    return 0


# -- talking to a running node ----------------------------------------------------------


def _client(options: argparse.Namespace) -> AdminClient:
    config = load_config(options.config)
    return AdminClient(config.admin_socket)


def cmd_send(options: argparse.Namespace) -> int:
    try:
        body_text = options.body.read_text(encoding="utf-8")
    except OSError as error:
        raise CommandError(f"body {options.body}: {error.strerror}") from None
    try:
        json.loads(body_text)
    except json.JSONDecodeError as error:
        raise CommandError(f"body {options.body}: not valid JSON: {error}") from None
    for path in options.attach:
        if not path.is_file():
            raise CommandError(f"attachment {path}: no such file")
    with _client(options) as client:
        message_id = client.submit(
            family=CLI_FAMILIES[options.family],
            recipients=options.to,
            body_json=body_text,
            body_type=options.body_type,
            case_ref=options.case_ref,
            in_reply_to=options.in_reply_to,
            confidentiality=CONFIDENTIALITY_NAMES[options.confidentiality],
            attachment_paths=[str(p.resolve()) for p in options.attach],
            deadline=options.deadline,
            field_markings={name: CONFIDENTIALITY_NAMES[marking] for name, marking in options.mark},
        )
    if options.json:
        print(json.dumps({"message_id": message_id}))
    else:
        print(f"queued {message_id} ({options.family} to {', '.join(options.to)})")
    return 0


def _delivery_summary(item: admin_pb2.Item) -> str:
    states = [f"{d.recipient}:{d.state}" for d in item.deliveries]
    return " ".join(states)


def cmd_list(options: argparse.Namespace) -> int:
    with _client(options) as client:
        items = client.list_items(options.direction, options.limit)
    if options.json:
        print(json.dumps([_item_dict(i) for i in items], ensure_ascii=False, indent=2))
        return 0
    if not items:
        print(f"{options.direction} is empty")
        return 0
    if options.direction == "outbox":
        headers = ["created", "message id", "kind", "to", "marking", "deliveries"]
        rows = [
            [
                i.created_at[:19],
                i.message_id,
                i.body_type,
                ",".join(i.recipients),
                marking_label(i.confidentiality, i.field_markings),
                _delivery_summary(i),
            ]
            for i in items
        ]
    else:
        headers = ["received", "message id", "kind", "from", "marking", "local system"]
        rows = [
            [
                i.received_at[:19],
                i.message_id,
                i.body_type,
                i.sender,
                marking_label(i.confidentiality, i.field_markings),
                _local_system(i),
            ]
            for i in items
        ]
    print(render_table(headers, rows))
    return 0


def _as_dict(message: Message) -> dict[str, Any]:
    """A reply of the admin API in protobuf's JSON mapping, with the proto field names."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def cmd_cases(options: argparse.Namespace) -> int:
    with _client(options) as client:
        cases = client.cases(case_id=options.case_id, state=options.state, limit=options.limit)
    if options.json:
        print(json.dumps([_as_dict(c) for c in cases], ensure_ascii=False, indent=2))
        return 0
    if not cases:
        print("no cases")
        return 0
    headers = ["updated", "case id", "family", "with", "role", "state", "marking", "title"]
    rows = [
        [
            c.updated_at[:19],
            c.case_id,
            c.family,
            c.peer,
            c.role,
            c.state,
            c.confidentiality,
            c.title[:40],
        ]
        for c in cases
    ]
    print(render_table(headers, rows))
    for case in cases:
        if case.history:
            print(f"\nhistory with {case.peer}:")
            print(
                render_table(
                    ["at", "event", "from", "to", "by", "reason"],
                    [
                        [e.at[:19], e.event, e.from_state, e.to_state, e.actor, e.reason[:50]]
                        for e in case.history
                    ],
                )
            )
    return 0


def cmd_decide(options: argparse.Namespace) -> int:
    with _client(options) as client:
        case = client.decide(
            options.case_id,
            options.event,
            peer=options.peer,
            reason=options.reason,
            date=options.date,
        )
    if options.json:
        print(json.dumps(_as_dict(case), ensure_ascii=False))
    else:
        print(f"case {case.case_id} with {case.peer}: now {case.state}")
    return 0


def _time_left(seconds: int) -> str:
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    if days:
        return f"{sign}{days}d {hours}h"
    return f"{sign}{hours}h {rest // 60}m"


def cmd_deadlines(options: argparse.Namespace) -> int:
    with _client(options) as client:
        clocks = client.deadlines(overdue=options.overdue, agency=options.agency)
    if options.json:
        print(json.dumps([_as_dict(c) for c in clocks], ensure_ascii=False, indent=2))
        return 0
    if not clocks:
        print("no open deadlines" + (" overdue" if options.overdue else ""))
        return 0
    headers = ["due", "left", "state", "rule", "responsible", "case id", "with", "marking", "title"]
    rows = [
        [
            c.due_at[:19],
            _time_left(c.seconds_left),
            c.state,
            c.rule,
            c.responsible,
            c.case_id,
            c.peer,
            c.confidentiality,
            c.title[:30],
        ]
        for c in clocks
    ]
    print(render_table(headers, rows))
    return 0


SUPERVISION_COLUMNS = (
    "finding",
    "case_id",
    "transferred_by",
    "title",
    "state",
    "received_at",
    "due_at",
    "overdue_days",
    "reason",
    "decided_by",
)


def cmd_report_supervision(options: argparse.Namespace) -> int:
    with _client(options) as client:
        findings = client.supervision_report()
    rows = [{column: getattr(f, column) for column in SUPERVISION_COLUMNS} for f in findings]
    if options.format == "json":
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    elif options.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=SUPERVISION_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    elif not rows:
        print(
            "nothing to report: every transfer was decided in time, none declined, and no "
            "shared penalty record over a crime threshold is missing its transfer"
        )
    else:
        label = {
            "should_be_filed": "应立未立 overdue",
            "not_filed": "不予立案 not filed",
            "should_be_transferred": "应移未移 not transferred",
            "shared_data_error": "shared data unreadable",
        }
        print(
            render_table(
                ["finding", "case / record", "from", "state", "days late", "reason", "title"],
                [
                    [
                        label.get(r["finding"], r["finding"]),
                        r["case_id"],
                        r["transferred_by"],
                        r["state"],
                        f"{r['overdue_days']:.1f}" if r["overdue_days"] else "",
                        str(r["reason"])[:30],
                        str(r["title"])[:30],
                    ]
                    for r in rows
                ],
            )
        )
    return 0


def cmd_show(options: argparse.Namespace) -> int:
    with _client(options) as client:
        item = client.get_item(options.message_id)
    data = _item_dict(item)
    if options.json:
        print(json.dumps(data, ensure_ascii=False, indent=2))
        return 0
    print(f"message      {item.message_id}  [{item.confidentiality.upper()}]")
    for name, marking in sorted(item.field_markings.items()):
        print(f"marked       {name}: {marking.upper()}")
    if item.version_of:
        print(f"version of   {item.version_of} (redacted for {', '.join(item.recipients)})")
    print(f"direction    {item.direction}")
    print(f"family       {item.family} ({item.body_type})")
    print(f"from         {item.sender}")
    print(f"to           {', '.join(item.recipients)}")
    print(f"created      {item.created_at}")
    if item.received_at:
        print(f"received     {item.received_at}")
    if item.case_ref:
        print(f"case         {item.case_ref}")
    if item.in_reply_to:
        print(f"in reply to  {item.in_reply_to}")
    print(f"envelope     sha256:{item.envelope_sha256}")
    print("body")
    for key, value in json.loads(item.body_json).items():
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        print(f"  {key}: {shown}")
    for ref in item.attachments:
        print(f"attachment   {ref.file_name} ({ref.size} bytes, sha256:{ref.sha256.hex()})")
    for d in item.deliveries:
        line = f"delivery     {d.recipient}: {d.state}, {d.attempts} attempt(s)"
        if d.delivered_at:
            line += f", receipt at {d.delivered_at}, their log index {d.receiver_log_index}"
        if d.last_error and d.state != "delivered":
            line += f", last error: {d.last_error}"
        print(line)
    if item.handed_off and item.handoff_error and item.handed_off.startswith("failed: "):
        print(f"local system failed after {item.handoff_attempts} attempt(s), not retried")
        print(f"             last error: {item.handoff_error}")
        print(f"             once fixed: liandong handoff retry {item.message_id}")
    elif item.handed_off:
        print(f"local system {item.handed_off}")
    elif item.handoff_attempts:
        print(
            f"local system not yet: {item.handoff_attempts} attempt(s) failed, next at "
            f"{item.handoff_retry_at or 'once due'}"
        )
        print(f"             last error: {item.handoff_error}")
    return 0


def _local_system(item: admin_pb2.Item) -> str:
    """The inbox's "local system" column: the reference, "failed: ...", or a retry."""
    if item.handed_off:
        return item.handed_off
    if item.handoff_attempts:
        return f"retrying ({item.handoff_attempts} failed): {item.handoff_error[:80]}"
    return "-"


def cmd_handoff_retry(options: argparse.Namespace) -> int:
    with _client(options) as client:
        item = client.retry_hand_off(options.message_id)
    if options.json:
        print(json.dumps(_item_dict(item), ensure_ascii=False, indent=2))
    else:
        print(f"message {item.message_id} from {item.sender}: offered to the local system again")
    return 0


def _item_dict(item: admin_pb2.Item) -> dict[str, object]:
    data: dict[str, object] = _as_dict(item)
    data["body"] = json.loads(item.body_json)
    data.pop("body_json", None)
    data["attachments"] = [
        {
            "file_name": a.file_name,
            "size": a.size,
            "media_type": a.media_type,
            "sha256": a.sha256.hex(),
        }
        for a in item.attachments
    ]
    return data


def cmd_audit_checkpoint(options: argparse.Namespace) -> int:
    with _client(options) as client:
        found = client.checkpoint(options.size or 0)
    if options.json:
        data = {"size": found.size, "root": found.root.hex(), "note": found.note.decode()}
        print(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        sys.stdout.write(found.note.decode())
    return 0


def cmd_audit_prove(options: argparse.Namespace) -> int:
    if (options.message_id is None) == (options.index is None):
        raise CommandError("give either a MESSAGE_ID or --index N")
    if options.index is not None and options.index < 0:
        raise CommandError(f"--index must not be negative, not {options.index}")
    with _client(options) as client:
        proof = client.inclusion_proof(message_id=options.message_id or "", index=options.index)
    if options.out is not None:
        options.out.write_bytes(proof.tlog_proof)
        print(f"wrote {options.out}: entry {proof.index} in the checkpoint of size {proof.size}")
    elif options.json:
        data = {
            "index": proof.index,
            "size": proof.size,
            "hashes": [h.hex() for h in proof.hashes],
            "entry": proof.entry.decode(),
            "tlog_proof": proof.tlog_proof.decode(),
        }
        print(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        sys.stdout.write(proof.tlog_proof.decode())
    return 0


def cmd_audit_export(options: argparse.Namespace) -> int:
    out = options.out.resolve()
    bar = ProgressBar()
    summary = None
    with _client(options) as client:
        try:
            for update in client.export_audit(out, options.since, options.until):
                if update.finished:
                    summary = update
                else:
                    bar.update("exporting entries", update.done, update.total)
        finally:
            bar.close()
    if summary is None:
        raise CommandError("the node ended the export without a summary; see its log")
    if options.json:
        print(json.dumps(_as_dict(summary)))
    else:
        print(
            f"wrote {summary.path}: entries {summary.first_index}..{summary.end_index - 1}, "
            f"{summary.checkpoints} checkpoints, {summary.messages} messages, "
            f"{summary.size_bytes} bytes"
        )
    return 0


def cmd_audit_verify(options: argparse.Namespace) -> int:
    from node.audit.verify import render_report, verify_bundles

    for path in options.bundles:
        if not path.is_file():
            raise CommandError(f"bundle {path}: file not found")
    if options.workers is not None and options.workers < 0:
        raise CommandError(f"--workers {options.workers}: give 0 or more processes")
    bar = ProgressBar()
    try:
        report = verify_bundles(options.bundles, bar.update, workers=options.workers)
    finally:
        bar.close()
    if options.json:
        print(json.dumps(report.to_json(), ensure_ascii=False, indent=2))
    else:
        print(render_report(report))
    return 0 if report.ok else EXIT_ERROR


def cmd_demo(options: argparse.Namespace) -> int:
    from node.demo import run_demo

    if options.speed <= 0:
        raise CommandError(f"--speed {options.speed}: give a number greater than 0")
    return run_demo(options.workdir, options.speed)


if __name__ == "__main__":
    sys.exit(main())
