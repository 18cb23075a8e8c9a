"""The hand-off worker on a real SQLite file and a real drop folder that cannot be written:
a failing hand-off backs off, ends in a recorded, audited failure instead of an endless
retry, and is handed off once re-offered after the folder is fixed."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node._pb.liandong.v1 import envelope_pb2
from node.config import ConfigError, HandOff, load_config
from node.exchange import queries
from node.exchange.attachments import BlobStore
from node.exchange.errors import ExchangeError, Reason
from node.exchange.handoff import FAILED, HandOffWorker, is_failed, reoffer
from node.exchange.messages import compose_message
from node.plugin_api import HandOffWithheld, InboundItem
from node.store.db import make_engine, session_factory, upgrade
from node.store.models import AUDIT_ENTRIES, MESSAGES, message_row
from node.store.writer import BatchWriter
from plugins.dropfolder import DropFolder
from tests.conftest import wait_for

AGENCY = "140400/procuratorate"
NOW = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    yield session_factory(engine)
    engine.dispose()


def store_inbound(sessions: sessionmaker[Session], title: str) -> str:
    message = compose_message(
        sender="140400/ecology",
        family="clue",
        recipients=[AGENCY],
        body={"title": title},
        body_type="",
        created_at=NOW,
    )
    envelope = envelope_pb2.Envelope(payload=message.SerializeToString())
    with sessions.begin() as session:
        session.execute(
            MESSAGES.insert(),
            [
                message_row(
                    message_id=message.message_id,
                    direction="in",
                    sender=message.sender,
                    recipients=json.dumps([AGENCY]),
                    family="clue",
                    body_type="clue",
                    confidentiality="internal",
                    created_at=NOW,
                    stored_at=NOW,
                    envelope=envelope.SerializeToString(),
                    envelope_sha256="ab" * 32,
                )
            ],
        )
    return message.message_id


def row(sessions: sessionmaker[Session], message_id: str) -> Any:
    with sessions() as session:
        return session.execute(
            select(
                MESSAGES.c.handed_off,
                MESSAGES.c.handoff_attempts,
                MESSAGES.c.handoff_error,
                MESSAGES.c.handoff_retry_at,
            ).where(MESSAGES.c.message_id == message_id)
        ).one()


def audit_entries(sessions: sessionmaker[Session], event: str) -> list[dict[str, Any]]:
    with sessions() as session:
        rows = session.scalars(
            select(AUDIT_ENTRIES.c.entry).where(AUDIT_ENTRIES.c.event == event)
        ).all()
    return [json.loads(entry) for entry in rows]


class Running:
    """A worker (and its writer) running in an event loop of its own thread."""

    def __init__(self, worker: HandOffWorker, writer: BatchWriter) -> None:
        self.worker, self.writer = worker, writer
        self.loop = asyncio.new_event_loop()

    def __enter__(self) -> Running:
        async def main() -> None:
            self.writer.start()
            try:
                await self.worker.run()
            finally:
                await self.writer.stop()

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),))
        self.thread.start()
        return self

    def call(self, work: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(10)

    def __exit__(self, *_exc: object) -> None:
        self.loop.call_soon_threadsafe(self.worker.stop)
        self.thread.join(10)
        self.loop.close()


def test_a_hand_off_that_keeps_failing_backs_off_then_fails_for_good_until_reoffered(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    folder = DropFolder(tmp_path / "local")
    folder.ensure_folders()
    # The drop folder cannot be written: its inbound folder is a file.
    shutil.rmtree(folder.inbound)
    folder.inbound.write_text("not a folder")
    calls: list[datetime] = []

    def hand_off(item: InboundItem) -> str:
        calls.append(datetime.now(UTC))
        return str(folder.write_inbound(item))

    blobs = BlobStore(tmp_path / "blobs")
    writer = BatchWriter(sessions)
    settings = HandOff(max_attempts=4, retry_seconds=0.1, max_backoff_seconds=0.3)
    worker = HandOffWorker(AGENCY, writer, sessions, blobs, hand_off, settings)
    assert [worker.delay(n) for n in (1, 2, 3, 4, 70)] == [0.1, 0.2, 0.3, 0.3, 0.3]
    failing = store_inbound(sessions, "线索一")
    with Running(worker, writer) as running:
        wait_for(lambda: row(sessions, failing).handed_off is not None, 20, "the final failure")
        final = row(sessions, failing)
        assert final.handed_off.startswith(FAILED) and "NotADirectoryError" in final.handed_off
        assert final.handoff_attempts == 4 and final.handoff_retry_at is None
        assert is_failed(final.handed_off, final.handoff_error)
        # It backed off between attempts, and was not tried again once failed.
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(calls)]
        assert len(calls) == 4 and gaps[1] >= 0.15 and gaps[2] >= 0.25, gaps
        [entry] = audit_entries(sessions, "hand_off_failed")
        assert entry["message_id"] == failing and "peer" not in entry
        assert entry["detail"].startswith("after 4 attempts: NotADirectoryError")
        # What `liandong inbox` and `show` read.
        with sessions() as session:
            [view] = queries.list_items(session, "in", 10)
        assert view.handoff_attempts == 4 and view.handed_off == final.handed_off
        time.sleep(0.5)
        assert len(calls) == 4

        # Fixed, and re-offered: handed off, the error cleared, the attempts kept.
        folder.inbound.unlink()
        folder.inbound.mkdir()
        running.call(writer.run(partial(reoffer, failing)))
        running.loop.call_soon_threadsafe(worker.poll)
        wait_for(
            lambda: (row(sessions, failing).handed_off or "").endswith(".json"),
            10,
            "the hand-off after the re-offer",
        )
        done = row(sessions, failing)
        assert done.handoff_error == "" and done.handoff_retry_at is None
        assert json.loads(Path(done.handed_off).read_text("utf-8"))["message_id"] == failing
        assert [e["message_id"] for e in audit_entries(sessions, "handed_off")] == [failing]

        # A message handed off is not re-offered; an unknown one is not found.
        with pytest.raises(ExchangeError) as caught:
            running.call(writer.run(partial(reoffer, failing)))
        assert caught.value.reason is Reason.PRECONDITION
        with pytest.raises(ExchangeError) as caught:
            running.call(writer.run(partial(reoffer, "01a2087f-397b-7d93-9e6b-dca9fcaac36a")))
        assert caught.value.reason is Reason.NOT_FOUND


def test_one_failing_message_waits_while_the_others_are_handed_off(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    bad = store_inbound(sessions, "坏")
    good = [store_inbound(sessions, f"好{n}") for n in range(3)]

    def hand_off(item: InboundItem) -> str:
        if item.message_id == bad:
            raise OSError(36, "File name too long\x00")  # a NUL must not fail the record
        if item.body["title"] == "好2":
            raise HandOffWithheld("not cleared")
        return f"ref-{item.message_id}"

    writer = BatchWriter(sessions)
    settings = HandOff(max_attempts=10, retry_seconds=0.05, max_backoff_seconds=3600)
    worker = HandOffWorker(
        AGENCY, writer, sessions, BlobStore(tmp_path / "blobs"), hand_off, settings
    )
    with Running(worker, writer) as running:
        wait_for(lambda: row(sessions, bad).handoff_attempts >= 3, 20, "three failed attempts")
        pending = row(sessions, bad)
        assert pending.handed_off is None
        assert pending.handoff_error == "OSError: [Errno 36] File name too long\\x00"
        assert pending.handoff_retry_at > datetime.now(UTC) - timedelta(seconds=1)
        assert [row(sessions, m).handed_off for m in good[:2]] == [f"ref-{m}" for m in good[:2]]
        withheld = row(sessions, good[2])
        assert withheld.handed_off == "withheld: not cleared"
        assert not is_failed(withheld.handed_off, withheld.handoff_error)
        with pytest.raises(ExchangeError) as caught:
            running.call(writer.run(partial(reoffer, good[2])))
        assert caught.value.reason is Reason.PRECONDITION


def test_the_hand_off_retries_are_read_and_checked(tmp_path: Path) -> None:
    base = '[node]\nagency = "140400/ecology"\nlisten = "h:1"\n'
    defaults = load_config(write_config(tmp_path, base)).handoff
    assert (defaults.max_attempts, defaults.retry_seconds, defaults.max_backoff_seconds) == (
        10,
        5.0,
        900.0,
    )
    text = base + "[handoff]\nmax_attempts = 3\nretry_seconds = 0.5\nmax_backoff_seconds = 60\n"
    handoff = load_config(write_config(tmp_path, text)).handoff
    assert (handoff.max_attempts, handoff.retry_seconds, handoff.max_backoff_seconds) == (
        3,
        0.5,
        60.0,
    )
    for key in ("max_attempts", "retry_seconds"):
        with pytest.raises(ConfigError, match=re.escape(f"'handoff.{key}' must be at least 1")):
            load_config(write_config(tmp_path, base + f"[handoff]\n{key} = 0\n"))
    with pytest.raises(ConfigError, match=re.escape("unknown key 'handoff.attempts'")):
        load_config(write_config(tmp_path, base + "[handoff]\nattempts = 3\n"))


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text, encoding="utf-8")
    return path
