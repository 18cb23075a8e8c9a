"""Who reads which audit entries (docs/protocol.md section 12.2): the registry's auditors
everything, another member the entries it is a party to, proofs open to all members."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from sqlalchemy.orm import Session, sessionmaker

from node.audit import log as audit
from node.audit.checkpoint import log_origin
from node.audit.log import AuditEvent
from node.audit.note import parse_vkey, vkey
from node.audit.proof import verify_proof
from node.audit.service import AuditLog, is_party
from node.audit.tree import TreeSequencer
from node.envelope import sign_note
from node.exchange.context import NodeContext
from node.exchange.errors import ExchangeError, Reason
from node.federation import Registry
from node.identity import agency_slug
from node.pki import SetupError, add_member, init_agency, init_federation, publish, set_auditor
from node.store.db import make_engine, session_factory, upgrade
from node.store.writer import Batch, BatchWriter
from tests.unit.test_federation import new_key, registry

NODE = "140400/procuratorate"
ECOLOGY, POLICE, DISCIPLINE = "140400/ecology", "140400/police", "140400/discipline"
SENT_ID = "01a2087f-397b-7d93-9e6b-dca9fcaac36a"  # to ecology and police
RECEIVED_ID = "01a2087f-397b-7d93-9e6b-dca9fcaac36b"  # from ecology


class Context:
    """What AuditLog asks of the node: its agency and the registry in force."""

    def __init__(self, reg: Registry) -> None:
        self.agency = NODE
        self.registry = reg

    def usable_registry(self, now: datetime) -> Registry:
        return self.registry


def federation(*auditors: str) -> Registry:
    base = registry()
    members = tuple(replace(m, auditor=m.agency_id in auditors) for m in base.members)
    discipline = replace(base.members[0], agency_id=DISCIPLINE, auditor=DISCIPLINE in auditors)
    return replace(base, members=(*members, discipline))


# Written in this order; the index of each is its position here.
EVENTS: list[tuple[str, Callable[[Batch], int]]] = [
    ("registry", lambda b: audit.append(b, AuditEvent.REGISTRY_ACCEPTED, node=NODE, detail="s=1")),
    (
        "sent",
        lambda b: audit.append(
            b, AuditEvent.SENT, node=NODE, message_id=SENT_ID, peer=f"{ECOLOGY},{POLICE}"
        ),
    ),
    (
        "police receipt",
        lambda b: audit.append(
            b, AuditEvent.RECEIPT_RECEIVED, node=NODE, message_id=SENT_ID, peer=POLICE
        ),
    ),
    (
        "received",
        lambda b: audit.append(
            b, AuditEvent.RECEIVED, node=NODE, message_id=RECEIVED_ID, peer=ECOLOGY
        ),
    ),
    (
        "handed off",
        lambda b: audit.append(
            b,
            AuditEvent.HANDED_OFF,
            node=NODE,
            message_id=RECEIVED_ID,
            detail="/srv/liandong/inbound/01a2087f.json",
        ),
    ),
    (
        "police deadline",
        lambda b: audit.append(
            b, AuditEvent.DEADLINE_OVERDUE, node=NODE, message_id=SENT_ID, peer=POLICE
        ),
    ),
    (
        "police query",
        lambda b: audit.append(b, AuditEvent.AUDIT_QUERY, node=NODE, peer=POLICE, detail="q"),
    ),
    (
        "refused",
        lambda b: audit.append(b, AuditEvent.REJECTED, node=NODE, peer=ECOLOGY, detail="bad"),
    ),
]
INDEX = {name: n for n, (name, _) in enumerate(EVENTS)}
SEEN_BY = {
    ECOLOGY: {"sent", "received", "refused"},
    POLICE: {"sent", "police receipt", "police deadline", "police query"},
    DISCIPLINE: set(),
}


@pytest.fixture
def sessions(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def signed_log(sessions: sessionmaker[Session]) -> tuple[BatchWriter, Any]:
    """The entries above, one batch each, with a checkpoint signed after each."""
    key = new_key()
    origin = log_origin("changzhi", NODE)
    sequencer = TreeSequencer(origin, lambda text: sign_note(text, origin, key))
    writer = BatchWriter(sessions, sequencer=sequencer)

    async def write() -> None:
        writer.start()
        for _, event in EVENTS:
            await writer.run(event)
        await writer.stop()

    asyncio.run(write())
    return writer, parse_vkey(vkey(origin, key.public_bytes()))


def audit_log(sessions: sessionmaker[Session], writer: BatchWriter, *auditors: str) -> AuditLog:
    return AuditLog(cast(NodeContext, Context(federation(*auditors))), sessions, writer)


def test_is_party() -> None:
    def entry(**fields: str) -> bytes:
        return orjson.dumps({"v": 1, "node": NODE, **fields})

    assert is_party(POLICE, entry(event="received", peer=POLICE))
    assert is_party(POLICE, entry(event="sent", peer=f"{ECOLOGY},{POLICE}"))
    assert not is_party(POLICE, entry(event="sent", peer=f"{ECOLOGY},{POLICE}/xingzhen"))
    assert not is_party(POLICE, entry(event="received", peer=f"{POLICE}/xingzhen"))
    assert not is_party(POLICE, entry(event="registry_accepted"))
    # The agency's own system is no member's business, even if an entry named a peer.
    for local in ("handed_off", "hand_off_withheld", "hand_off_failed", "inbound_declined"):
        assert not is_party(POLICE, entry(event=local, peer=POLICE))
    assert not is_party(POLICE, b"")
    assert not is_party(POLICE, b"not json")
    assert not is_party(POLICE, b'["peer"]')
    assert not is_party(POLICE, orjson.dumps({"event": "received", "peer": [POLICE]}))


def test_entries_are_served_where_the_member_is_a_party(
    sessions: sessionmaker[Session], signed_log: tuple[BatchWriter, Any]
) -> None:
    writer, _ = signed_log
    log = audit_log(sessions, writer)
    everything = log.entries(0, 100, reader=None)  # the node's own operator
    assert len(everything) == len(EVENTS) and all(everything)
    for reader, seen in SEEN_BY.items():
        answer = log.entries(0, 100, reader=reader)
        # Dense: one item per index, empty bytes (which no entry is) where it may not look.
        assert len(answer) == len(EVENTS)
        assert {name for name, n in INDEX.items() if answer[n]} == seen, reader
        assert all(a in (b"", e) for a, e in zip(answer, everything, strict=True))
    assert log.entries(3, 2, reader=ECOLOGY) == [everything[3], b""]
    # An auditor reads the whole log; with the next registry that names it no more, not.
    assert audit_log(sessions, writer, DISCIPLINE).entries(0, 100, reader=DISCIPLINE) == (
        everything
    )
    assert audit_log(sessions, writer, POLICE).entries(0, 100, reader=DISCIPLINE) == [b""] * len(
        EVENTS
    )


def test_proofs_are_open_to_members_and_entries_to_parties(
    sessions: sessionmaker[Session], signed_log: tuple[BatchWriter, Any]
) -> None:
    writer, verifier = signed_log
    log = audit_log(sessions, writer, DISCIPLINE)
    received = log.entries(INDEX["received"], 1, reader=None)[0]

    mine = log.prove_inclusion(reader=ECOLOGY, message_id=RECEIVED_ID)
    assert (mine.index, mine.entry) == (INDEX["received"], received)
    verify_proof(mine, verifier)
    assert log.prove_inclusion(reader=POLICE, message_id=SENT_ID).index == INDEX["sent"]

    # Not a party: by index, the proof without the entry (no `extra` line); it still proves
    # the entry to whoever holds it.
    theirs = log.prove_inclusion(reader=POLICE, index=INDEX["received"])
    assert theirs.entry is None
    assert b"\nextra " not in theirs.text()
    assert theirs.hashes == mine.hashes
    verify_proof(theirs, verifier, entry=received)
    assert log.prove_inclusion(reader=ECOLOGY, index=INDEX["handed off"]).entry is None
    # By message id, not a party is told what an unknown message gets: nothing to find.
    answers = []
    for message_id in (RECEIVED_ID, "01a2087f-397b-7d93-9e6b-dca9fcaac36c"):
        with pytest.raises(ExchangeError) as refused:
            log.prove_inclusion(reader=POLICE, message_id=message_id)
        assert refused.value.reason is Reason.NOT_FOUND
        answers.append(refused.value.message.replace(message_id, "X"))
    assert (
        answers[0]
        == answers[1]
        == (f"no message X that {POLICE} is a party to was sent or received by this node")
    )
    # The auditor and the node's own operator get the entry wherever they ask.
    for reader in (DISCIPLINE, None):
        by_id = log.prove_inclusion(reader=reader, message_id=RECEIVED_ID)
        assert by_id.entry == received
        handed_off = log.prove_inclusion(reader=reader, index=INDEX["handed off"])
        assert b"/srv/liandong/inbound" in (handed_off.entry or b"")


# -- the operator names auditors ---------------------------------------------------------


def test_the_operator_names_and_unnames_auditors(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    init_federation(fed, "Changzhi")
    for agency in (ECOLOGY, DISCIPLINE):
        add_member(fed, init_agency(agency, "10.1.2.3:7443", tmp_path / agency_slug(agency)))
    assert set_auditor(fed, DISCIPLINE, True).auditor
    reg = publish(fed, tmp_path / "r.json")
    assert reg.auditors == (DISCIPLINE,)
    with pytest.raises(SetupError, match=r"'140400/court' is not a member of the federation"):
        set_auditor(fed, "140400/court", True)
    assert not set_auditor(fed, DISCIPLINE, False).auditor
    assert publish(fed, tmp_path / "r.json").auditors == ()


def test_re_enrolling_keeps_the_auditor(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    init_federation(fed, "Changzhi")
    add_member(fed, init_agency(DISCIPLINE, "10.1.2.3:7443", tmp_path / "first"))
    set_auditor(fed, DISCIPLINE, True)
    add_member(fed, init_agency(DISCIPLINE, "10.1.2.4:7443", tmp_path / "again"))
    assert publish(fed, tmp_path / "r.json", now=datetime.now(UTC)).auditors == (DISCIPLINE,)
