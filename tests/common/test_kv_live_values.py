"""live_values reads every stored value of a key pattern, against a real nats-server."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig

from services.common.kv_values import BATCH, live_values


async def test_live_values_reads_every_newest_value_of_the_pattern_and_leaves_deletes_out(
        nats_client: NatsClient) -> None:
    js = nats_client.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket="kv_values_test", history=3))
    count = BATCH * 2 + 7  # more than one fetch
    await asyncio.gather(*(kv.put(f"shop1.k{n}", f"v{n}".encode()) for n in range(count)))
    await kv.put("shop1.k0", b"newer")
    await kv.delete("shop1.k1")
    await kv.purge("shop1.k2")
    await kv.put("shop2.k0", b"another tenant")

    found = await live_values(js, "kv_values_test", "shop1.*", timeout_s=5.0)

    values = {value.key: value.value for value in found}
    assert len(found) == len(values) == count - 2
    assert values["shop1.k0"] == b"newer" and values[f"shop1.k{count - 1}"] == f"v{count - 1}".encode()
    assert "shop1.k1" not in values and "shop1.k2" not in values and "shop2.k0" not in values
    revisions = {value.key: value.revision for value in found}
    assert revisions["shop1.k0"] == (await kv.get("shop1.k0")).revision
    assert await live_values(js, "kv_values_test", "shop9.*", timeout_s=5.0) == []


async def test_live_values_of_many_lists_at_once_are_each_complete(nats_client: NatsClient) -> None:
    """The race a KV watch loses (its end marker ahead of values already delivered) shows under concurrency."""
    js = nats_client.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket="kv_values_busy", history=1))
    await asyncio.gather(*(kv.put(f"t.k{n}", b"x") for n in range(3)))
    lists = await asyncio.gather(*(live_values(js, "kv_values_busy", "t.*", timeout_s=5.0) for _ in range(50)))
    assert [len(found) for found in lists] == [3] * 50
