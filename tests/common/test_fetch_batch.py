"""fetch_batch: a pull subscription's next batch, [] on a quiet stream, and a cancellation never lost to a timeout."""

from __future__ import annotations

import asyncio

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from services.common.nats_client import fetch_batch


async def test_a_batch_comes_back_and_a_quiet_stream_gives_an_empty_one(nats_client: NatsClient) -> None:
    js = nats_client.jetstream()
    await js.add_stream(StreamConfig(name="FETCH_TEST", subjects=["fetch.test.>"]))
    subscription = await js.pull_subscribe("fetch.test.>", durable="reader", stream="FETCH_TEST")
    for n in range(3):
        await js.publish(f"fetch.test.{n}", str(n).encode())

    batch = await fetch_batch(subscription, 10, 2.0)
    for message in batch:
        await message.ack()

    assert [m.data for m in batch] == [b"0", b"1", b"2"]
    assert await fetch_batch(subscription, 10, 0.2) == []


class CancelTurnedIntoTimeout:
    """What nats-py's fetch did under load on Python 3.11: the cancellation of the fetching task, landing as its
    wait timed out, came out as nats' TimeoutError (tests/llm_worker/test_kb_embeddings.py hung on it in CI)."""

    def __init__(self) -> None:
        self.fetches = 0

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        self.fetches += 1
        if self.fetches == 3:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            raise nats.errors.TimeoutError from None
        raise nats.errors.TimeoutError


async def test_a_loop_fetching_until_cancelled_ends_when_the_cancellation_comes_out_as_a_timeout() -> None:
    subscription = CancelTurnedIntoTimeout()

    async def consume() -> None:
        while True:
            await fetch_batch(subscription, 10, 0.01)  # type: ignore[arg-type]  # the fetch is what is tested

    consumer = asyncio.create_task(consume())
    done, _ = await asyncio.wait([consumer], timeout=5.0)

    assert done and consumer.cancelled()
    assert subscription.fetches == 3


async def test_a_timeout_of_a_task_not_being_cancelled_is_an_empty_batch() -> None:
    subscription = CancelTurnedIntoTimeout()
    batches = [await fetch_batch(subscription, 10, 0.01) for _ in range(2)]  # type: ignore[arg-type]
    assert batches == [[], []] and subscription.fetches == 2
