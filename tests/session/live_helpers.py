"""Helpers of the live-chat session tests: principals, a deadline poll, calls that must fail."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from nats.aio.client import Client as NatsClient

from kefu.session.v1 import session_pb2, session_pb2_grpc
from services.session.metrics import SessionMetrics
from services.session.schedule import TimerLimits, TimerSchedule
from services.session.store import SessionStore
from services.session.timers import ConversationTimers


@dataclass
class Live:
    stub: session_pb2_grpc.SessionServiceStub
    store: SessionStore
    metrics: SessionMetrics
    nc: NatsClient

    async def open_conversation(self, visitor: session_pb2.Principal, text: str = "hello") -> str:
        response: session_pb2.AppendResponse = await self.stub.Append(
            session_pb2.AppendRequest(principal=visitor, role="user", content=text))
        return response.session_id

    async def transition(self, who: session_pb2.Principal, session_id: str, action: str,
                         **fields: Any) -> session_pb2.TransitionResponse:
        response: session_pb2.TransitionResponse = await self.stub.Transition(session_pb2.TransitionRequest(
            principal=who, session_id=session_id, action=action, **fields))
        return response

    async def messages(self, who: session_pb2.Principal, session_id: str) -> list[session_pb2.Message]:
        response = await self.stub.ListMessages(session_pb2.ListMessagesRequest(principal=who, session_id=session_id))
        return list(response.messages)


def principal(subject: str, role: str = "visitor", tenant: str = "shop1") -> session_pb2.Principal:
    return session_pb2.Principal(tenant=tenant, subject=subject, role=role)


async def refused(call: Awaitable[Any], code: grpc.StatusCode) -> str:
    """Await a call that must fail with `code`; its message."""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() is code, error.value.details()
    return error.value.details() or ""


async def poll(predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Wait for `predicate` with a deadline (a loaded machine is slow, never wrong)."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.05)


async def timers_for(live: Live, limits: TimerLimits) -> ConversationTimers:
    """The store arms timers with `limits` from now on; the timers handle those that come due."""
    live.store.schedule = await TimerSchedule.open(live.nc, limits)
    return await ConversationTimers.open(live.nc, live.store, live.metrics)


@contextlib.asynccontextmanager
async def running(timers: ConversationTimers) -> AsyncIterator[None]:
    """The timers' consumer loop for the duration of the block."""
    task = asyncio.create_task(timers.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
