"""One WebSocket's writer: a bounded queue of frames, sent in order by a task that runs only while
there is something to send (an idle socket holds no task and no queue object)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.auth import Principal

log = logging.getLogger(__name__)

FORCED_CLOSE_TIMEOUT_S = 1.0
OWN_CIDS = 256
"""cids a socket remembers to echo in its own `msg` events."""


class Connection:
    """Frames go out only through `send`, never awaited by the caller: a socket that stops
    reading fills its own queue and is closed with 1013; nobody else waits for it."""

    __slots__ = ("ws", "address", "principal", "conversations", "seen", "current", "own_cids", "close_code",
                 "_transport", "_queue_size", "_queue", "_held", "_writer", "_closing_reason", "_on_frame_out",
                 "_tokens", "_tokens_at", "reader", "receiving")

    def __init__(self, ws: web.WebSocketResponse, queue_size: int, transport: asyncio.BaseTransport | None,
                 address: str | None = None, on_frame_out: Callable[[str], None] | None = None) -> None:
        self.ws = ws
        self.address = address
        self.principal: Principal | None = None
        self.conversations: set[str] = set()
        """Conversations this socket is subscribed to (joined in the hub)."""
        self.seen: dict[str, int] = {}
        """Highest stored seq sent per conversation: a stored event is never sent twice."""
        self.current: str | None = None
        """Conversation a `send` without `conversation_id` goes to."""
        self.own_cids: dict[str, str] = {}
        """message id -> the client's cid, for messages sent on this socket (echoed in `msg`)."""
        self.close_code: int | None = None
        self._transport = transport
        self._queue_size = queue_size
        self._queue: deque[dict[str, Any]] = deque()
        self._held: list[dict[str, Any]] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing_reason = ""
        self._on_frame_out = on_frame_out
        self._tokens = -1.0
        self._tokens_at = 0.0
        self.reader: asyncio.Task[object] | None = None
        """The task reading the socket's frames, and whether it is waiting in receive() right now:
        a close from another task stops that read first (see close)."""
        self.receiving = False

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    @property
    def is_staff(self) -> bool:
        return self.principal is not None and self.principal.role in ("agent", "admin")

    def remember_cid(self, message_id: str, cid: str) -> None:
        self.own_cids[message_id] = cid
        if len(self.own_cids) > OWN_CIDS:
            del self.own_cids[next(iter(self.own_cids))]

    def take_frame_token(self, rate: float, burst: int) -> bool:
        """Token bucket of incoming frames; False when the client sends faster than allowed."""
        now = time.monotonic()
        if self._tokens < 0:
            self._tokens = float(burst)
        else:
            self._tokens = min(float(burst), self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def send_stored(self, frame: dict[str, Any], *, replay: bool = False) -> None:
        """A stored event: sent unless this socket already got it (replay and live may overlap).
        A replay (the backlog of a resume) may exceed the queue bound: it is bounded by the kept
        history, and the client asked for it."""
        conversation_id = frame["conversation_id"]
        if frame["seq"] <= self.seen.get(conversation_id, 0):
            return
        self.seen[conversation_id] = frame["seq"]
        self.send(frame, bounded=not replay)

    def send(self, frame: dict[str, Any], *, bounded: bool = True) -> None:
        if self.closing:
            return
        if self._held is not None:
            self._held.append(frame)
            return
        if bounded and len(self._queue) >= self._queue_size:
            log.info("closing a socket too slow to read (%d frames queued)", self._queue_size)
            self._force_close(1013, "too slow to read")
            return
        self._queue.append(frame)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_queued())

    def hold(self) -> None:
        """Keep frames back until `release` (the `welcome` must go first)."""
        self._held = []

    def release(self, first: dict[str, Any] | None = None) -> None:
        """Send `first`, then what was held (a hello's replay: not bounded by the queue)."""
        held, self._held = self._held or [], None
        if first is not None:
            self.send(first, bounded=False)
        for frame in held:
            self.send(frame, bounded=False)

    def drop_held(self) -> None:
        self._held = None

    def close(self, code: int, reason: str = "") -> None:
        """Send what is queued, then the close frame."""
        if self.closing:
            return
        self.close_code = code
        self._closing_reason = reason
        if self.receiving and self.reader is not None and self.reader is not asyncio.current_task():
            # aiohttp's close() from another task while a receive() waits drops the connection
            # right after the close frame, without the closing handshake (the client sees 1006).
            # Stop the read first; the writer closes once it has stopped.
            self.reader.cancel()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_queued())

    def _force_close(self, code: int, reason: str) -> None:
        self.close_code = code
        self._queue.clear()
        if self._writer is not None:
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

    async def _write_queued(self) -> None:
        try:
            while self._queue:
                frame = self._queue.popleft()
                message_id = frame.get("message_id")
                if message_id in self.own_cids and frame.get("type") in ("msg", "note"):
                    frame = {**frame, "cid": self.own_cids[message_id]}
                await self.ws.send_str(json.dumps(frame, ensure_ascii=False))
                if self._on_frame_out is not None:
                    self._on_frame_out(frame["type"])
            if self.close_code is not None:
                for _ in range(100):  # the reader stops within a loop iteration or two
                    if not self.receiving:
                        break
                    await asyncio.sleep(0.01)
                await self.ws.close(code=self.close_code, message=self._closing_reason.encode())
        except ConnectionError:
            self.close_code = self.close_code or 1006
        finally:
            if self._writer is asyncio.current_task():  # not replaced by a forced close
                self._writer = None
                if self._queue and not self.closing:  # sent while this task was finishing
                    self._writer = asyncio.create_task(self._write_queued())

    async def finish(self, timeout_s: float) -> None:
        """Close (if nobody did) and wait for the writer to end."""
        self.close(1000)
        deadline = time.monotonic() + timeout_s
        while self._writer is not None and time.monotonic() < deadline:
            writer = self._writer
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await asyncio.shield(writer)
            except TimeoutError:
                writer.cancel()
                break
            except (ConnectionError, asyncio.CancelledError):
                pass
            if self._writer is writer:
                break
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await self._writer
