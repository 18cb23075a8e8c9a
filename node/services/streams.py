"""Serving a stream of independent requests: each handled concurrently, answered when done."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")

# Requests (batches) one stream may have in flight, counting answers not yet sent; the
# client waits beyond it (gRPC flow control holds its writes). A batch is bounded by gRPC's
# message size (twice the envelope limit), so with the default limits this bounds a stream to
# 64 MiB even against a peer that never reads its answers.
STREAM_WINDOW = 8


async def answer_concurrently(
    requests: AsyncIterator[Request],
    handle: Callable[[Request], Awaitable[Result]],
    draining: asyncio.Event,
    window: int = STREAM_WINDOW,
) -> AsyncIterator[Result]:
    """Yield `handle(request)` for every request, in completion order.

    Concurrency is what lets the group-commit writer batch the requests of one stream;
    `handle` must turn every refusal into a result (it is not allowed to raise). When
    `draining` is set (the node is stopping) no further request is read: those in flight are
    answered and the stream ends, so shutdown does not wait for clients to hang up. A client
    reconnects later and resends what got no answer (receivers are idempotent).
    """
    results: asyncio.Queue[Result | None] = asyncio.Queue()
    slots = asyncio.Semaphore(window)

    async def one(request: Request) -> None:
        await results.put(await handle(request))

    tasks: set[asyncio.Task[None]] = set()

    async def read() -> None:
        async for request in requests:
            await slots.acquire()
            task = asyncio.create_task(one(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    reading_task = asyncio.create_task(read())

    async def read_all() -> None:
        reading = reading_task
        stopping = asyncio.create_task(draining.wait())
        try:
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reading.cancel()
            stopping.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await results.put(None)

    reader = asyncio.create_task(read_all())
    try:
        while (result := await results.get()) is not None:
            yield result
            slots.release()  # only now: an unsent answer still occupies its slot
    finally:
        reader.cancel()
    # Reading failed (the gate refused the stream, say): answered what was in flight, the
    # stream ends with that refusal rather than a silent OK.
    failure = (
        reading_task.exception() if reading_task.done() and not reading_task.cancelled() else None
    )
    if failure is not None:
        raise failure
