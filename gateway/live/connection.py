"""One WebSocket's state, owned here: who it is, what it follows, what it has seen, and its writer.

The writer is a bounded queue of typed frames, encoded and sent in order by a task that runs only
while there is something to send (an idle socket holds no task and no queue object).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from gateway.auth import Principal
from gateway.errors import SocketRefused
from gateway.live.frames import (
    CLOSE_TOO_SLOW,
    ErrorFrame,
    MsgEvent,
    NoteEvent,
    ServerFrame,
    StoredEvent,
    encode,
    kind_of,
)

log = logging.getLogger(__name__)


class FrameWriter(Protocol):
    """The wire side of a socket (gateway/live/wire.py Wire; aiohttp's WebSocketResponse fits too)."""

    async def send_str(self, data: str) -> None: ...

    async def close(self, *, code: int = 1000, message: bytes = b"", drain: bool = True) -> bool: ...


FORCED_CLOSE_TIMEOUT_S = 1.0
PING_FRAME = b"\x89\x00"
"""A WebSocket ping from the server: FIN and opcode 9, no mask, no payload."""
CLOSE_SILENT = 1006
"""Recorded (never sent: the transport is just closed) for a socket that did not answer a ping."""
OWN_CIDS = 256
"""cids a socket remembers to echo in its own `msg` events."""


class Connection:
    """Frames go out only through `send` and `deliver`, never awaited by the caller: a socket that stops
    reading fills its own queue and is closed with 1013; nobody else waits for it."""

    __slots__ = ("ws", "address", "_principal", "_following", "_seen", "_current", "_own_cids", "_close_code",
                 "_transport", "_queue_size", "_queue", "_held", "_writer", "_closing_reason", "_on_frame_out",
                 "_tokens", "_tokens_at", "heard_at", "pinged_at")

    def __init__(self, ws: FrameWriter, queue_size: int, transport: asyncio.Transport | None,
                 address: str | None = None, on_frame_out: Callable[[str], None] | None = None) -> None:
        self.ws = ws
        self.address = address
        self._principal: Principal | None = None
        self._following: list[str] = []
        """A list, not a set: a visitor's socket follows one or a few, and an idle one keeps it."""
        self._seen: dict[str, int] = {}
        """Highest stored seq sent per conversation: a stored event is never sent twice."""
        self._current: str | None = None
        self._own_cids: dict[str, str] | None = None
        """message id -> the client's cid, for messages sent on this socket (echoed in `msg`); None until one is."""
        self._close_code: int | None = None
        self._transport = transport
        self._queue_size = queue_size
        self._queue: deque[ServerFrame] | None = None
        """Created with the first frame to send, dropped once sent: an idle socket holds none."""
        self._held: list[ServerFrame] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing_reason = ""
        self._on_frame_out = on_frame_out
        self._tokens = -1.0
        self._tokens_at = 0.0
        self.heard_at = time.monotonic()
        """When the client last sent a frame of any kind (gateway/live/keepalive.py)."""
        self.pinged_at = 0.0

    # -- who, and what it follows -----------------------------------------------------------------

    @property
    def principal(self) -> Principal | None:
        """Who said hello on it (None before)."""
        return self._principal

    def greet(self, principal: Principal) -> None:
        self._principal = principal

    @property
    def is_staff(self) -> bool:
        return self._principal is not None and self._principal.role in ("agent", "admin")

    @property
    def closing(self) -> bool:
        return self._close_code is not None

    @property
    def close_code(self) -> int | None:
        return self._close_code

    @property
    def conversations(self) -> frozenset[str]:
        """The conversations it follows."""
        return frozenset(self._following)

    def follows(self, conversation_id: str) -> bool:
        return conversation_id in self._following

    @property
    def current(self) -> str | None:
        """The conversation a visitor's `send` without `conversation_id` goes to."""
        return self._current

    def point_at(self, conversation_id: str) -> None:
        self._current = conversation_id

    def follow(self, conversation_id: str, after_seq: int, backlog: Sequence[StoredEvent]) -> None:
        """Follow a conversation from `after_seq` on: its missed events (`backlog`) first, then live ones.
        A backlog may exceed the queue bound: it is bounded by the kept history, and the client asked."""
        self._seen[conversation_id] = max(self._seen.get(conversation_id, 0), after_seq)
        for event in backlog:
            self.deliver(event, replay=True)
        if conversation_id not in self._following:
            self._following.append(conversation_id)

    def unfollow(self, conversation_id: str) -> None:
        if conversation_id in self._following:
            self._following.remove(conversation_id)

    def remember_cid(self, message_id: str, cid: str) -> None:
        if self._own_cids is None:
            self._own_cids = {}
        self._own_cids[message_id] = cid
        if len(self._own_cids) > OWN_CIDS:
            del self._own_cids[next(iter(self._own_cids))]

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

    # -- frames out -------------------------------------------------------------------------------

    def deliver(self, event: StoredEvent, *, replay: bool = False) -> None:
        """A stored event: sent unless this socket already got it (replay and live may overlap);
        private notes never reach a visitor."""
        if isinstance(event, NoteEvent) and not self.is_staff:
            return
        if event.seq <= self._seen.get(event.conversation_id, 0):
            return
        self._seen[event.conversation_id] = event.seq
        self.send(event, bounded=not replay)

    def send(self, frame: ServerFrame, *, bounded: bool = True) -> None:
        if self.closing:
            return
        if self._held is not None:
            self._held.append(frame)
            return
        if self._queue is None:
            self._queue = deque()
        elif bounded and len(self._queue) >= self._queue_size:
            log.info("closing a socket too slow to read (%d frames queued)", self._queue_size)
            self._force_close(CLOSE_TOO_SLOW, "too slow to read")
            return
        self._queue.append(frame)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_queued())

    def hold(self) -> None:
        """Keep frames back until `release` (the `welcome` must go first)."""
        self._held = []

    def release(self, first: ServerFrame | None = None) -> None:
        """Send `first`, then what was held (a hello's replay: not bounded by the queue)."""
        held, self._held = self._held or [], None
        if first is not None:
            self.send(first, bounded=False)
        for frame in held:
            self.send(frame, bounded=False)

    def drop_held(self) -> None:
        self._held = None

    # -- keepalive -------------------------------------------------------------------------------

    def heard(self) -> None:
        self.heard_at = time.monotonic()

    def ping(self, now: float) -> None:
        """A WebSocket ping, written whole beside whatever the writer sends (frames are written whole)."""
        self.pinged_at = now
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(PING_FRAME)

    def drop_silent(self) -> None:
        """No answer to a ping: the peer is gone, so no closing handshake; the Wire ends with its transport."""
        self._close_code = CLOSE_SILENT
        self._queue = None
        if self._transport is not None:
            self._transport.close()

    # -- closing ----------------------------------------------------------------------------------

    def refuse(self, refused: SocketRefused) -> None:
        """Say why in an `error` frame, then close with the refusal's close code."""
        self.send(ErrorFrame(refused.code, refused.message))
        self.close(refused.close_code, refused.message[:100])

    def close(self, code: int, reason: str = "") -> None:
        """Send what is queued, then the close frame."""
        if self.closing:
            return
        self._close_code = code
        self._closing_reason = reason
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_queued())

    def _force_close(self, code: int, reason: str) -> None:
        self._close_code = code
        self._queue = None
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
                if not self._queue:
                    self._queue = None  # sent everything: an idle socket keeps no deque
                if (self._own_cids and isinstance(frame, MsgEvent | NoteEvent)
                        and frame.message_id in self._own_cids):
                    frame = msgspec.structs.replace(frame, cid=self._own_cids[frame.message_id])
                await self.ws.send_str(encode(frame))
                if self._on_frame_out is not None:
                    self._on_frame_out(kind_of(frame))
            if self._close_code is not None:
                await self.ws.close(code=self._close_code, message=self._closing_reason.encode())
        except ConnectionError:
            self._close_code = self._close_code or 1006
        finally:
            if self._writer is asyncio.current_task():  # not replaced by a forced close
                self._writer = None
                if self._queue and not self.closing:  # sent while this task was finishing
                    self._writer = asyncio.create_task(self._write_queued())

    def lost(self) -> None:
        """The transport is gone: nothing more is sent (a close in progress ends with it)."""
        if self._close_code is None:
            self._close_code = CLOSE_SILENT
        self._queue = None
        self._held = None
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()

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
