"""Checking a stored audit log against the checkpoints its node signed.

Used at start-up (the node refuses to run on a log that does not match) and by the tests
that tamper with a real database file. It reads every entry once, in index order, rebuilds
the tree in memory (O(log n) of it at a time) and compares, at each signed checkpoint's size,
the root with the signed one; it also checks each checkpoint's signature and every stored
tree node. The first problem is reported with the entry index it concerns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.audit.checkpoint import open_checkpoint
from node.audit.merkle import Frontier, leaf_hash
from node.audit.note import NoteError, Verifier
from node.audit.tree import TILE_HEIGHT
from node.store.models import AUDIT_ENTRIES, CHECKPOINTS, MERKLE_NODES

READ_CHUNK = 5000


class LogMismatch(Exception):
    """The stored log does not match what the node signed; `index` is the first bad entry."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class CheckedLog:
    size: int
    checkpoints: int


def check_log(
    session: Session,
    verifier: Verifier,
    origin: str,
    progress: Callable[[int], None] = lambda _done: None,
) -> CheckedLog:
    """Raise LogMismatch at the first entry that disagrees with a signed checkpoint."""
    checkpoints = session.execute(
        select(CHECKPOINTS.c.size, CHECKPOINTS.c.root, CHECKPOINTS.c.note).order_by(
            CHECKPOINTS.c.size
        )
    ).all()
    for size, root, signed in checkpoints:
        try:
            checkpoint = open_checkpoint(signed, [verifier])
        except NoteError as error:
            raise LogMismatch(
                max(size - 1, 0), f"checkpoint of size {size} is not one this node signed: {error}"
            ) from None
        if (checkpoint.origin, checkpoint.size, checkpoint.root) != (origin, size, root):
            raise LogMismatch(
                max(size - 1, 0),
                f"checkpoint stored as size {size} says origin {checkpoint.origin!r}, "
                f"size {checkpoint.size}",
            )
    nodes = dict(
        ((level, index), value)
        for level, index, value in session.execute(
            select(MERKLE_NODES.c.level, MERKLE_NODES.c.idx, MERKLE_NODES.c.hash)
        )
    )
    frontier = Frontier()
    pending = iter(checkpoints)
    target = next(pending, None)
    previous = 0
    while True:
        rows = session.execute(
            select(AUDIT_ENTRIES.c.idx, AUDIT_ENTRIES.c.entry, AUDIT_ENTRIES.c.leaf_hash)
            .where(AUDIT_ENTRIES.c.idx >= frontier.size)
            .order_by(AUDIT_ENTRIES.c.idx)
            .limit(READ_CHUNK)
        ).all()
        if not rows:
            break
        for index, entry, recorded in rows:
            if index != frontier.size:
                raise LogMismatch(
                    frontier.size, f"entry {frontier.size} is missing (the next stored is {index})"
                )
            leaf = leaf_hash(entry)
            if recorded is not None and bytes(recorded) != leaf:
                raise LogMismatch(
                    index, f"entry {index} has been changed since it was written (its hash differs)"
                )
            for level, position, value in frontier.append(leaf):
                if level and level % TILE_HEIGHT == 0 and nodes.get((level, position)) != value:
                    first = position << level
                    raise LogMismatch(
                        first,
                        f"entries {first} to {first + (1 << level) - 1} do not match the stored "
                        f"tree node over them",
                    )
            while target is not None and target.size == frontier.size:
                if target.root != frontier.root():
                    raise LogMismatch(previous, _mismatch(previous, target.size))
                previous = target.size
                target = next(pending, None)
        progress(frontier.size)
    if target is not None:
        raise LogMismatch(
            frontier.size,
            f"the log has {frontier.size} entries, but this node signed a checkpoint of size "
            f"{target.size}: entries from {frontier.size} on are missing",
        )
    return CheckedLog(frontier.size, len(checkpoints))


def _mismatch(start: int, end: int) -> str:
    signed = f"the checkpoint of size {end} this node signed"
    if end - start == 1:
        return f"entry {start} does not match {signed} (the entries before it do)"
    return (
        f"entries {start} to {end - 1} do not match {signed} (the entries before them do, so "
        f"the first bad index is {start} or one of the next {end - start - 1})"
    )
