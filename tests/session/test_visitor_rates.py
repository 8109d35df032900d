"""A visitor's message rate on a real nats-server (issue 20 item 5): taken from this process's view without a
round trip, written behind at most once per FLUSH_S per visitor, merged across replicas."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from devtools.devstack.nats_server import NatsServer
from services.session import limits
from services.session.errors import RateLimited
from services.session.limits import FLUSH_S, RATES_BUCKET, VisitorRates

STREAM = f"KV_{RATES_BUCKET}"


@pytest.fixture
async def second_client(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    """Another session replica's connection."""
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=3, reconnect_time_wait=0.2, connect_timeout=1)
    try:
        yield nc
    finally:
        await nc.close()


async def bucket_kv(nc: NatsClient) -> KeyValue:
    return await nc.jetstream().key_value(RATES_BUCKET)


async def stored_tokens(nc: NatsClient, tenant: str, visitor: str) -> float:
    entry = await (await bucket_kv(nc)).get(VisitorRates.key(tenant, visitor))
    assert entry.value is not None
    tokens: float = json.loads(entry.value)["tokens"]
    return tokens


async def writes(nc: NatsClient) -> int:
    """Every write the bucket ever took (its stream's last sequence: history 1 keeps only the last)."""
    return (await nc.jetstream().stream_info(STREAM)).state.last_seq


async def admitted(rates: VisitorRates, tenant: str, visitor: str, at_most: int) -> int:
    """Takes until the first refusal (at most `at_most`): how many were admitted."""
    for n in range(at_most):
        try:
            await rates.take(tenant, visitor)
        except RateLimited:
            return n
    return at_most


async def test_rates_a_burst_on_one_replica_is_the_burst_without_a_write(nats_client: NatsClient) -> None:
    rates = await VisitorRates.open(nats_client, rate=0.5, burst=4)
    assert await admitted(rates, "shop1", "alice", 10) == 4
    with pytest.raises(RateLimited) as refused:
        await rates.take("shop1", "alice")
    assert refused.value.retry_after_s == 2  # one token at 0.5/s
    assert await writes(nats_client) == 0  # nothing written in the messages' path
    await rates.flush()
    assert await writes(nats_client) == 1  # one write for the whole burst
    assert await stored_tokens(nats_client, "shop1", "alice") == pytest.approx(0, abs=0.1)
    await rates.take("shop1", "bob")  # another visitor has a bucket of its own
    await rates.take("shop2", "alice")  # and so does the same sub in another tenant


async def test_rates_racing_takes_on_one_replica_never_exceed_the_burst(nats_client: NatsClient) -> None:
    rates = await VisitorRates.open(nats_client, rate=0.001, burst=5)
    results = await asyncio.gather(*(rates.take("shop1", "racer") for _ in range(12)), return_exceptions=True)
    assert sum(1 for r in results if r is None) == 5
    assert all(isinstance(r, RateLimited) for r in results if r is not None)


async def test_rates_a_stream_of_takes_writes_the_key_at_most_once_a_flush(nats_client: NatsClient) -> None:
    rates = await VisitorRates.open(nats_client, rate=0.001, burst=100_000)
    written_at: list[float] = []

    async def seen(_: Msg) -> None:
        written_at.append(time.monotonic())

    watch = await nats_client.subscribe(f"$KV.{RATES_BUCKET}.>", cb=seen)
    flusher = asyncio.create_task(rates.run())
    takes = 0
    try:
        started = time.monotonic()
        while time.monotonic() - started < 3.5 * FLUSH_S:
            await rates.take("shop1", "chatty")
            takes += 1
            await asyncio.sleep(0.005)
    finally:
        flusher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flusher
        await nats_client.flush()
        await watch.unsubscribe()
    assert takes > 200
    # 3 flushes while taking, and the last one on stopping; never two writes within a flush period.
    assert 3 <= len(written_at) <= 5
    assert all(b - a > FLUSH_S * 0.5 for a, b in zip(written_at, written_at[1:-1], strict=False))
    assert await writes(nats_client) == len(written_at)
    assert await stored_tokens(nats_client, "shop1", "chatty") == pytest.approx(100_000 - takes, abs=1)


async def test_rates_a_second_replica_merges_what_the_first_took(nats_client: NatsClient,
                                                                  second_client: NatsClient) -> None:
    first, second = [await VisitorRates.open(nc, rate=0.001, burst=5) for nc in (nats_client, second_client)]
    assert await admitted(first, "shop1", "alice", 10) == 5
    await first.flush()
    # The second replica never saw the visitor: it assumes a new one's full bucket (no read) and admits
    # from it until its write merges the first's tokens, within the documented overshoot (one burst).
    overshoot = await admitted(second, "shop1", "alice", 10)
    assert overshoot <= 5
    await second.flush()
    with pytest.raises(RateLimited) as refused:
        await second.take("shop1", "alice")
    # The excess is a debt of the shared bucket (down to -burst): the visitor waits it off.
    assert refused.value.retry_after_s >= (1 + overshoot) / 0.001 - 1
    assert await stored_tokens(nats_client, "shop1", "alice") == pytest.approx(max(-5, -overshoot), abs=0.01)
    with pytest.raises(RateLimited):
        await first.take("shop1", "alice")  # its own view is empty: a stale view's refusal stands


async def test_rates_a_replica_that_knew_the_visitor_merges_on_its_next_write(nats_client: NatsClient,
                                                                             second_client: NatsClient) -> None:
    first, second = [await VisitorRates.open(nc, rate=0.001, burst=6) for nc in (nats_client, second_client)]
    await first.take("shop1", "alice")
    await first.flush()
    assert await admitted(second, "shop1", "alice", 3) == 3
    await second.flush()  # read and merged: 6 - 1 - 3
    assert await stored_tokens(nats_client, "shop1", "alice") == pytest.approx(2, abs=0.01)
    assert await admitted(first, "shop1", "alice", 1) == 1  # its view (5 left) misses the second's three
    await first.flush()  # its write loses the race, reads and merges: 2 - 1
    assert await stored_tokens(nats_client, "shop1", "alice") == pytest.approx(1, abs=0.01)
    assert await admitted(first, "shop1", "alice", 10) == 1  # and now it answers from the merged bucket


async def test_rates_an_evicted_view_keeps_its_unwritten_tokens(nats_client: NatsClient,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_CACHED", 2)
    rates = await VisitorRates.open(nats_client, rate=0.001, burst=3)
    assert await admitted(rates, "shop1", "alice", 3) == 3
    await rates.take("shop1", "bob")
    await rates.take("shop1", "carol")  # alice's view is evicted, her tokens are not
    assert await admitted(rates, "shop1", "alice", 1) == 0
    await rates.take("shop1", "dave")
    await rates.take("shop1", "erin")  # evicted again, still unwritten
    await rates.flush()
    assert await stored_tokens(nats_client, "shop1", "alice") == pytest.approx(0, abs=0.01)
    for visitor in ("bob", "carol", "dave", "erin"):
        assert await stored_tokens(nats_client, "shop1", visitor) == pytest.approx(2, abs=0.01)


async def test_rates_a_stopping_process_writes_its_unwritten_tokens(nats_client: NatsClient) -> None:
    rates = await VisitorRates.open(nats_client, rate=0.001, burst=5)
    flusher = asyncio.create_task(rates.run())
    await asyncio.sleep(0)  # the flusher is waiting for its first period
    for _ in range(3):
        await rates.take("shop1", "leaving")
    flusher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flusher
    assert await stored_tokens(nats_client, "shop1", "leaving") == pytest.approx(2, abs=0.01)


async def test_rates_a_full_store_refuses_no_message_and_writes_later(nats_client: NatsClient,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    rates = await VisitorRates.open(nats_client, rate=0.001, burst=2)
    await rates.take("shop1", "alice")
    await rates.flush()
    js = nats_client.jetstream()
    info = await js.stream_info(STREAM)
    info.config.max_msgs = 1  # full: a new key is refused
    await js.update_stream(info.config)
    await rates.take("shop1", "bob")
    with caplog.at_level(logging.WARNING, logger=limits.__name__):
        await rates.flush()
    assert "1 of 1 keys not written" in caplog.text
    assert "bob" not in caplog.text
    assert await admitted(rates, "shop1", "bob", 5) == 1  # the view still limits
    info.config.max_msgs = -1
    await js.update_stream(info.config)
    await rates.flush()  # the refused write, tried again
    assert await stored_tokens(nats_client, "shop1", "bob") == pytest.approx(0, abs=0.01)
