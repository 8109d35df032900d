"""A turn's session and moderation calls over long-lived, id-tagged streams to each backend (issue 20 item 5).

A unary grpc.aio call costs about 0.6 ms of CPU over both ends; a message on an open stream 0.15-0.4 ms,
and calls queued while a write is in flight share the next message. Each call keeps its own deadline and
comes back as its reply or as the grpc.aio.AioRpcError its unary RPC would have raised (same code, details
and trailers), so callers map errors exactly as before (gateway/errors.py).

Failures: the stream is opened on first use and again on the first call after it broke. Calls the server
may have seen when it broke fail with UNAVAILABLE (never retried: the caller's message id makes its own
retry safe); calls still queued, never written, go out on the next stream. A server that stops drains its
streams: it finishes the calls it runs and refuses new ones unrun (`kefu-error: draining`); those are sent
once more, on a new stream (another replica, or the restarted process through gRPC's retries). A caller that gives up
(cancelled) sends a cancel item for its call; one whose deadline passed sends nothing (the server's copy of
the deadline ends the call there)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import grpc

from kefu.moderation.v1 import moderation_pb2, moderation_pb2_grpc
from kefu.session.v1 import session_pb2, session_pb2_grpc
from services.common.call_streams import DRAINING, ERROR_TRAILER

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
BatchT = TypeVar("BatchT")
OutT = TypeVar("OutT")
MAX_BATCH = 256
"""Calls written in one message at most (a message stays far below the 4 MiB receive limit)."""


class StatusMessage(Protocol):
    """session_pb2.CallStatus and moderation_pb2.CheckStatus."""

    @property
    def code(self) -> int: ...
    @property
    def message(self) -> str: ...
    @property
    def trailers(self) -> Mapping[str, str]: ...


def rpc_error(code: grpc.StatusCode, details: str, trailers: Iterable[tuple[str, str]] = ()) -> grpc.aio.AioRpcError:
    """The exception a unary call with this outcome raises."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def is_draining(status: StatusMessage) -> bool:
    """Refused unrun by a server that stops (services.common.call_streams.DRAINING): safe to send again."""
    return status.code == grpc.StatusCode.UNAVAILABLE.value[0] and status.trailers.get(ERROR_TRAILER) == DRAINING


def status_error(status: StatusMessage) -> grpc.aio.AioRpcError:
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    return rpc_error(code, status.message, sorted(status.trailers.items()))


BatchT_co = TypeVar("BatchT_co", covariant=True)
OutT_contra = TypeVar("OutT_contra", contravariant=True)


class _Codec(Protocol[ItemT, BatchT_co, OutT_contra, ResultT]):
    """The stream's messages: a cancel item, a batch of items, the results of a batch by id."""

    def cancel(self, call_id: int) -> ItemT: ...
    def batch(self, items: list[ItemT]) -> BatchT_co: ...
    def results(self, out: OutT_contra) -> Iterable[tuple[int, ResultT]]: ...
    def draining(self, result: ResultT) -> bool: ...


@dataclass(eq=False)
class _Open(Generic[BatchT, OutT]):
    """One opened stream: its call, the calls written on it and not answered yet, its tasks."""

    call: grpc.aio.StreamStreamCall[BatchT, OutT]
    written: set[int] = field(default_factory=set)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class CallStream(Generic[ItemT, BatchT, OutT, ResultT]):
    """One backend's multiplexed stream: calls in by id, results out by id; opened lazily, reopened after a
    failure or when the server drains it (it stops). Everything runs on the event loop of the first call."""

    def __init__(self, backend: str, open_call: Callable[[], grpc.aio.StreamStreamCall[BatchT, OutT]],
                 codec: _Codec[ItemT, BatchT, OutT, ResultT]) -> None:
        self._backend = backend
        self._open_call = open_call
        self._codec = codec
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[ResultT]] = {}
        """Calls awaiting their result, by id."""
        self._items: dict[int, ItemT] = {}
        """Each pending call's item, kept to send it again once should a draining server refuse it unrun."""
        self._resent: set[int] = set()
        self._queued: dict[int, ItemT] = {}
        """Calls (and cancels) not yet written, in order; a cancel's key is its call's id, negated."""
        self._wake = asyncio.Event()
        self._current: _Open[BatchT, OutT] | None = None
        """The stream new calls go on (None: the next call opens one)."""
        self._streams: set[_Open[BatchT, OutT]] = set()
        """Every stream still open: the current one, and drained ones finishing their calls."""
        self._closed = False
        self.writes = 0
        """Messages written over every stream so far (fewer than calls under load: they share them)."""
        self.opened = 0
        """Streams opened so far (1 + the reopenings after a failure or a drain)."""

    @property
    def pending(self) -> int:
        """Calls awaiting a result (0 once every caller got its answer or gave up)."""
        return len(self._pending)

    @property
    def gathering(self) -> bool:
        """Calls wait to be written (a write is in flight): a call added now shares their message."""
        return bool(self._queued)

    async def call(self, make_item: Callable[[int, int], ItemT], timeout_s: float) -> ResultT:
        """`make_item(id, deadline_ms)`'s result. Raises grpc.aio.AioRpcError as its unary RPC would."""
        if self._closed:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"{self._backend} stream closed")
        call_id = next(self._ids)
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        item = make_item(call_id, max(1, int(timeout_s * 1000)))
        self._items[call_id] = self._queued[call_id] = item
        self._ensure_open()
        self._wake.set()
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except asyncio.CancelledError:
            if self._queued.pop(call_id, None) is None and self._current is not None:
                # Written already: the server drops it (it may have stored it, as a cancelled unary call may).
                self._queued[-call_id] = self._codec.cancel(call_id)
                self._wake.set()
            raise
        finally:
            self._queued.pop(call_id, None)
            self._items.pop(call_id, None)
            self._resent.discard(call_id)
            del self._pending[call_id]

    def _ensure_open(self) -> None:
        if self._current is not None:
            return
        stream: _Open[BatchT, OutT] = _Open(self._open_call())
        self._current = stream
        self._streams.add(stream)
        self.opened += 1
        stream.tasks = [asyncio.create_task(self._write(stream), name=f"{self._backend}-calls-writer"),
                        asyncio.create_task(self._read(stream), name=f"{self._backend}-calls-reader")]

    async def _write(self, stream: _Open[BatchT, OutT]) -> None:
        """Every call queued since the last write goes in the next message (batching under load)."""
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            while self._current is stream:
                if not self._queued:
                    # Looked at before each wait: a drained stream's writer may clear the event too.
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                keys = list(itertools.islice(self._queued, MAX_BATCH))
                items = [self._queued.pop(key) for key in keys]
                stream.written.update(key for key in keys if key > 0)
                await stream.call.write(self._codec.batch(items))
                self.writes += 1
        # The stream broke while writing: the reader sees it and fails what the server may have seen.

    async def _read(self, stream: _Open[BatchT, OutT]) -> None:
        error: grpc.aio.AioRpcError | None = None
        try:
            async for out in stream.call:
                for call_id, result in self._codec.results(out):
                    stream.written.discard(call_id)
                    future = self._pending.get(call_id)
                    if future is None or future.done():
                        continue
                    if self._codec.draining(result) and call_id not in self._resent:
                        self._resend(stream, call_id)
                    else:
                        future.set_result(result)
        except grpc.aio.AioRpcError as raised:
            error = raised
        except asyncio.CancelledError:
            if self._closed:
                raise
        self._ended(stream, error)

    def _resend(self, stream: _Open[BatchT, OutT], call_id: int) -> None:
        """The server stops and refused the call unrun: it goes again, once, on a new stream (to another
        replica, or to the restarted process through gRPC's retries); the old stream finishes its calls."""
        if self._current is stream:
            self._current = None
            self._wake.set()  # its writer sees it is no longer current and ends
            log.info("%s call stream drained by the server; the next calls go on a new one", self._backend)
        self._resent.add(call_id)
        self._queued[call_id] = self._items[call_id]
        self._ensure_open()
        self._wake.set()

    def _ended(self, stream: _Open[BatchT, OutT], error: grpc.aio.AioRpcError | None) -> None:
        """The stream ended. Broken: the calls the server may have seen fail UNAVAILABLE. Ended by the server
        (it drained): it answered every call it read, so one still unanswered was never run and goes again,
        once. Calls still queued go on a new stream."""
        self._streams.discard(stream)
        stream.call.cancel()
        stream.tasks[0].cancel()  # its writer
        current = self._current is stream
        if current:
            self._current = None
            for key in [key for key in self._queued if key < 0]:
                del self._queued[key]  # a cancel for a stream that is gone
        detail = error.details() if error is not None else "stream ended"
        failure = rpc_error(grpc.StatusCode.UNAVAILABLE, f"{self._backend} call stream broke: {detail}")
        for call_id in stream.written:
            future = self._pending.get(call_id)
            if future is None or future.done():
                continue
            if error is None and call_id not in self._resent:
                self._resent.add(call_id)
                self._queued[call_id] = self._items[call_id]
            else:
                future.set_exception(failure)
        if current and error is not None:
            log.warning("%s call stream broke (%s); the next call reopens it", self._backend, detail)
        if self._queued and not self._closed:
            self._ensure_open()
            self._wake.set()

    async def close(self) -> None:
        """Cancel the streams; calls still waiting fail UNAVAILABLE."""
        self._closed = True
        self._current = None
        tasks = [task for stream in self._streams for task in stream.tasks]
        for stream in self._streams:
            stream.call.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._streams.clear()
        failure = rpc_error(grpc.StatusCode.UNAVAILABLE, f"{self._backend} stream closed")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(failure)


class _SessionCodec:
    def cancel(self, call_id: int) -> session_pb2.SessionCall:
        return session_pb2.SessionCall(id=call_id, cancel=True)

    def batch(self, items: list[session_pb2.SessionCall]) -> session_pb2.SessionCallBatch:
        return session_pb2.SessionCallBatch(calls=items)

    def results(self, out: session_pb2.SessionResultBatch) -> Iterable[tuple[int, session_pb2.SessionResult]]:
        return ((result.id, result) for result in out.results)

    def draining(self, result: session_pb2.SessionResult) -> bool:
        return result.HasField("status") and is_draining(result.status)


class _ModerationCodec:
    def cancel(self, call_id: int) -> moderation_pb2.CheckItem:
        return moderation_pb2.CheckItem(id=call_id, cancel=True)

    def batch(self, items: list[moderation_pb2.CheckItem]) -> moderation_pb2.CheckBatch:
        return moderation_pb2.CheckBatch(items=items)

    def results(self, out: moderation_pb2.CheckResults) -> Iterable[tuple[int, moderation_pb2.CheckResult]]:
        return ((result.id, result) for result in out.results)

    def draining(self, result: moderation_pb2.CheckResult) -> bool:
        return result.HasField("status") and is_draining(result.status)


class CallStreams(Generic[ItemT, BatchT, OutT, ResultT]):
    """Several streams to one service, calls dealt to them in turn. Each stream is one RPC, which the channel's
    round_robin policy places on the next replica: the edge's calls spread over a service's replicas as its
    unary calls did, where one stream would pin them all to one. A call joins the last stream while that one
    is gathering a message (under load), so spreading never splits what would have been one write."""

    def __init__(self, backend: str, open_call: Callable[[], grpc.aio.StreamStreamCall[BatchT, OutT]],
                 codec: _Codec[ItemT, BatchT, OutT, ResultT], streams: int) -> None:
        if streams < 1:
            raise ValueError("streams must be >= 1")
        self.streams = [CallStream(backend, open_call, codec) for _ in range(streams)]
        self._turns = itertools.cycle(self.streams)
        self._last = self.streams[-1]

    async def call(self, make_item: Callable[[int, int], ItemT], timeout_s: float) -> ResultT:
        if not self._last.gathering:
            self._last = next(self._turns)
        return await self._last.call(make_item, timeout_s)

    @property
    def pending(self) -> int:
        return sum(stream.pending for stream in self.streams)

    @property
    def writes(self) -> int:
        return sum(stream.writes for stream in self.streams)

    @property
    def opened(self) -> int:
        return sum(stream.opened for stream in self.streams)

    async def close(self) -> None:
        await asyncio.gather(*(stream.close() for stream in self.streams))


SessionStreams = CallStreams[session_pb2.SessionCall, session_pb2.SessionCallBatch, session_pb2.SessionResultBatch,
                             session_pb2.SessionResult]
ModerationStreams = CallStreams[moderation_pb2.CheckItem, moderation_pb2.CheckBatch, moderation_pb2.CheckResults,
                                moderation_pb2.CheckResult]


class TurnCalls:
    """A turn's calls before and after its answer (the input check, BeginTurn, the answer's Append; SSE and
    live chat alike) and the agent's reply, each over its service's stream. The methods mirror the unary
    stubs' calls they replace. `streams`: per service (KEFU_CALL_STREAMS)."""

    def __init__(self, session: session_pb2_grpc.SessionServiceStub,
                 moderation: moderation_pb2_grpc.ModerationServiceStub, streams: int) -> None:
        self.session: SessionStreams = CallStreams("session", lambda: session.Calls(), _SessionCodec(), streams)
        self.moderation: ModerationStreams = CallStreams("moderation", lambda: moderation.CheckMany(),
                                                         _ModerationCodec(), streams)

    async def check(self, request: moderation_pb2.CheckRequest, timeout_s: float,
                    request_id: str = "") -> moderation_pb2.CheckResponse:
        result = await self.moderation.call(lambda call_id, deadline_ms: moderation_pb2.CheckItem(
            id=call_id, deadline_ms=deadline_ms, request_id=request_id, check=request), timeout_s)
        if result.HasField("status"):
            raise status_error(result.status)
        return result.check

    async def begin_turn(self, request: session_pb2.BeginTurnRequest, timeout_s: float,
                         request_id: str = "") -> session_pb2.BeginTurnResponse:
        result = await self.session.call(lambda call_id, deadline_ms: session_pb2.SessionCall(
            id=call_id, deadline_ms=deadline_ms, request_id=request_id, begin_turn=request), timeout_s)
        if result.HasField("status"):
            raise status_error(result.status)
        return result.begin_turn

    async def append(self, request: session_pb2.AppendRequest, timeout_s: float,
                     request_id: str = "") -> session_pb2.AppendResponse:
        result = await self.session.call(lambda call_id, deadline_ms: session_pb2.SessionCall(
            id=call_id, deadline_ms=deadline_ms, request_id=request_id, append=request), timeout_s)
        if result.HasField("status"):
            raise status_error(result.status)
        return result.append

    async def close(self) -> None:
        await asyncio.gather(self.session.close(), self.moderation.close())
