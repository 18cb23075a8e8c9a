"""The audit log's stored Merkle tree: grown by the writer's sequencer, read back at any size."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.audit import log as audit
from node.audit.log import AuditEvent
from node.audit.merkle import (
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_at,
    verify_consistency,
    verify_inclusion,
)
from node.audit.tree import StoredTree, TreeSequencer
from node.store.db import make_engine, session_factory, upgrade
from node.store.models import AUDIT_ENTRIES, MERKLE_NODES, NODE_STATE
from node.store.writer import Batch, BatchWriter
from tests.unit.test_merkle import naive_root

ENTRIES = 600  # past two 256-entry subtrees: stored level-4 and level-8 nodes are both used


@pytest.fixture
def sessions(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    yield session_factory(engine)
    engine.dispose()


def entry(n: int, batch: Batch) -> int:
    return audit.append(batch, AuditEvent.SENT, node="140400/ecology", detail=f"entry {n}")


def failing(batch: Batch) -> None:
    audit.append(batch, AuditEvent.SENT, node="140400/ecology", detail="rolled back")
    raise ValueError("this unit fails")


def duplicate_key(batch: Batch) -> int:
    batch.insert(NODE_STATE, {"key": "once", "value": "v"})
    return audit.append(batch, AuditEvent.SENT, node="140400/ecology", detail="keyed")


def grow(sessions: sessionmaker[Session], count: int, sequencer: TreeSequencer) -> None:
    """Append `count` entries through a writer, in batches of varying size, with failures."""

    async def scenario() -> None:
        writer = BatchWriter(sessions, sequencer=sequencer, gather_seconds=0.001)
        writer.start()
        done = 0
        size = 1
        while done < count:
            group = min(size, count - done)
            works = [lambda b, n=done + i: entry(n, b) for i in range(group)]
            works.insert(group // 2, failing)
            results = await writer.run_many(works)
            assert sum(isinstance(r, int) for r in results) == group
            done += group
            size = size * 3 % 97 + 1
        await writer.stop()

    asyncio.run(scenario())


def leaves(session: Session) -> list[bytes]:
    rows = session.execute(select(AUDIT_ENTRIES.c.entry).order_by(AUDIT_ENTRIES.c.idx))
    return [leaf_hash(raw) for (raw,) in rows]


def test_the_stored_tree_gives_every_root_and_proof(sessions) -> None:  # type: ignore[no-untyped-def]
    sequencer = TreeSequencer()
    grow(sessions, ENTRIES, sequencer)
    with sessions() as session:
        hashes = leaves(session)
        assert len(hashes) == ENTRIES
        assert sequencer.size == ENTRIES
        assert sequencer.root() == naive_root(hashes)
        # Only every 4th level is stored: a row per 16 entries, one per 256.
        stored = session.execute(select(MERKLE_NODES.c.level, MERKLE_NODES.c.idx)).all()
        assert sorted(stored) == [(4, n) for n in range(ENTRIES // 16)] + [(8, 0), (8, 1)]
        source = StoredTree(session)
        for size in (1, 2, 255, 256, 257, 511, 512, 513, ENTRIES):
            root = naive_root(hashes[:size])
            assert root_at(size, source) == root
            for index in {0, size // 3, size - 1}:
                proof = inclusion_proof(index, size, source)
                verify_inclusion(index, size, hashes[index], proof, root)
            for old in {1, size // 2 or 1, size - 1 or 1, 256}:
                if old <= size:
                    proof = consistency_proof(old, size, source)
                    verify_consistency(old, size, naive_root(hashes[:old]), root, proof)


def test_the_tree_survives_a_rolled_back_batch(sessions) -> None:  # type: ignore[no-untyped-def]
    """Two units insert the same key: the batch is retried unit by unit; the tree follows."""
    sequencer = TreeSequencer()

    async def scenario() -> None:
        writer = BatchWriter(sessions, sequencer=sequencer, gather_seconds=0.05)
        writer.start()
        await asyncio.gather(
            writer.run(lambda b: entry(0, b)),
            writer.run(duplicate_key),
            writer.run(duplicate_key),
            writer.run(lambda b: entry(3, b)),
            return_exceptions=True,
        )
        assert writer.fallbacks == 1
        await writer.stop()

    asyncio.run(scenario())
    with sessions() as session:
        hashes = leaves(session)
    assert len(hashes) == 3
    assert sequencer.root() == naive_root(hashes)


def test_a_restarted_sequencer_continues_the_tree(sessions) -> None:  # type: ignore[no-untyped-def]
    grow(sessions, 300, TreeSequencer())
    again = TreeSequencer()
    grow(sessions, 300, again)
    with sessions() as session:
        hashes = leaves(session)
        assert again.root() == naive_root(hashes)
        assert root_at(ENTRIES, StoredTree(session)) == naive_root(hashes)


def test_a_log_without_tree_nodes_gets_them_at_load(sessions) -> None:  # type: ignore[no-untyped-def]
    """Entries written before the tree existed: the sequencer fills in the nodes once."""
    grow(sessions, ENTRIES, TreeSequencer())
    with sessions() as session, session.begin():
        session.execute(delete(MERKLE_NODES))
    later = TreeSequencer()
    grow(sessions, 1, later)
    with sessions() as session:
        hashes = leaves(session)
        assert later.root() == naive_root(hashes)
        count = session.scalar(select(func.count()).select_from(MERKLE_NODES))
        assert count == ENTRIES // 16 + 2


def test_a_changed_entry_no_longer_has_a_proof(sessions) -> None:  # type: ignore[no-untyped-def]
    """The tree is built from the leaf hashes recorded when the entries were written: an entry
    changed afterwards no longer hashes to its leaf, so its proof fails (and the start-up
    check and `audit verify` name it)."""
    sequencer = TreeSequencer()
    grow(sessions, 300, sequencer)
    with sessions() as session, session.begin():
        session.execute(
            update(AUDIT_ENTRIES)
            .where(AUDIT_ENTRIES.c.idx == 270)
            .values(entry=b'{"tampered":true}')
        )
    with sessions() as session:
        tree = StoredTree(session)
        assert root_at(300, tree) == sequencer.root()
        proof = inclusion_proof(270, 300, tree)
        with pytest.raises(ProofError):
            verify_inclusion(270, 300, leaf_hash(b'{"tampered":true}'), proof, sequencer.root())
