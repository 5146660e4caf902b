"""asyncio helpers shared by the gRPC service and the OpenAI proxy. Imports nothing of Hedgerow
(tests/test_layering.py), so both may use it."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import AsyncIterator, Sequence

_END = object()


async def merge(sources: Sequence[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """``(i, item)`` of every async generator in ``sources`` as the items come, each source's in
    its own order, until every source has ended. The first failure of any source is raised at
    once, and the others are closed (their tasks cancelled) whenever the merge ends."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, source) -> None:
        try:
            async with aclosing(source) as each:
                async for item in each:
                    queue.put_nowait((i, item, None))
            queue.put_nowait((i, _END, None))
        except Exception as exc:  # handed to the reader
            queue.put_nowait((i, _END, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(sources)]
    try:
        running = len(tasks)
        while running:
            i, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is _END:
                running -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
