"""The case-change feed on a real SQLite file: each plugin keeps its own place, a failing
plugin is offered its changes again without holding back the others, and a restart resumes
where each plugin was."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node._pb.liandong.v1 import envelope_pb2
from node.exchange import case_changes
from node.exchange.case_changes import CaseChangeFeed, reported_key
from node.plugin_api import CaseChange
from node.store.db import make_engine, session_factory, upgrade
from node.store.models import CASE_EVENTS, CASES, MESSAGES, NODE_STATE
from node.store.writer import BatchWriter
from tests.conftest import wait_for

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    with session_factory(engine).begin() as session:
        session.execute(
            CASES.insert().values(
                case_id="case-1",
                peer="140400/police",
                family="crime_transfer",
                role="opener",
                state="sent",
                opened_at=NOW,
                updated_at=NOW,
            )
        )
    yield session_factory(engine)
    engine.dispose()


def record_changes(sessions: sessionmaker[Session], count: int) -> None:
    with sessions.begin() as session:
        session.execute(
            CASE_EVENTS.insert(),
            [
                {
                    "case_id": "case-1",
                    "peer": "140400/police",
                    "event": "status",
                    "from_state": "filed",
                    "to_state": "filed",
                    "actor": "140400/police",
                    "at": NOW,
                }
                for _ in range(count)
            ],
        )


def cursors(sessions: sessionmaker[Session]) -> dict[str, str]:
    with sessions() as session:
        rows = session.execute(select(NODE_STATE.c.key, NODE_STATE.c.value))
        return {key: value for key, value in rows}


class Feed:
    """A feed running in its own thread's event loop, as the node runs it."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        notify: Callable[[str, Sequence[CaseChange]], None],
        watchers: Sequence[str],
    ) -> None:
        self.sessions = sessions
        self.notify = notify
        self.watchers = watchers

    def run_until(self, condition: Callable[[], bool]) -> None:
        async def scenario() -> None:
            writer = BatchWriter(self.sessions, gather_seconds=0.001)
            writer.start()
            feed = CaseChangeFeed(
                writer, self.sessions, self.watchers, self.notify, poll_seconds=0.02
            )
            task = asyncio.create_task(feed.run())
            await asyncio.to_thread(wait_for, condition, 30.0, "the plugins to be told")
            feed.stop()
            await task
            await writer.stop()

        asyncio.run(scenario())


def test_each_plugin_keeps_its_place_and_a_failing_one_is_offered_its_changes_again(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(case_changes, "GROUP", 4)  # several groups from a few rows
    record_changes(sessions, 3)  # before anyone watched: not news
    told: dict[str, list[int]] = {"drop folder": [], "case system": []}
    failures = {"case system": 2}

    def notify(plugin: str, changes: Sequence[CaseChange]) -> None:
        if failures.get(plugin, 0) > 0:
            failures[plugin] -= 1
            raise OSError("case system down")
        told[plugin].extend(change.sequence for change in changes)

    feed = Feed(sessions, notify, list(told))
    feed.run_until(lambda: cursors(sessions).keys() >= {reported_key(p) for p in told})
    assert told == {"drop folder": [], "case system": []}

    record_changes(sessions, 10)
    feed.run_until(lambda: all(len(seen) == 10 for seen in told.values()))
    # In order, each once: the failed groups came again, nothing was skipped.
    assert told["drop folder"] == told["case system"] == list(range(4, 14))
    assert failures["case system"] == 0
    assert cursors(sessions)[reported_key("case system")] == "13"

    # A plugin enabled later starts at the newest change; the others resume where they were.
    record_changes(sessions, 2)
    told["new adapter"] = []
    feed = Feed(sessions, notify, list(told))
    feed.run_until(lambda: len(told["case system"]) == 12)
    record_changes(sessions, 1)
    feed.run_until(lambda: len(told["new adapter"]) == 1)
    assert told["case system"] == told["drop folder"] == list(range(4, 17))
    assert told["new adapter"] == [16]


def test_a_reason_marked_above_the_case_is_left_out(sessions: sessionmaker[Session]) -> None:
    """The case is internal: an answer marked confidential, or whose text is, must not hand
    its reason to a plugin that shows the case to systems cleared for internal."""
    confidential = envelope_pb2.CONFIDENTIALITY_CONFIDENTIAL
    answers = {
        "plain": envelope_pb2.Message(confidentiality=envelope_pb2.CONFIDENTIALITY_INTERNAL),
        "marked": envelope_pb2.Message(confidentiality=confidential),
        "text-marked": envelope_pb2.Message(
            confidentiality=envelope_pb2.CONFIDENTIALITY_INTERNAL,
            field_markings=[envelope_pb2.FieldMarking(field="text", confidentiality=confidential)],
        ),
    }
    with sessions.begin() as session:
        for message_id, message in answers.items():
            message.feedback.text = f"reason {message_id}"
            envelope = envelope_pb2.Envelope(payload=message.SerializeToString())
            session.execute(
                MESSAGES.insert().values(
                    message_id=message_id,
                    direction="in",
                    sender="140400/police",
                    recipients="[]",
                    family="reply",
                    body_type="feedback",
                    confidentiality="internal",
                    created_at=NOW,
                    stored_at=NOW,
                    envelope=envelope.SerializeToString(),
                    envelope_sha256="",
                )
            )
            session.execute(
                CASE_EVENTS.insert().values(
                    case_id="case-1",
                    peer="140400/police",
                    event="not_filed",
                    from_state="received",
                    to_state="not_filed",
                    actor="140400/police",
                    message_id=message_id,
                    reason=f"reason {message_id}",
                    at=NOW,
                )
            )
    feed = CaseChangeFeed(BatchWriter(sessions), sessions, ["adapter"], lambda *_: None)
    reasons = {c.message_id: c.reason for c in feed.changes_after(0)}
    assert reasons == {"plain": "reason plain", "marked": "", "text-marked": ""}
