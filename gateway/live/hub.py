"""Live chat of one edge process: its open sockets, the conversation feeds they share, its background work."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine

from gateway.bus import EdgeBus
from gateway.clients import BackendClients
from gateway.live.channels import LiveChannels
from gateway.live.connection import Connection
from gateway.live.feeds import Feeds
from gateway.live.frames import CLOSE_DRAINING
from gateway.live.keepalive import Keepalive
from gateway.live.tasks import BackgroundTasks
from gateway.metrics import EdgeMetrics
from gateway.settings import GatewaySettings

SHUTDOWN_CLOSE_S = 6.0
"""How long shutdown waits for the sockets' close handshakes (each gives up after 5 s itself)."""


class LiveHub:
    """Every open socket of this edge process, and the conversation feeds they share."""

    def __init__(self, clients: BackendClients, settings: GatewaySettings, bus: EdgeBus,
                 metrics: EdgeMetrics | None = None) -> None:
        self.channels = LiveChannels(bus)
        self.epoch = int(time.time() * 1000)
        """This process's start (ms): a client that sees it change knows it reached another edge."""
        self._connections: set[Connection] = set()
        self._all_closed: asyncio.Event | None = None
        """Set when the last socket ended, while aclose waits for that."""
        self._tasks = BackgroundTasks()
        self.feeds = Feeds(clients, settings, self.channels, self._tasks, metrics)
        self._keepalive = Keepalive(lambda: self._connections, settings.ws_heartbeat_s,
                                    on_drop=metrics.ws_silent_dropped.inc if metrics is not None else None)

    @property
    def connections(self) -> frozenset[Connection]:
        return frozenset(self._connections)

    def open(self, connection: Connection) -> None:
        self._connections.add(connection)
        self._keepalive.ensure_running()

    def closed(self, connection: Connection) -> None:
        """The socket ended: it leaves every conversation it followed."""
        self.feeds.leave_all(connection)
        self._connections.discard(connection)
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()

    def spawn(self, work: Coroutine[object, object, None]) -> asyncio.Task[None]:
        """Run work that must outlive the socket that asked for it (an AI answer is stored anyway)."""
        return self._tasks.spawn(work)

    def conversation_deleted(self, tenant: str, conversation_id: str) -> None:
        """Its owner erased it (DELETE /v1/sessions/{id}): its sockets on every edge are told."""
        self.feeds.deleted(tenant, conversation_id)

    def close_all(self, code: int, reason: str) -> None:
        for connection in list(self._connections):
            connection.close(code, reason)

    async def wait_closed(self, timeout_s: float) -> bool:
        """Wait for every socket to end (their close handshakes run on their own, not in aiohttp's handlers,
        so the server's shutdown does not wait for them); False if some are still open after `timeout_s`."""
        if self._connections:
            self._all_closed = asyncio.Event()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._all_closed.wait()
            except TimeoutError:
                return False
            finally:
                self._all_closed = None
        return True

    async def aclose(self) -> None:
        self.close_all(CLOSE_DRAINING, "server shutting down")  # those still open (on_shutdown closed the others)
        if not await self.wait_closed(SHUTDOWN_CLOSE_S):
            for connection in list(self._connections):
                connection.drop_silent()  # the peer never answered our close: cut it
        await self._keepalive.aclose()
        await self._tasks.aclose()
        await self.feeds.aclose()
