"""Independent JetStream round trips of one operation run at once, none outliving it (issue 20)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TypeVar

T = TypeVar("T")


async def together(main: Coroutine[object, object, T], *beside: Coroutine[object, object, object]) -> T:
    """Run `main` and `beside` concurrently and return `main`'s result.

    The first failure cancels the others and is raised itself, not an ExceptionGroup, so callers
    catch RateLimited or NotFound as before (of failures that land together, the first in argument
    order). A cancelled caller cancels them all. Either way this returns only once every one has
    ended (asyncio.TaskGroup): nothing keeps running behind it.
    """
    if not beside:
        return await main  # one step: no task to pay for
    tasks: list[asyncio.Task[object]] = []
    try:
        async with asyncio.TaskGroup() as group:
            first = group.create_task(main)
            tasks = [first, *(group.create_task(step) for step in beside)]
    except BaseExceptionGroup:
        for task in tasks:
            if task.done() and not task.cancelled() and (error := task.exception()) is not None:
                raise error from None
        raise
    return first.result()
