"""The state watch of a streaming answer on a real nats-server: a change heard live, one stored before the watch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import StreamConfig

from gateway.state_watch import StateWatch, newer_state
from services.common.conversation_log import LOG_STREAM, LOG_SUBJECT_PREFIX, log_subject
from services.session.models import ConversationState, StoredMessage

TENANT, CONVERSATION = "shop1", "c" * 32


def message(text: str) -> bytes:
    return StoredMessage(id=text.encode().hex().ljust(32, "0")[:32], role="user", content=text, created_at=1.0,
                         tokens=1).to_json()


def state(version: int, status: str = "human") -> bytes:
    return StoredMessage(id=f"{version:032x}", role="system", content=f"status: {status}", created_at=2.0, tokens=0,
                         kind="state", state=ConversationState(status=status, version=version)).to_json()


@pytest.fixture
async def log(nats_client: NatsClient) -> AsyncIterator[NatsClient]:
    # Direct gets allowed, as the session creates the log (services/session/store.py): the watch reads with them.
    await nats_client.jetstream().add_stream(StreamConfig(name=LOG_STREAM, subjects=[f"{LOG_SUBJECT_PREFIX}.>"],
                                                          allow_direct=True))
    yield nats_client


async def append(nc: NatsClient, data: bytes, conversation: str = CONVERSATION) -> int:
    return (await nc.jetstream().publish(log_subject(TENANT, conversation), data)).seq


async def changed_within(watch: StateWatch, timeout_s: float = 2.0) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            await watch.changed.wait()
    except TimeoutError:
        return False
    return True


def test_newer_state_only_for_state_events_past_the_version() -> None:
    assert newer_state(state(3), 9, 2) and not newer_state(state(2), 9, 2)
    assert not newer_state(message("hi"), 9, 0) and not newer_state(b"not json", 9, 0)


async def test_state_watch_hears_a_claim_made_while_it_runs(log: NatsClient) -> None:
    seq = await append(log, message("question"))
    watch = await StateWatch.start(log, TENANT, CONVERSATION, seq, version=1)
    try:
        await append(log, message("another visitor message"))
        await append(log, state(1, "ai"), conversation="d" * 32)  # another conversation's change
        assert not await changed_within(watch, 0.3)
        await append(log, state(2))
        assert await changed_within(watch)
    finally:
        await watch.stop()


async def test_state_watch_finds_a_claim_stored_before_it_began(log: NatsClient) -> None:
    seq = await append(log, message("question"))
    await append(log, message("typed on"))
    await append(log, state(2))  # claimed between the visitor's message and the watch
    watch = await StateWatch.start(log, TENANT, CONVERSATION, seq, version=1)
    try:
        assert await changed_within(watch)
    finally:
        await watch.stop()


async def test_state_watch_ignores_changes_before_the_answer_began(log: NatsClient) -> None:
    await append(log, state(2))  # the state the answer was started under
    seq = await append(log, message("question"))
    watch = await StateWatch.start(log, TENANT, CONVERSATION, seq, version=2)
    try:
        assert not await changed_within(watch, 0.3)
    finally:
        await watch.stop()


async def test_state_watch_calls_back_once_on_a_change_and_at_once_when_it_came_before(log: NatsClient) -> None:
    seq = await append(log, message("question"))
    watch = await StateWatch.start(log, TENANT, CONVERSATION, seq, version=1)
    calls: list[str] = []
    try:
        watch.on_change(lambda: calls.append("reading"))  # the answer's call, cancelled by a claim
        await append(log, state(2))
        assert await changed_within(watch)
        await append(log, state(3))  # a second change calls nobody again
        await asyncio.sleep(0.2)
        watch.on_change(lambda: calls.append("late"))  # registered after the change: called at once
        assert calls == ["reading", "late"]
    finally:
        await watch.stop()
