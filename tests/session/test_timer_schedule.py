"""Timers by due time on a real nats-server (issue 19): message schedules fire once at their time, re-arming
replaces and purging cancels; open conversations cost no reads; idle close re-arms on activity; closed
conversations are purged after their retention, unless reopened."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from kefu.session.v1 import session_pb2
from services.common.conversation_log import LOG_STREAM, log_subject
from services.session.backfill import arm_stored
from services.session.models import ConversationState, SessionMeta
from services.session.schedule import (
    DUE_PREFIX,
    IDLE,
    SCHEDULE_PREFIX,
    TIMERS_STREAM,
    WAIT,
    DueTimer,
    TimerLimits,
    TimerSchedule,
)
from services.session.timers import ConversationTimers, SweepResult
from tests.session.live_helpers import Live, poll, principal, refused, running, timers_for

ALICE = principal("alice")
AGENT = principal("agent-1", "agent")


def sample(live: Live, name: str, **labels: str) -> float:
    return live.metrics.registry.get_sample_value(name, labels or None) or 0.0


async def status_of(live: Live, session_id: str) -> str | None:
    meta = await live.store.read_meta("shop1", session_id)
    return None if meta is None else meta.state.status


async def has_message(nc: NatsClient, stream: str, subject: str) -> bool:
    try:
        await nc.jetstream().get_last_msg(stream, subject)
    except NotFoundError:
        return False
    return True


async def test_schedule_fires_once_at_the_due_time_rearming_replaces_and_purging_cancels(
        nats_client: NatsClient) -> None:
    schedule = await TimerSchedule.open(nats_client, TimerLimits(wait_s=0.6, idle_s=1.2, retention_s=60))
    js = nats_client.jetstream()
    await js.add_consumer(TIMERS_STREAM, ConsumerConfig(durable_name="probe", filter_subject=f"{DUE_PREFIX}.>",
                                                        ack_policy=AckPolicy.EXPLICIT))
    due = await js.pull_subscribe_bind("probe", stream=TIMERS_STREAM)
    start = time.time()
    meta = SessionMeta("shop1", "alice", start, start, state=ConversationState("waiting_human", 2, since=start))
    await schedule.arm(WAIT, "shop1", "a" * 32, meta)
    await schedule.arm(IDLE, "shop1", "a" * 32, meta)
    later = SessionMeta("shop1", "alice", start, start + 0.6, state=meta.state)
    await schedule.arm(IDLE, "shop1", "a" * 32, later)  # replaces the first: due at start + 1.8
    await schedule.arm(WAIT, "shop1", "b" * 32, meta)
    await schedule.cancel("shop1", "b" * 32)  # never fires
    fired: list[tuple[DueTimer, float]] = []
    while time.time() < start + 3.0:
        with contextlib.suppress(TimeoutError):
            for message in await due.fetch(10, timeout=0.5):
                fired.append((DueTimer.from_message(message.subject, message.data), time.time() - start))
                await message.ack()
    assert [(t.timer, t.session_id, t.version, t.updated_at, t.owner) for t, _ in fired] == [
        (WAIT, "a" * 32, 2, start, "alice"), (IDLE, "a" * 32, 2, start + 0.6, "alice")]
    assert 0.6 <= fired[0][1] < 1.5 and 1.8 <= fired[1][1] < 2.7
    # Fired schedules and acknowledged due timers leave nothing behind (work-queue retention).
    assert (await js.stream_info(TIMERS_STREAM)).state.messages == 0


@pytest.mark.timeout(60)
async def test_timers_read_only_the_conversations_that_come_due(live: Live) -> None:
    timers = await timers_for(live, TimerLimits(wait_s=3600, idle_s=3600, retention_s=3600))
    waiting = []
    for n in range(40):
        visitor = principal(f"visitor-{n}")
        session_id = await live.open_conversation(visitor)
        if n % 4 == 0:
            await live.transition(visitor, session_id, "handoff")
            waiting.append(session_id)
    async with running(timers):
        await asyncio.sleep(2.0)
        # Forty open conversations, ten in the queue, a replica running: nothing read, nothing fired.
        assert sample(live, "kefu_session_timer_reads_total") == 0
        assert sample(live, "kefu_conversations", status="ai") == 30
        live.store.schedule = TimerSchedule(live.nc, TimerLimits(wait_s=3600, idle_s=0.5, retention_s=3600))
        short = [await live.open_conversation(principal(f"short-{n}")) for n in range(3)]

        async def handled() -> bool:
            return sample(live, "kefu_session_timers_total", timer="idle", result="acted") == 3

        await poll(handled, 20, "the idle close of the three short conversations")
    assert sample(live, "kefu_session_timer_reads_total") == 3
    assert {await status_of(live, s) for s in short} == {"closed"}
    assert {await status_of(live, s) for s in waiting} == {"waiting_human"}


@pytest.mark.timeout(60)
async def test_timers_idle_close_rearms_while_the_conversation_is_active(live: Live) -> None:
    timers = await timers_for(live, TimerLimits(wait_s=3600, idle_s=1.0, retention_s=3600))
    session_id = await live.open_conversation(ALICE)
    async with running(timers):
        for n in range(8):
            await asyncio.sleep(0.4)
            await live.stub.Append(session_pb2.AppendRequest(principal=ALICE, session_id=session_id, role="user",
                                                             content=f"still here {n}"))
        assert await status_of(live, session_id) == "ai"
        assert sample(live, "kefu_session_timers_total", timer="idle", result="rearmed") >= 2
        # The re-arm also brought the index entry up to the newest event.
        meta = await live.store.read_meta("shop1", session_id)
        assert meta is not None
        [entry] = await live.store.index.in_status("shop1", "ai")
        assert entry.updated_at >= meta.updated_at - 1.0

        async def closed() -> bool:  # counted once the close is stored whole
            return sample(live, "kefu_session_timers_total", timer="idle", result="acted") == 1

        await poll(closed, 15, "the idle close once the visitor went quiet")
    assert await status_of(live, session_id) == "closed"
    event = (await live.messages(AGENT, session_id))[-1]
    assert (event.kind, event.state.reason) == ("state", "idle")


@pytest.mark.timeout(60)
async def test_timers_purge_a_closed_conversation_after_its_retention(live: Live) -> None:
    timers = await timers_for(live, TimerLimits(wait_s=3600, idle_s=3600, retention_s=1.0))
    session_id = await live.open_conversation(ALICE)
    kept = await live.open_conversation(principal("bob"))
    await live.transition(AGENT, session_id, "close")
    assert await has_message(live.nc, LOG_STREAM, log_subject("shop1", session_id))
    async with running(timers):
        async def purged() -> bool:  # counted once every part is gone
            return sample(live, "kefu_session_timers_total", timer="purge", result="acted") == 1

        await poll(purged, 15, "the purge after the retention")
    assert await live.store.read_meta("shop1", session_id) is None
    assert not await has_message(live.nc, LOG_STREAM, log_subject("shop1", session_id))
    assert await live.store.index.in_status("shop1", "closed") == []
    assert await live.store.index.sessions_of_visitor("shop1", "alice") == []
    assert not await has_message(live.nc, TIMERS_STREAM, f"{SCHEDULE_PREFIX}.{IDLE}.shop1.{session_id}")
    await refused(live.stub.ListMessages(session_pb2.ListMessagesRequest(principal=ALICE, session_id=session_id)),
                  grpc.StatusCode.NOT_FOUND)
    # Only the closed one: the open conversation and its messages stay.
    assert await status_of(live, kept) == "ai"
    assert await has_message(live.nc, LOG_STREAM, log_subject("shop1", kept))


@pytest.mark.timeout(60)
async def test_timers_purge_spares_a_conversation_reopened_since(live: Live) -> None:
    timers = await timers_for(live, TimerLimits(wait_s=3600, idle_s=3600, retention_s=1.5))
    session_id = await live.open_conversation(ALICE)
    await live.transition(AGENT, session_id, "close")
    await live.open_conversation(ALICE)  # a new one, nothing to do with it
    await live.stub.Append(session_pb2.AppendRequest(principal=ALICE, session_id=session_id, role="user",
                                                     content="one more question"))
    async with running(timers):
        async def purge_fired() -> bool:
            return sample(live, "kefu_session_timers_total", timer="purge", result="skipped") == 1

        await poll(purge_fired, 15, "the purge timer of the reopened conversation")
    assert await status_of(live, session_id) == "ai"
    assert [m.content for m in await live.messages(ALICE, session_id) if m.role == "user"] == [
        "hello", "one more question"]


@pytest.mark.timeout(60)
async def test_timers_wait_timeout_skips_a_conversation_claimed_in_time(live: Live) -> None:
    timers = await timers_for(live, TimerLimits(wait_s=1.0, idle_s=3600, retention_s=3600))
    session_id = await live.open_conversation(ALICE)
    await live.transition(ALICE, session_id, "handoff")
    await live.transition(AGENT, session_id, "claim")
    async with running(timers):
        async def wait_fired() -> bool:
            return sample(live, "kefu_session_timers_total", timer="wait", result="skipped") == 1

        await poll(wait_fired, 15, "the wait timer of the claimed conversation")
    assert await status_of(live, session_id) == "human"


async def test_deleting_a_conversation_cancels_its_timers(live: Live) -> None:
    await timers_for(live, TimerLimits(wait_s=3600, idle_s=3600, retention_s=3600))
    session_id = await live.open_conversation(ALICE)
    await live.transition(ALICE, session_id, "handoff")
    subjects = [f"{SCHEDULE_PREFIX}.{timer}.shop1.{session_id}" for timer in (WAIT, IDLE)]
    assert [await has_message(live.nc, TIMERS_STREAM, s) for s in subjects] == [True, True]
    await live.stub.DeleteSession(session_pb2.DeleteSessionRequest(principal=ALICE, session_id=session_id))
    assert [await has_message(live.nc, TIMERS_STREAM, s) for s in subjects] == [False, False]


@pytest.mark.timeout(60)
async def test_conversations_stored_before_the_timers_get_theirs_armed_once(live: Live) -> None:
    # The store arms nothing here, as before timers were schedules.
    old = [await live.open_conversation(principal(f"old-{n}")) for n in range(5)]
    await live.transition(principal("old-0"), old[0], "handoff")
    schedule = await TimerSchedule.open(live.nc, TimerLimits(wait_s=3600, idle_s=0.5, retention_s=3600))
    meta = await live.store.read_meta("shop1", old[1])
    assert meta is not None
    # Armed meanwhile by a replica that already schedules: the backfill leaves it in place.
    await TimerSchedule(live.nc, TimerLimits(3600, 3600, 3600)).arm(IDLE, "shop1", old[1], meta)
    assert await arm_stored(live.nc, schedule) == 5
    assert await arm_stored(live.nc, schedule) == 0  # marked done: a later start reads nothing
    live.store.schedule = schedule
    async with running(await ConversationTimers.open(live.nc, live.store, live.metrics)):
        async def closed() -> bool:
            return {await status_of(live, s) for s in old[:1] + old[2:]} == {"closed"}

        await poll(closed, 20, "the idle close of the conversations stored before")
    assert await status_of(live, old[1]) == "ai"


async def test_a_malformed_due_timer_is_dropped_not_retried(live: Live) -> None:
    timers = await timers_for(live, TimerLimits(wait_s=3600, idle_s=3600, retention_s=3600))
    subject = f"{DUE_PREFIX}.{IDLE}.shop1.{'c' * 32}"
    await live.nc.jetstream().publish(subject, b"not json")
    assert await timers.sweep() == SweepResult()
    assert sample(live, "kefu_session_timers_total", timer="unknown", result="failed") == 1
    assert not await has_message(live.nc, TIMERS_STREAM, subject)
    assert await timers.sweep() == SweepResult()
    assert sample(live, "kefu_session_timers_total", timer="unknown", result="failed") == 1
