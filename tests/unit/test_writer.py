"""The group-commit writer: batches, isolation between jobs, dense audit indices."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select

from node.audit import log as audit
from node.audit.log import AuditEvent
from node.store.db import make_engine, session_factory, upgrade
from node.store.models import NODE_STATE, AuditEntryRecord, NodeStateRecord
from node.store.writer import Batch, BatchWriter, WriterStopped


@pytest.fixture
def sessions(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    yield session_factory(engine)
    engine.dispose()


def append_entry(name: str, batch: Batch) -> int:
    return audit.append(batch, AuditEvent.SENT, node="140400/ecology", detail=name)


def failing_after_append(batch: Batch) -> None:
    audit.append(batch, AuditEvent.SENT, node="140400/ecology", detail="doomed")
    batch.insert(NODE_STATE, {"key": "doomed", "value": "x"})
    raise ValueError("this unit of work fails")


def insert_state(key: str, batch: Batch) -> int:
    batch.insert(NODE_STATE, {"key": key, "value": "v"})
    return audit.append(batch, AuditEvent.SENT, node="140400/ecology", detail=key)


def test_jobs_share_batches_and_failures_stay_isolated(sessions) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> list[object]:
        writer = BatchWriter(sessions, gather_seconds=0.01)
        writer.start()
        jobs = []
        for n in range(50):
            if n % 10 == 5:
                jobs.append(writer.run(failing_after_append))
            else:
                jobs.append(writer.run(lambda s, n=n: append_entry(f"job {n}", s)))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        assert writer.batches < 50  # some jobs were committed together
        await writer.stop()
        return results

    results = asyncio.run(scenario())
    failures = [r for r in results if isinstance(r, ValueError)]
    indices = [r for r in results if isinstance(r, int)]
    assert len(failures) == 5
    # The audit log has no gap where a failed job's entry was rolled back.
    assert sorted(indices) == list(range(45))
    with sessions() as session:
        stored = session.scalars(select(AuditEntryRecord.idx).order_by(AuditEntryRecord.idx)).all()
        assert list(stored) == list(range(45))
        assert session.get(NodeStateRecord, "doomed") is None
        details = {e.fields["detail"] for e in audit.entries(session)}
        assert "doomed" not in details


def test_indices_continue_after_restart(sessions) -> None:  # type: ignore[no-untyped-def]
    async def write(count: int) -> list[int]:
        writer = BatchWriter(sessions)
        writer.start()
        indices = [await writer.run(lambda s: append_entry("x", s)) for _ in range(count)]
        await writer.stop()
        return indices

    assert asyncio.run(write(3)) == [0, 1, 2]
    assert asyncio.run(write(2)) == [3, 4]


def test_a_stopped_writer_refuses_work(sessions) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        writer = BatchWriter(sessions)
        writer.start()
        await writer.stop()
        with pytest.raises(WriterStopped):
            await writer.run(lambda s: append_entry("late", s))

    asyncio.run(scenario())


def test_audit_entries_are_canonical_bytes(sessions) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        writer = BatchWriter(sessions)
        writer.start()
        await writer.run(
            lambda s: audit.append(
                s,
                AuditEvent.RECEIVED,
                node="140400/procuratorate",
                message_id="01a2087f-397b-7d93-9e6b-dca9fcaac36a",
                peer="140400/ecology",
                detail="线索",
            )
        )
        await writer.stop()

    asyncio.run(scenario())
    with sessions() as session:
        (entry,) = audit.entries(session)
    assert entry.raw.startswith(b'{"detail":"\xe7\xba\xbf\xe7\xb4\xa2","event":"received"')
    assert b" " not in entry.raw
    assert audit.encode_entry(entry.fields) == entry.raw


def test_a_unit_that_breaks_the_batch_write_fails_alone(sessions) -> None:  # type: ignore[no-untyped-def]
    """Two units insert the same key: the batch is retried unit by unit, and only one fails."""

    async def scenario() -> list[object]:
        writer = BatchWriter(sessions, gather_seconds=0.05)
        writer.start()
        jobs = [
            writer.run(lambda b: insert_state("a", b)),
            writer.run(lambda b: insert_state("same", b)),
            writer.run(lambda b: insert_state("same", b)),
            writer.run(lambda b: insert_state("b", b)),
        ]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        assert writer.fallbacks == 1
        await writer.stop()
        return results

    results = asyncio.run(scenario())
    assert [type(r).__name__ for r in results] == ["int", "int", "IntegrityError", "int"]
    assert sorted(r for r in results if isinstance(r, int)) == [0, 1, 2]
    with sessions() as session:
        keys = session.scalars(select(NodeStateRecord.key).order_by(NodeStateRecord.key)).all()
        assert list(keys) == ["a", "b", "same"]
        assert [e.index for e in audit.entries(session)] == [0, 1, 2]
