"""One WebSocket's writer: a bounded queue of frames and one task that sends them in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from aiohttp import web

from gateway.auth import Principal

log = logging.getLogger(__name__)

FORCED_CLOSE_TIMEOUT_S = 1.0


class _Close:
    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class Connection:
    """Frames go out only through `send`, never awaited by the caller: a socket that stops
    reading fills its own queue and is closed with 1013; nobody else waits for it."""

    def __init__(self, ws: web.WebSocketResponse, queue_size: int,
                 transport: asyncio.BaseTransport | None) -> None:
        self.ws = ws
        self._transport = transport
        self.principal: Principal | None = None
        self.conversations: set[str] = set()
        """Conversations this socket is subscribed to (joined in the hub)."""
        self.current: str | None = None
        """Conversation a `send` without `conversation_id` goes to."""
        self.own_cids: dict[str, str] = {}
        """message id -> the client's cid, for messages sent on this socket (echoed in `msg`)."""
        self.close_code: int | None = None
        self._queue: asyncio.Queue[dict[str, Any] | _Close] = asyncio.Queue(queue_size)
        self._held: list[dict[str, Any]] | None = None
        self._writer = asyncio.create_task(self._write_all())

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    def send(self, frame: dict[str, Any]) -> None:
        if self.closing:
            return
        if self._held is not None:
            self._held.append(frame)
            return
        try:
            self._queue.put_nowait(frame)
        except asyncio.QueueFull:
            log.info("closing a socket too slow to read (%d frames queued)", self._queue.maxsize)
            self._force_close(1013, "too slow to read")

    def hold(self) -> None:
        """Keep frames back until `release` (the `welcome` must go first)."""
        self._held = []

    def release(self, first: dict[str, Any] | None = None) -> None:
        held, self._held = self._held or [], None
        if first is not None:
            self.send(first)
        for frame in held:
            self.send(frame)

    def drop_held(self) -> None:
        self._held = None

    def close(self, code: int, reason: str = "") -> None:
        """Send what is queued, then the close frame."""
        if self.closing:
            return
        self.close_code = code
        try:
            self._queue.put_nowait(_Close(code, reason))
        except asyncio.QueueFull:
            self._force_close(code, reason)

    def _force_close(self, code: int, reason: str) -> None:
        self.close_code = code
        self._writer.cancel()
        self._writer = asyncio.create_task(self._close_now(code, reason))

    async def _close_now(self, code: int, reason: str) -> None:
        # The peer is not reading: do not wait for the buffers to drain nor for its close frame.
        try:
            async with asyncio.timeout(FORCED_CLOSE_TIMEOUT_S):
                await self.ws.close(code=code, message=reason.encode(), drain=False)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            if self._transport is not None:
                self._transport.close()

    async def _write_all(self) -> None:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, _Close):
                    await self.ws.close(code=item.code, message=item.reason.encode())
                    return
                frame = item
                message_id = frame.get("message_id")
                if frame.get("type") == "msg" and message_id in self.own_cids:
                    frame = {**frame, "cid": self.own_cids[message_id]}
                await self.ws.send_str(json.dumps(frame, ensure_ascii=False))
        except ConnectionError:
            self.close_code = self.close_code or 1006

    async def finish(self, timeout_s: float) -> None:
        """Close (if nobody did) and wait for the writer to end."""
        self.close(1000)
        writer = self._writer
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(writer)
        except TimeoutError:
            writer.cancel()
        except (ConnectionError, asyncio.CancelledError):
            pass
        if self._writer is not writer:  # replaced by a forced close meanwhile
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._writer), timeout_s)
