"""The server side of a multiplexed call stream: id-tagged calls, each under its own deadline, results batched."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import grpc

from services.common.logs import request_id_var

log = logging.getLogger(__name__)

RUNNING_PER_STREAM = 64
"""Calls of one stream that run at once; the rest wait for a slot (their deadlines still run)."""
HELD_PER_STREAM = 1024
"""Calls one stream may hold (running or waiting); beyond it a call is refused UNAVAILABLE."""
ERROR_TRAILER = "kefu-error"
DRAINING = "draining"
"""`kefu-error` of a call refused because the server is stopping: it never ran (the client may send it again,
on another stream)."""


@dataclass(frozen=True, slots=True)
class CallStatus:
    """What a failed call's unary RPC would have ended with."""

    code: grpc.StatusCode
    message: str
    trailers: tuple[tuple[str, str], ...] = ()


class CallFailed(Exception):
    """Raised by a call's handler: the call ends with this status (the stream goes on)."""

    def __init__(self, status: CallStatus) -> None:
        super().__init__(status.message)
        self.status = status


class CallItem(Protocol):
    """What the stream needs of one incoming call (the generated messages have these fields)."""

    @property
    def id(self) -> int: ...
    @property
    def deadline_ms(self) -> int: ...
    @property
    def request_id(self) -> str: ...


ItemT = TypeVar("ItemT", bound=CallItem)
ResultT = TypeVar("ResultT")
BatchT = TypeVar("BatchT")
OutT = TypeVar("OutT")


@dataclass(frozen=True, slots=True)
class CallStreamSpec(Generic[BatchT, ItemT, ResultT, OutT]):
    """How one service's stream reads and answers: its messages, its handler, its failure result."""

    items: Callable[[BatchT], Sequence[ItemT]]
    is_cancel: Callable[[ItemT], bool]
    run: Callable[[ItemT], Awaitable[ResultT]]
    """The call's reply (as its unary RPC's), or CallFailed."""
    failed: Callable[[int, CallStatus], ResultT]
    batch: Callable[[list[ResultT]], OutT]
    inline: bool = False
    """`run` never awaits (a CPU-only check): each call runs in the reader as it arrives, without a task,
    a timer or a slot of its own (nothing could outlast its deadline)."""


async def serve_calls(spec: CallStreamSpec[BatchT, ItemT, ResultT, OutT], requests: AsyncIterator[BatchT],
                      draining: asyncio.Event) -> AsyncIterator[OutT]:
    """The result batches of one stream: every result ready when the previous batch was written goes in
    the next. Ends once the client half-closed and every call finished, or, once `draining` is set (the
    server stops), when the calls it runs have finished: a long-lived stream would otherwise hold the
    server for its whole grace period. Cancelled, it cancels its calls."""
    results: asyncio.Queue[ResultT | None] = asyncio.Queue()
    running: dict[int, asyncio.Task[None]] = {}
    slots = asyncio.Semaphore(RUNNING_PER_STREAM)
    reader = asyncio.create_task(_read(spec, requests, results, running, slots, draining))
    drainer = asyncio.create_task(_drain(draining, results, running))
    try:
        while True:
            first = await results.get()
            if first is None:
                break
            out = [first]
            while not results.empty():
                item = results.get_nowait()
                if item is None:
                    yield spec.batch(out)
                    return
                out.append(item)
            yield spec.batch(out)
    finally:
        reader.cancel()
        drainer.cancel()
        for task in list(running.values()):
            task.cancel()
        await asyncio.gather(reader, drainer, *running.values(), return_exceptions=True)


async def _drain(draining: asyncio.Event, results: asyncio.Queue[ResultT | None],
                 running: dict[int, asyncio.Task[None]]) -> None:
    await draining.wait()
    while running:
        await asyncio.gather(*running.values(), return_exceptions=True)
    results.put_nowait(None)


async def _read(spec: CallStreamSpec[BatchT, ItemT, ResultT, OutT], requests: AsyncIterator[BatchT],
                results: asyncio.Queue[ResultT | None], running: dict[int, asyncio.Task[None]],
                slots: asyncio.Semaphore, draining: asyncio.Event) -> None:
    try:
        async for batch in requests:
            for item in spec.items(batch):
                if spec.is_cancel(item):
                    task = running.pop(item.id, None)
                    if task is not None:
                        task.cancel()
                elif draining.is_set():
                    results.put_nowait(spec.failed(item.id, CallStatus(
                        grpc.StatusCode.UNAVAILABLE, "the service is stopping", ((ERROR_TRAILER, DRAINING),))))
                elif spec.inline:
                    outcome = await _inline_outcome(spec, item)
                    results.put_nowait(outcome)
                elif item.id in running:
                    results.put_nowait(spec.failed(item.id, CallStatus(
                        grpc.StatusCode.INVALID_ARGUMENT, f"call {item.id} is in flight already")))
                elif len(running) >= HELD_PER_STREAM:
                    results.put_nowait(spec.failed(item.id, CallStatus(
                        grpc.StatusCode.UNAVAILABLE, "too many calls in flight on this stream")))
                else:
                    running[item.id] = asyncio.create_task(_call(spec, item, results, running, slots))
        if running:
            await asyncio.gather(*running.values(), return_exceptions=True)
    finally:
        results.put_nowait(None)


async def _call(spec: CallStreamSpec[BatchT, ItemT, ResultT, OutT], item: ItemT,
                results: asyncio.Queue[ResultT | None], running: dict[int, asyncio.Task[None]],
                slots: asyncio.Semaphore) -> None:
    request_id_var.set(item.request_id)  # this task's own context: the call's log lines carry its id
    try:
        outcome = await _outcome(spec, item, slots)
        results.put_nowait(outcome)
    except asyncio.CancelledError:
        pass  # cancelled by the client (a cancel item) or with the stream: nobody waits for a result
    finally:
        if running.get(item.id) is asyncio.current_task():
            del running[item.id]


async def _outcome(spec: CallStreamSpec[BatchT, ItemT, ResultT, OutT], item: ItemT,
                   slots: asyncio.Semaphore) -> ResultT:
    if item.deadline_ms <= 0:
        return spec.failed(item.id, CallStatus(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    timeout = asyncio.timeout(item.deadline_ms / 1000)
    try:
        async with timeout:
            async with slots:
                return await spec.run(item)
    except CallFailed as failed:
        return spec.failed(item.id, failed.status)
    except TimeoutError as error:
        if timeout.expired():
            return spec.failed(item.id, CallStatus(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
        return spec.failed(item.id, _unexpected(item.id, error))
    except Exception as error:
        return spec.failed(item.id, _unexpected(item.id, error))


async def _inline_outcome(spec: CallStreamSpec[BatchT, ItemT, ResultT, OutT], item: ItemT) -> ResultT:
    if item.deadline_ms <= 0:
        return spec.failed(item.id, CallStatus(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    request_id_var.set(item.request_id)
    try:
        return await spec.run(item)
    except CallFailed as failed:
        return spec.failed(item.id, failed.status)
    except Exception as error:
        return spec.failed(item.id, _unexpected(item.id, error))


def _unexpected(call_id: int, error: Exception) -> CallStatus:
    """What grpc.aio answers for an exception a unary handler lets escape; logged, as it is a bug."""
    log.error("call %d failed: %s", call_id, error, exc_info=error)
    return CallStatus(grpc.StatusCode.UNKNOWN, f"Unexpected {type(error).__name__}")
