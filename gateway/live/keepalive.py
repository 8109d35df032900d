"""WebSocket keepalive of every socket of an edge: one task, and a ping only for a socket that has gone silent.

aiohttp's own heartbeat keeps two timers per socket and re-arms one on every frame received; at tens of
thousands of sockets that is memory and CPU for nothing, since most clients speak often enough (the widget
sends its `ping` frame every `heartbeat_s`). Here a socket heard from within `heartbeat_s` costs nothing; a
silent one gets a WebSocket ping and is dropped when nothing comes back within half a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Collection

from gateway.live.connection import Connection

CHECKS_PER_HEARTBEAT = 4
"""How often within a heartbeat the sockets are looked at: a silent socket is pinged between 1 and 1.25
heartbeats after its last frame, and dropped 0.5-0.75 heartbeats after an unanswered ping."""
CHUNK = 256
"""Sockets looked at in one go: a round over 16,000 sockets is spread over its interval in chunks (at
100,000 sockets on six edges, one pass over all of them held each edge's loop ~0.5 s every few seconds,
and a visitor's message with it: p99 680 ms)."""


class Keepalive:
    def __init__(self, connections: Callable[[], Collection[Connection]], heartbeat_s: float,
                 on_drop: Callable[[], None] | None = None) -> None:
        self._connections = connections
        self._heartbeat_s = heartbeat_s
        self._on_drop = on_drop
        self._task: asyncio.Task[None] | None = None

    def ensure_running(self) -> None:
        """Started with the first socket (the hub is built before the event loop runs)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ws-keepalive")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        interval_s = self._heartbeat_s / CHECKS_PER_HEARTBEAT
        while True:
            sockets = list(self._connections())
            pause_s = interval_s / max(1, math.ceil(len(sockets) / CHUNK))
            for start in range(0, max(len(sockets), 1), CHUNK):
                await asyncio.sleep(pause_s)
                self.check(time.monotonic(), sockets[start:start + CHUNK])

    def check(self, now: float, connections: Collection[Connection]) -> None:
        heartbeat_s = self._heartbeat_s
        for connection in connections:
            if now - connection.heard_at < heartbeat_s or connection.closing:
                continue
            if connection.pinged_at <= connection.heard_at:  # nothing asked since it was last heard
                connection.ping(now)
            elif now - connection.pinged_at >= heartbeat_s / 2:
                connection.drop_silent()
                if self._on_drop is not None:
                    self._on_drop()
