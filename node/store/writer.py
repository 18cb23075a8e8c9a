"""Group commit: one writer thread applies queued units of work in shared transactions.

Every durable change of the node goes through :class:`BatchWriter`. Callers hand
it a function of a :class:`Batch` (``run``), or a list of them (``run_many``: a
stream's worth of messages, one queue entry and one wake-up for all); the writer
gathers what is queued (waiting a moment for more when there is load), runs
every function, writes what they queued with one ``executemany`` per table and
statement shape, commits once, and only then resolves the callers' awaits. A
caller that has its result therefore knows its change is durable.

Units of work read through ``batch.session`` and write only through
``batch.insert`` / ``batch.update``, so a unit that raises is undone in memory
(its queued rows are dropped) without a SAVEPOINT. Reads do not see rows queued
by earlier units of the same batch; every check-then-insert is therefore backed
by a unique constraint, and when the batch's writes fail as a whole (say, two
units inserted the same message id) the writer rolls back and runs each unit
again alone, in its own transaction, where the check sees the other's row.
Units must therefore be pure functions of the batch: no side effects elsewhere.

The writer is also the audit log's sequencer: it is the only place audit indices
are assigned (see node.audit.log), densely and in commit order, and its
``sequencer`` (node.audit.tree.TreeSequencer) hashes each batch's entries into the
Merkle tree inside the same transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog
from sqlalchemy import Table, and_, bindparam, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.store.models import AuditEntryRecord

T = TypeVar("T")
log = structlog.get_logger(__name__)


_ABSENT = object()


class WriterStopped(RuntimeError):
    pass


class Batch:
    """What a unit of work gets: a session to read, and queues to write."""

    def __init__(self, session: Session, next_audit_index: int, *, isolated: bool) -> None:
        self.session = session
        self.next_audit_index = next_audit_index
        # True when this unit runs alone (the retry after a failed shared write): a unit that
        # skips a check-before-insert for speed must make it here.
        self.isolated = isolated
        # Audit entries whose inclusion proof the unit wants once committed (the sequencer
        # makes them; a failed unit's request is harmless: nobody asks for its proof).
        self.proof_requests: list[int] = []
        # What units of this batch changed that a later unit must read (the queued writes
        # are not in the session yet): key -> value, and the values they replaced, so a
        # failed unit's are undone with it.
        self._overlay: dict[Any, Any] = {}
        self._overlay_undo: list[tuple[Any, Any]] = []
        self._inserts: dict[Table, list[dict[str, Any]]] = {}
        self._updates: dict[
            tuple[Table, tuple[str, ...], tuple[str, ...]], list[dict[str, Any]]
        ] = {}

    def insert(self, table: Table, row: dict[str, Any]) -> None:
        self._inserts.setdefault(table, []).append(row)

    def queued_rows(self, table: Table) -> list[dict[str, Any]]:
        """The rows queued for insertion into `table` so far (for the sequencer)."""
        return list(self._inserts.get(table, ()))

    def update(self, table: Table, where: dict[str, Any], values: dict[str, Any]) -> None:
        """UPDATE table SET values WHERE every `where` column equals its value."""
        key = (table, tuple(sorted(where)), tuple(sorted(values)))
        params = {f"w_{k}": v for k, v in where.items()} | {f"v_{k}": v for k, v in values.items()}
        self._updates.setdefault(key, []).append(params)

    def remember(self, key: Any, value: Any) -> None:
        """Note a value a later unit in this batch reads with recall() (e.g. a case's state)."""
        self._overlay_undo.append((key, self._overlay.get(key, _ABSENT)))
        self._overlay[key] = value

    def recall(self, key: Any) -> Any | None:
        return self._overlay.get(key)

    def take_audit_index(self) -> int:
        index = self.next_audit_index
        self.next_audit_index += 1
        return index

    def _queues(self) -> list[tuple[Any, list[dict[str, Any]]]]:
        return [*self._inserts.items(), *self._updates.items()]

    def mark(self) -> tuple[int, int, dict[Any, int]]:
        """Where the queues stand, so a failed unit of work can be undone in memory."""
        sizes = {key: len(rows) for key, rows in self._queues()}
        return self.next_audit_index, len(self._overlay_undo), sizes

    def undo_to(self, mark: tuple[int, int, dict[Any, int]]) -> None:
        self.next_audit_index, overlay, sizes = mark
        while len(self._overlay_undo) > overlay:
            key, previous = self._overlay_undo.pop()
            if previous is _ABSENT:
                del self._overlay[key]
            else:
                self._overlay[key] = previous
        for key, rows in self._queues():
            del rows[sizes.get(key, 0) :]

    def write(self) -> None:
        """Execute the queued writes: inserts in dependency order, then updates."""
        for table in sorted(self._inserts, key=_table_order):
            rows = self._inserts[table]
            if rows:
                self.session.execute(insert(table), rows)
        for (table, where, values), params in self._updates.items():
            if not params:
                continue
            statement = (
                update(table)
                .where(and_(*(table.c[k] == bindparam(f"w_{k}") for k in where)))
                .values({k: bindparam(f"v_{k}") for k in values})
            )
            self.session.connection().execute(statement, params)


@functools.cache
def _table_order(table: Table) -> int:
    return list(table.metadata.sorted_tables).index(table)


@dataclass
class _Job:
    work: Callable[[Batch], Any]
    result: Any = None
    error: Exception | None = None


@dataclass
class _Ticket:
    """What one caller queued: its units of work, answered together once committed."""

    jobs: list[_Job]
    future: asyncio.Future[list[_Job]]


class Sequencer(Protocol):
    """Extends each batch before it is written, in its transaction (the audit log's tree)."""

    def integrate(self, batch: Batch) -> None:
        """Called after the batch's units ran and before its writes; may queue more rows."""

    def committed(self) -> None:
        """The batch last integrated was committed."""

    def rolled_back(self) -> None:
        """The batch last integrated was not committed."""


class BatchWriter:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        max_batch: int = 500,
        gather_seconds: float = 0.002,
        sequencer: Sequencer | None = None,
    ) -> None:
        self._sessions = sessions
        self._sequencer = sequencer
        self._max_batch = max_batch
        self._gather_seconds = gather_seconds
        self._queue: asyncio.Queue[_Ticket | None] = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="writer")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._next_index: int | None = None
        self.batches = 0
        self.jobs = 0
        self.fallbacks = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batch-writer")

    async def stop(self) -> None:
        """Finish everything queued so far, then stop."""
        if self._task is None:
            return
        self._closed = True  # nothing is queued behind the stop marker
        await self._queue.put(None)
        await self._task
        self._task = None
        self._executor.shutdown(wait=True)

    async def run(self, work: Callable[[Batch], T]) -> T:
        """Apply `work` in the next batch; return its result once committed."""
        [outcome] = await self.run_many([work])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def run_many(self, works: Sequence[Callable[[Batch], T]]) -> list[T | Exception]:
        """Apply each unit of `works` in the next batch; once committed, return each unit's
        result, or the exception it raised, in order. Units stay independent: one that raises
        is undone without touching the others."""
        if self._task is None or self._closed:
            raise WriterStopped("the node is shutting down; try again when it is back")
        if not works:
            return []
        ticket = _Ticket([_Job(work) for work in works], asyncio.get_running_loop().create_future())
        self._queue.put_nowait(ticket)
        jobs = await ticket.future
        return [job.error if job.error is not None else job.result for job in jobs]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            tickets = [first]
            units = len(first.jobs)
            deadline = loop.time() + self._gather_seconds
            while units < self._max_batch:
                try:
                    ticket = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    if loop.time() >= deadline:
                        break
                    await asyncio.sleep(self._gather_seconds / 4)
                    continue
                if ticket is None:
                    stopping = True
                    break
                tickets.append(ticket)
                units += len(ticket.jobs)
            batch = [job for ticket in tickets for job in ticket.jobs]
            try:
                await loop.run_in_executor(self._executor, self._commit, batch)
            except Exception as error:  # the commit itself failed: nobody's change is durable
                log.error("batch commit failed", error=str(error), jobs=len(batch))
                self._next_index = None
                for job in batch:
                    job.error = error
            for ticket in tickets:
                if not ticket.future.done():  # else the caller went away (cancelled RPC)
                    ticket.future.set_result(ticket.jobs)
        # Fail whatever raced in behind the stop marker.
        while not self._queue.empty():
            ticket = self._queue.get_nowait()
            if ticket is not None and not ticket.future.done():
                ticket.future.set_exception(WriterStopped("the node is shutting down"))

    def _commit(self, jobs: list[_Job]) -> None:
        try:
            self._transaction(jobs)
        except Exception as error:
            if len(jobs) == 1:
                raise
            # One unit's write broke the batch (e.g. a duplicate raced in): isolate them.
            log.info("batch write failed; retrying its units one by one", error=str(error))
            self._next_index = None
            self.fallbacks += 1
            for job in jobs:
                job.result, job.error = None, None
                try:
                    self._transaction([job])
                except Exception as single_error:
                    self._next_index = None
                    job.error = single_error
        self.batches += 1
        self.jobs += len(jobs)

    def _transaction(self, jobs: list[_Job]) -> None:
        try:
            with self._sessions() as session, session.begin():
                if self._next_index is None:
                    last = session.scalar(select(func.max(AuditEntryRecord.idx)))
                    self._next_index = 0 if last is None else last + 1
                batch = Batch(session, self._next_index, isolated=len(jobs) == 1)
                for job in jobs:
                    mark = batch.mark()
                    try:
                        job.result = job.work(batch)
                    except Exception as error:
                        batch.undo_to(mark)
                        job.error = error
                if self._sequencer is not None:
                    self._sequencer.integrate(batch)
                batch.write()
        except BaseException:
            if self._sequencer is not None:
                self._sequencer.rolled_back()
            raise
        if self._sequencer is not None:
            self._sequencer.committed()
        self._next_index = batch.next_audit_index
