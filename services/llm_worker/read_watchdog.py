"""One timer over every read of a streamed HTTP response (first token, idle and total deadlines)."""

from __future__ import annotations

import asyncio

import aiohttp


class ReadTimeout(Exception):
    """A read of the response ran past its deadline (`kind`: first_token, idle or total)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class ReadWatchdog:
    """One timer over every read of a response, instead of a timeout per read (issue 20).

    A read only stores its deadline; the timer, when it fires before the deadline of the read in
    progress (which moved on since it was set), sets itself again for that deadline, so a stream
    arms it about once per idle period. It cancels the reading task only during a read that ran
    past its deadline, and that read raises ReadTimeout (asyncio.Timeout's way of telling its own
    cancellation from anyone else's)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = 0.0
        self._by = 0.0
        self._reader: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._expired = False

    async def read(self, content: aiohttp.StreamReader, by: float, kind: str) -> bytes:
        """`content.readany()`, or ReadTimeout(kind) if nothing came by `by` (loop time)."""
        self._by = by
        self._reader = reader = asyncio.current_task()
        if self._handle is None or by < self._armed_for:
            self._arm(by)
        try:
            return await content.readany()
        except asyncio.CancelledError:
            if self._expired:
                self._expired = False
                if reader is not None and reader.uncancel() <= self._cancelling:
                    raise ReadTimeout(kind) from None
            raise
        finally:
            self._reader = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when: float) -> None:
        self.close()
        self._armed_for = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        reader = self._reader
        if reader is None:
            return  # between reads: the next read sets the timer again
        if self._loop.time() < self._by:
            self._arm(self._by)
            return
        self._expired = True
        self._cancelling = reader.cancelling()
        reader.cancel()
