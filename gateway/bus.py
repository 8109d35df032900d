"""The edge's NATS connection, opened in the background so that the HTTP API serves without it.

Live chat (fan-out between edge processes) and the edge's KV buckets need NATS; `/v1/chat`
does not. A missing nats-server at start is retried until it appears, and what needs the
connection waits for it a bounded time, then answers 503 `unavailable`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client as NatsClient

from services.common.errors import KefuError
from services.common.nats_client import close_nats, connect_nats

log = logging.getLogger(__name__)

RETRY_S = 1.0


class BusUnavailable(KefuError):
    """NATS is not reachable (yet): the caller answers 503 / closes the socket with 1011."""


class EdgeBus:
    def __init__(self, url: str, name: str = "kefu-edge") -> None:
        self._url = url
        self._name = name
        self._nc: NatsClient | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reconnect_listeners: list[Callable[[], None]] = []
        """Called after NATS came back (JetStream consumers may need creating again)."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._connect_until_done())

    async def _connect_until_done(self) -> None:
        while True:
            try:
                self._nc = await connect_nats(self._url, self._name, reconnected=self._reconnected)
            except (OSError, nats.errors.Error, TimeoutError) as error:
                log.warning("nats not reachable at start (%s); retrying", error or type(error).__name__)
                await asyncio.sleep(RETRY_S)
                continue
            self._connected.set()
            return

    def _reconnected(self) -> None:
        for listener in list(self.reconnect_listeners):
            listener()

    @property
    def is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def nc(self) -> NatsClient:
        """The connection; BusUnavailable before the first connect succeeded."""
        if self._nc is None:
            raise BusUnavailable("nats is not connected yet")
        return self._nc

    async def connection(self, timeout_s: float) -> NatsClient:
        """The connection, waiting up to `timeout_s` for the first connect."""
        if self._nc is None:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._connected.wait()
            except TimeoutError:
                raise BusUnavailable("nats is not reachable") from None
        assert self._nc is not None
        return self._nc

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            # nats-py can swallow one cancellation while it connects (asyncio.wait_for on 3.11):
            # ask again until the task ends, bounded.
            for _ in range(50):
                self._task.cancel()
                done, _pending = await asyncio.wait({self._task}, timeout=0.1)
                if done:
                    break
        if self._nc is not None:
            await close_nats(self._nc)
