"""The edge's run state, owned by the app: whether it drains, and the answers still streaming."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class EdgeState:
    """Draining is an event the signal handler sets once and every watcher awaits (no polling); streams
    are counted so a drain can wait for the last one to finish, not poll for it."""

    def __init__(self) -> None:
        self.draining = asyncio.Event()
        """Set on SIGTERM: /readyz says 503, new /v1 requests are refused, sockets close with 1012."""
        self._open_streams = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def is_draining(self) -> bool:
        return self.draining.is_set()

    @property
    def open_streams(self) -> int:
        """SSE answers and live-chat turns in flight: a draining edge lets them finish and be stored."""
        return self._open_streams

    def start_draining(self) -> None:
        self.draining.set()

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        """Counts one answer in flight for as long as the block runs."""
        self._open_streams += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._open_streams -= 1
            if not self._open_streams:
                self._idle.set()

    async def streams_finished(self, timeout_s: float) -> bool:
        """Wait until no answer is in flight, at most `timeout_s`; False when some still are."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
