"""The session timers against a real nats-server: wait timeout with a leave-a-message reply, idle close,
several replicas, the conversations gauge, and their settings."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient

from devtools.devstack.nats_server import NatsServer
from services.common.settings import SettingsError
from services.session.metrics import SessionMetrics
from services.session.schedule import TimerLimits, TimerSchedule
from services.session.settings import SessionSettings
from services.session.store import SessionStore
from services.session.timers import DEFAULT_LEAVE_MESSAGE, TENANTS_BUCKET, ConversationTimers
from services.session.tokens import TokenCounters
from tests.session.live_helpers import Live, poll, principal, running, timers_for

DEV = {"KEFU_INTERNAL_AUTH": "off"}
"""Settings read as a dev machine would (no internal token); every other variable as the test names it."""

ALICE = principal("alice")
BOB = principal("bob")
AGENT = principal("agent-1", "agent")
SHOP2_VISITOR = principal("dave", tenant="shop2")


async def status_of(live: Live, session_id: str, tenant: str = "shop1") -> str:
    meta = await live.store.read_meta(tenant, session_id)
    assert meta is not None
    return meta.state.status


@pytest.mark.timeout(30)
async def test_timers_unclaimed_conversation_goes_back_to_the_ai_with_a_leave_message(live: Live) -> None:
    timers = await timers_for(live, TimerLimits(wait_s=1, idle_s=3600, retention_s=3600))  # creates the tenants bucket
    kv = await live.nc.jetstream().key_value(TENANTS_BUCKET)
    await kv.put("shop2", json.dumps({"leave_message": "请留言 / please leave a message"}).encode())
    ours = await live.open_conversation(ALICE)
    theirs = await live.open_conversation(SHOP2_VISITOR)
    await live.transition(ALICE, ours, "handoff")
    await live.transition(SHOP2_VISITOR, theirs, "handoff")
    async with running(timers):
        async def answered() -> bool:
            # The leave message is stored right after the change back to "ai".
            for who, session_id in ((ALICE, ours), (SHOP2_VISITOR, theirs)):
                last = (await live.messages(who, session_id))[-1]
                if (last.role, last.kind) != ("system", "message"):
                    return False
            return True

        await poll(answered, 15, "the wait timeout")
    for who, session_id, text in ((ALICE, ours, DEFAULT_LEAVE_MESSAGE),
                                  (SHOP2_VISITOR, theirs, "请留言 / please leave a message")):
        tail = (await live.messages(who, session_id))[-2:]
        assert [(m.kind, m.role) for m in tail] == [("state", "system"), ("message", "system")]
        assert (tail[0].state.status, tail[0].state.reason, tail[1].content) == ("ai", "wait_timeout", text)
    assert not live.metrics.registry.get_sample_value("kefu_queue_wait_seconds_count")


@pytest.mark.timeout(30)
async def test_timers_idle_conversations_are_closed(live: Live) -> None:
    timers = await timers_for(live, TimerLimits(wait_s=3600, idle_s=1, retention_s=3600))
    in_ai = await live.open_conversation(ALICE)
    held = await live.open_conversation(BOB)
    await live.transition(AGENT, held, "claim")

    async def both_closed() -> bool:
        await timers.sweep()
        return await status_of(live, in_ai) == "closed" and await status_of(live, held) == "closed"

    await poll(both_closed, 15, "the idle close")
    for session_id in (in_ai, held):
        event = (await live.messages(AGENT, session_id))[-1]
        assert (event.kind, event.state.status, event.state.reason) == ("state", "closed", "idle")


async def test_timers_leave_recent_conversations_alone(live: Live) -> None:
    timers = await timers_for(live, TimerLimits(wait_s=3600, idle_s=3600, retention_s=3600))
    waiting = await live.open_conversation(ALICE)
    await live.transition(ALICE, waiting, "handoff")
    in_ai = await live.open_conversation(BOB)
    result = await timers.sweep()
    assert (result.timed_out, result.closed) == (0, 0)
    assert (await status_of(live, waiting), await status_of(live, in_ai)) == ("waiting_human", "ai")


@pytest.fixture
async def second_store(nats_server: NatsServer, live_counters: TokenCounters) -> AsyncIterator[SessionStore]:
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=3, reconnect_time_wait=0.2, connect_timeout=1)
    try:
        yield await SessionStore.open(nc, live_counters.default_counter, max_history=200, max_message_chars=1000,
                                      ttl_s=3600)
    finally:
        await nc.close()


@pytest.mark.timeout(30)
async def test_timers_two_replicas_sweeping_act_once(live: Live, second_store: SessionStore,
                                                    nats_client: NatsClient) -> None:
    one = await timers_for(live, TimerLimits(wait_s=0.5, idle_s=3600, retention_s=3600))
    second_store.schedule = await TimerSchedule.open(nats_client, TimerLimits(0.5, 3600, 3600))
    other = await ConversationTimers.open(nats_client, second_store, SessionMetrics())
    session_ids = []
    for visitor in (ALICE, BOB, principal("carol")):
        session_id = await live.open_conversation(visitor)
        await live.transition(visitor, session_id, "handoff")
        session_ids.append(session_id)

    async def all_waited() -> bool:
        return all(s.state.since + 0.5 <= time.time()
                   for s in await live.store.index.in_status("shop1", "waiting_human"))

    await poll(all_waited, 10, "the wait limit")
    first, second = await asyncio.gather(one.sweep(), other.sweep())
    assert first.timed_out + second.timed_out == 3
    for session_id in session_ids:
        messages = await live.messages(AGENT, session_id)
        assert [m.state.reason for m in messages if m.kind == "state"] == ["visitor", "wait_timeout"]
        assert [m.content for m in messages if m.role == "system" and m.kind == "message"] == [DEFAULT_LEAVE_MESSAGE]


async def test_timers_sweep_sets_the_conversations_gauge(live: Live) -> None:
    timers = await timers_for(live, TimerLimits(wait_s=3600, idle_s=3600, retention_s=3600))
    for visitor in (ALICE, BOB):
        await live.transition(visitor, await live.open_conversation(visitor), "handoff")
    await live.transition(AGENT, await live.open_conversation(principal("carol")), "close")
    await live.open_conversation(SHOP2_VISITOR)
    await timers.sweep()
    counts = {status: live.metrics.registry.get_sample_value("kefu_conversations", {"status": status})
              for status in ("ai", "waiting_human", "human", "closed")}
    assert counts == {"ai": 1, "waiting_human": 2, "human": 0, "closed": 1}


def test_timers_settings_and_the_closed_retention() -> None:
    defaults = SessionSettings.load(DEV)
    assert (defaults.handoff_wait_s, defaults.idle_close_s, defaults.retention_s) == (120, 600, 7 * 24 * 3600)
    short = SessionSettings.load({**DEV, "KEFU_HANDOFF_WAIT_S": "1", "KEFU_IDLE_CLOSE_S": "2",
                                      "KEFU_CLOSED_RETENTION_S": "86400"})
    assert (short.handoff_wait_s, short.idle_close_s, short.retention_s) == (1, 2, 86400)
    assert SessionSettings.load({**DEV, "KEFU_SESSION_TTL_S": "3600"}).retention_s == 3600
    for name in ("KEFU_HANDOFF_WAIT_S", "KEFU_IDLE_CLOSE_S"):
        with pytest.raises(SettingsError, match=name):
            SessionSettings.load({**DEV, name: "0"})
    for retention in ("30", "-1", str(8 * 24 * 3600)):  # below a minute, negative, beyond the TTL
        with pytest.raises(SettingsError, match="KEFU_CLOSED_RETENTION_S"):
            SessionSettings.load({**DEV, "KEFU_CLOSED_RETENTION_S": retention})


async def test_timers_leave_message_falls_back_to_the_default(live: Live) -> None:
    timers = await timers_for(live, TimerLimits(wait_s=3600, idle_s=3600, retention_s=3600))
    kv = await live.nc.jetstream().key_value(TENANTS_BUCKET)
    await kv.put("broken", b"not json")
    await kv.put("empty", b"{}")
    await kv.put("custom", json.dumps({"leave_message": "Leave a note"}).encode())
    texts = [await timers.leave_message(t) for t in ("unknown", "broken", "empty", "custom")]
    assert texts == [DEFAULT_LEAVE_MESSAGE] * 3 + ["Leave a note"]

