"""Only the parties of a case move it, by every path: the node's case book on a real SQLite
file, fed the messages a procuratorate's and a police node store (as node.exchange.inbound
does), with a third agency trying each way in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node._pb.liandong.v1 import envelope_pb2
from node.exchange.cases import CaseBook
from node.exchange.deadlines import Deadlines
from node.exchange.errors import ExchangeError, Reason
from node.exchange.messages import compose_message, uuid7
from node.store.db import make_engine, session_factory, upgrade
from node.store.models import AUDIT_ENTRIES, CASES, MESSAGES, message_row
from node.store.writer import Batch, BatchWriter

ECOLOGY, POLICE, PROCURATORATE = "140400/ecology", "140400/police", "140400/procuratorate"
WATER = "140400/water"  # a member that is no party of the transfer
NOW = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    yield session_factory(engine)
    engine.dispose()


class Node:
    """One agency's case book and store, receiving messages as the receiver stores them."""

    def __init__(self, agency: str, sessions: sessionmaker[Session]) -> None:
        self.agency = agency
        self.sessions = sessions
        self.book = CaseBook(agency, Deadlines())

    def receive(self, message: envelope_pb2.Message) -> None:
        async def run() -> None:
            writer = BatchWriter(self.sessions)
            writer.start()
            try:
                await writer.run(partial(self._store, message))
            finally:
                await writer.stop()

        asyncio.run(run())

    def _store(self, message: envelope_pb2.Message, batch: Batch) -> None:
        family = "reply" if message.WhichOneof("body") == "feedback" else "crime_transfer"
        envelope = envelope_pb2.Envelope(payload=message.SerializeToString())
        batch.insert(
            MESSAGES,
            message_row(
                message_id=message.message_id,
                direction="in",
                sender=message.sender,
                recipients=json.dumps(list(message.recipients)),
                family=family,
                body_type=message.WhichOneof("body"),
                case_ref=message.case_ref,
                in_reply_to=message.in_reply_to,
                confidentiality="internal",
                created_at=NOW,
                stored_at=NOW,
                envelope=envelope.SerializeToString(),
                envelope_sha256="00" * 32,
                version_of=message.version_of or None,
            ),
        )
        if family == "reply":
            self.book.reply_received(batch, message, NOW)
        else:
            self.book.open_received(batch, message, family, "internal", NOW)

    def state(self, case_id: str, peer: str = ECOLOGY) -> str:
        with self.sessions() as session:
            return str(
                session.scalar(
                    select(CASES.c.state).where(CASES.c.case_id == case_id, CASES.c.peer == peer)
                )
            )

    def mismatches(self) -> list[dict[str, Any]]:
        with self.sessions() as session:
            rows = session.scalars(
                select(AUDIT_ENTRIES.c.entry).where(AUDIT_ENTRIES.c.event == "case_mismatch")
            ).all()
        return [json.loads(row) for row in rows]


def transfer(
    recipients: list[str], *, version_of: str = "", all_recipients: tuple[str, ...] = ()
) -> envelope_pb2.Message:
    return compose_message(
        sender=ECOLOGY,
        family="crime_transfer",
        recipients=recipients,
        body={"title": "漳河危废倾倒案", "suspected_offence": "污染环境罪"},
        body_type="",
        created_at=NOW,
        version_of=version_of,
        all_recipients=all_recipients,
    )


def feedback(sender: str, to: list[str], in_reply_to: str, status: str) -> envelope_pb2.Message:
    return compose_message(
        sender=sender,
        family="reply",
        recipients=to,
        body={"status": status, "text": "证据不足"},
        body_type="feedback",
        created_at=NOW,
        in_reply_to=in_reply_to,
    )


def test_the_police_case_moves_only_by_the_ecology_bureau_and_the_police(
    sessions: sessionmaker[Session],
) -> None:
    police = Node(POLICE, sessions)
    # The bureau sent the procuratorate the first version, the police a redacted one.
    first = uuid7()
    version = transfer([POLICE], version_of=first, all_recipients=(POLICE, PROCURATORATE))
    police.receive(version)
    case = version.message_id
    assert police.state(case) == "received"
    # The attack of the issue: a third agency answers the version_of id ...
    police.receive(feedback(WATER, [POLICE, ECOLOGY], first, "not_filed"))
    # ... or the case id itself, or the procuratorate (a co-recipient, holding a copy) does.
    police.receive(feedback(WATER, [POLICE, ECOLOGY], case, "not_filed"))
    police.receive(feedback(PROCURATORATE, [POLICE, ECOLOGY], first, "not_filed"))
    assert police.state(case) == "received"
    details = [entry["detail"] for entry in police.mismatches()]
    assert len(details) == 3
    # Each says what its sender already knows, nothing of the case (the sender can read the
    # entry: it is its peer).
    assert (
        details[0] == f"reply to {first}: {WATER} is no party of the case it names; nothing moved"
    )
    assert details[2].startswith(f"reply to {first}: {PROCURATORATE} is no party")
    assert not any(ECOLOGY in d or "crime_transfer" in d for d in details)
    # The bureau, the case's peer, moves it (the police node follows the opener's event).
    police.receive(feedback(ECOLOGY, [POLICE], case, "reconsideration_requested"))
    assert police.state(case) == "reconsideration_requested"
    assert [e["peer"] for e in police.mismatches()] == [WATER, WATER, PROCURATORATE]


def test_the_procuratorate_copy_follows_the_police_and_no_one_else(
    sessions: sessionmaker[Session],
) -> None:
    procuratorate = Node(PROCURATORATE, sessions)
    first = uuid7()  # the police's version
    copy = transfer([PROCURATORATE], version_of=first, all_recipients=(POLICE, PROCURATORATE))
    procuratorate.receive(copy)
    # A member that got no version, answering the first version and sent to the bureau too:
    procuratorate.receive(feedback(WATER, [PROCURATORATE, ECOLOGY], first, "not_filed"))
    assert procuratorate.state(copy.message_id) == "received"
    [entry] = procuratorate.mismatches()
    assert entry["peer"] == WATER and "is no party of the case it names" in entry["detail"]
    # The police, who got the first version, are followed.
    procuratorate.receive(feedback(POLICE, [ECOLOGY, PROCURATORATE], first, "filed"))
    assert procuratorate.state(copy.message_id) == "filed"


def test_a_version_without_all_recipients_follows_nobody_by_version_of(
    sessions: sessionmaker[Session],
) -> None:
    procuratorate = Node(PROCURATORATE, sessions)
    first = uuid7()
    older = transfer([PROCURATORATE], version_of=first)  # an older sender's version
    procuratorate.receive(older)
    procuratorate.receive(feedback(POLICE, [ECOLOGY, PROCURATORATE], first, "filed"))
    assert procuratorate.state(older.message_id) == "received"
    [entry] = procuratorate.mismatches()
    assert "is no party of the case it names; nothing moved" in entry["detail"]


def test_one_version_to_both_the_copy_follows_the_police_not_a_stranger(
    sessions: sessionmaker[Session],
) -> None:
    procuratorate = Node(PROCURATORATE, sessions)
    opening = transfer([POLICE, PROCURATORATE])
    procuratorate.receive(opening)
    case = opening.message_id
    procuratorate.receive(feedback(WATER, [ECOLOGY, PROCURATORATE], case, "not_filed"))
    assert procuratorate.state(case) == "received"
    procuratorate.receive(feedback(POLICE, [ECOLOGY, PROCURATORATE], case, "filed"))
    assert procuratorate.state(case) == "filed"
    assert [e["peer"] for e in procuratorate.mismatches()] == [WATER]


def test_a_case_this_node_opened_is_answered_by_its_addressee_only(
    sessions: sessionmaker[Session],
) -> None:
    ecology = Node(ECOLOGY, sessions)
    case = uuid7()
    with sessions.begin() as session:
        session.execute(
            CASES.insert().values(
                case_id=case,
                peer=POLICE,
                family="crime_transfer",
                role="opener",
                state="received",
                opened_at=NOW,
                updated_at=NOW,
            )
        )
    ecology.receive(feedback(WATER, [ECOLOGY], case, "filed"))
    assert ecology.state(case, POLICE) == "received"
    [entry] = ecology.mismatches()
    assert f"{WATER} is no party of the case it names" in entry["detail"]
    ecology.receive(feedback(POLICE, [ECOLOGY], case, "filed"))
    assert ecology.state(case, POLICE) == "filed"


def test_a_peer_reusing_the_id_of_a_case_opened_with_it_is_refused_not_a_failed_store(
    sessions: sessionmaker[Session],
) -> None:
    police = Node(POLICE, sessions)
    opening = transfer([POLICE])
    with sessions.begin() as session:  # this node once opened a case with that id
        session.execute(
            CASES.insert().values(
                case_id=opening.message_id,
                peer=ECOLOGY,
                family="crime_transfer",
                role="opener",
                state="sent",
                opened_at=NOW,
                updated_at=NOW,
            )
        )
    with pytest.raises(ExchangeError) as caught:
        police.receive(opening)
    assert caught.value.reason is Reason.INVALID
    assert "is already a case between this node and 140400/ecology" in caught.value.message
