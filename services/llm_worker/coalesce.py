"""Windowed batching of an answer stream: the first text at once, then at most one text message per window."""

# Every gRPC message costs CPU on the worker, the edge and the output moderation (0.15-0.4 ms each,
# issue 20) whatever its size, and an upstream sends 20-100 small chunks per answer. Joining the texts
# of a window (KEFU_STREAM_WINDOW_MS, 50 ms: still smooth to read) halves the messages at 20 ms chunks
# and cuts more at faster ones, without delaying the first token.

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

Event = TypeVar("Event")


async def windowed(source: AsyncIterator[str | Event], window_s: float) -> AsyncGenerator[str | Event, None]:
    """The events of `source` in order, consecutive texts joined: the first text as soon as it comes,
    then at most one text per `window_s` (what arrives meanwhile waits for the window's end), and
    whatever is left at once when a non-text event comes or the source ends. A failure of `source`
    is raised after everything that came before it. `window_s` 0 only joins a backlog.

    One reader task per stream fills a list; this loop wakes once per window (a timer) or when it has
    nothing to send, never per chunk. Closing the result cancels the reader, and with it `source`.
    """
    loop = asyncio.get_running_loop()
    items: list[str | Event] = []
    ended = False
    urgent = False
    """A non-text event or the end is waiting: flush without waiting for the window."""
    failure: Exception | None = None
    waiter: asyncio.Future[None] | None = None
    wake_on_text = True

    def wake() -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read() -> None:
        nonlocal ended, urgent, failure
        try:
            async for event in source:
                items.append(event)
                if not isinstance(event, str):
                    urgent = True
                    wake()
                elif wake_on_text:
                    wake()
        except Exception as error:  # handed to the consumer, raised there in order
            failure = error
        finally:
            ended = urgent = True
            wake()

    async def wait(deadline: float | None) -> None:
        nonlocal waiter
        waiter = loop.create_future()
        timer = loop.call_at(deadline, wake) if deadline is not None else None
        try:
            await waiter
        finally:
            waiter = None
            if timer is not None:
                timer.cancel()

    # The task copies the context: the request id set for this call stays in the source's logs.
    reader = asyncio.create_task(read())
    try:
        window_end: float | None = None  # None until the first text has left
        while True:
            if not urgent:
                if window_end is not None and loop.time() < window_end:
                    wake_on_text = False  # this window's texts gather; its end is the one wake-up
                    await wait(window_end)
                if not items and not ended:
                    wake_on_text = True  # the window is over: the next text leaves as it comes
                    await wait(None)
            if not items:
                if ended:
                    break
                continue
            batch, items = items, []
            urgent = ended
            texts: list[str] = []
            for item in batch:
                if isinstance(item, str):
                    texts.append(item)
                    continue
                if texts:
                    yield "".join(texts)
                    texts = []
                yield item
            if texts:
                window_end = loop.time() + window_s
                yield "".join(texts)
        if failure is not None:
            raise failure
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
