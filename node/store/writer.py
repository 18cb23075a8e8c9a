"""Group commit: one writer thread applies queued units of work in shared transactions.

Every durable change of the node goes through :class:`BatchWriter`. Callers hand
it a function of a :class:`~sqlalchemy.orm.Session`; the writer gathers what is
queued (waiting a moment for more when there is load), runs each function in its
own SAVEPOINT so one failure does not undo its neighbours, commits the batch once,
and only then resolves the callers' awaits. A caller that has its result therefore
knows its change is durable. The writer is also the audit log's sequencer: it is
the only place audit indices are assigned (see node.audit.log).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.store.models import AuditEntryRecord

T = TypeVar("T")
AUDIT_NEXT_INDEX = "audit_next_index"
log = structlog.get_logger(__name__)


@dataclass
class _Job:
    work: Callable[[Session], Any]
    future: asyncio.Future[Any]
    result: Any = None
    error: BaseException | None = None
    done: bool = field(default=False)


class WriterStopped(RuntimeError):
    pass


class BatchWriter:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        max_batch: int = 500,
        gather_seconds: float = 0.002,
    ) -> None:
        self._sessions = sessions
        self._max_batch = max_batch
        self._gather_seconds = gather_seconds
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="writer")
        self._task: asyncio.Task[None] | None = None
        self._next_index: int | None = None
        self.batches = 0
        self.jobs = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batch-writer")

    async def stop(self) -> None:
        """Finish everything queued so far, then stop."""
        if self._task is None:
            return
        await self._queue.put(None)
        await self._task
        self._task = None
        self._executor.shutdown(wait=True)

    async def run(self, work: Callable[[Session], T]) -> T:
        """Apply `work` in the next batch; return its result once committed."""
        if self._task is None:
            raise WriterStopped("the node is shutting down; try again when it is back")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(work, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            deadline = loop.time() + self._gather_seconds
            while len(batch) < self._max_batch:
                try:
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    if loop.time() >= deadline:
                        break
                    await asyncio.sleep(self._gather_seconds / 4)
                    continue
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            try:
                await loop.run_in_executor(self._executor, self._commit, batch)
            except Exception as error:  # the whole commit failed: nobody's change is durable
                log.error("batch commit failed", error=str(error), jobs=len(batch))
                self._next_index = None
                for job in batch:
                    job.error, job.done = error, True
            for job in batch:
                if job.future.done():  # the caller went away (cancelled RPC)
                    continue
                if job.error is not None:
                    job.future.set_exception(job.error)
                else:
                    job.future.set_result(job.result)
        # Fail whatever raced in behind the stop marker.
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not None and not job.future.done():
                job.future.set_exception(WriterStopped("the node is shutting down"))

    def _commit(self, batch: list[_Job]) -> None:
        with self._sessions() as session, session.begin():
            if self._next_index is None:
                last = session.scalar(select(func.max(AuditEntryRecord.idx)))
                self._next_index = 0 if last is None else last + 1
            session.info[AUDIT_NEXT_INDEX] = self._next_index
            for job in batch:
                index_before = session.info[AUDIT_NEXT_INDEX]
                try:
                    with session.begin_nested():
                        job.result = job.work(session)
                except Exception as error:
                    session.info[AUDIT_NEXT_INDEX] = index_before
                    job.error = error
                job.done = True
            next_index = session.info[AUDIT_NEXT_INDEX]
        self._next_index = next_index
        self.batches += 1
        self.jobs += len(batch)
