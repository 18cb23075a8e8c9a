"""Serving a stream of independent requests: each handled concurrently, answered when done."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")

# Requests one stream may have in flight, counting answers not yet sent; the client waits
# beyond it (gRPC flow control holds its writes). With 4 MiB envelopes that bounds a stream
# to 256 MiB even against a peer that never reads its answers.
STREAM_WINDOW = 64


async def answer_concurrently(
    requests: AsyncIterator[Request],
    handle: Callable[[Request], Awaitable[Result]],
    window: int = STREAM_WINDOW,
) -> AsyncIterator[Result]:
    """Yield `handle(request)` for every request, in completion order.

    Concurrency is what lets the group-commit writer batch the requests of one stream;
    `handle` must turn every refusal into a result (it is not allowed to raise).
    """
    results: asyncio.Queue[Result | None] = asyncio.Queue()
    slots = asyncio.Semaphore(window)

    async def one(request: Request) -> None:
        await results.put(await handle(request))

    async def read_all() -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            await results.put(None)

    reader = asyncio.create_task(read_all())
    try:
        while (result := await results.get()) is not None:
            yield result
            slots.release()  # only now: an unsent answer still occupies its slot
    finally:
        reader.cancel()
