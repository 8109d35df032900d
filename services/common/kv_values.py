"""Every live value of a KV bucket under a key pattern, read so that none already stored is missed."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

DELETE_OPERATIONS = frozenset({"DEL", "PURGE"})
BATCH = 256


@dataclass(frozen=True, slots=True)
class KvValue:
    key: str
    value: bytes
    revision: int


async def live_values(js: JetStreamContext, bucket: str, key_pattern: str, *, timeout_s: float) -> list[KvValue]:
    """The newest value of every key of `bucket` matching `key_pattern` ("shop1.*"), deleted keys left out.

    Read with a one-shot pull consumer whose pending count is exact before anything is delivered. A KV
    watch's "no more values" marker can come before values already on their way (nats-py decides it from
    a consumer info taken after delivery began): a list read that way can come back short or empty.
    """
    prefix = f"$KV.{bucket}."
    consumer = await js.pull_subscribe(
        prefix + key_pattern, stream=f"KV_{bucket}",
        config=ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_policy=AckPolicy.NONE,
                              inactive_threshold=5.0, mem_storage=True))
    found: list[KvValue] = []
    try:
        remaining = (await consumer.consumer_info()).num_pending or 0  # None only from a server too old to count
        async with asyncio.timeout(timeout_s):
            while remaining > 0:
                for message in await consumer.fetch(min(remaining, BATCH), timeout=timeout_s):
                    remaining = message.metadata.num_pending
                    headers = message.headers or {}
                    if headers.get("KV-Operation") in DELETE_OPERATIONS or "Nats-Marker-Reason" in headers:
                        continue  # a delete, a purge or a server-placed expiry marker
                    found.append(KvValue(message.subject[len(prefix):], message.data,
                                         message.metadata.sequence.stream))
    finally:
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await consumer.unsubscribe()
    return found
