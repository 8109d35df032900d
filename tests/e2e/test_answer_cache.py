"""The answer cache through the real processes: per tenant, first questions only, invalidation."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import aiohttp
import nats

from bench.sse_reader import read_sse
from devtools.devstack.stack import Stack
from kefu.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.grpc_client import internal_channel
from services.common.kv_values import live_values
from tests.e2e.stack_helpers import auth


async def turn(stack: Stack, tenant: str, message: str, session_id: str = "") -> tuple[str, dict[str, Any], str]:
    body: dict[str, object] = {"message": message}
    if session_id:
        body["session_id"] = session_id
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.base_url}/v1/chat", json=body, headers=auth(tenant=tenant)) as response:
            events = [(e.event, e.json()) async for e in read_sse(response)]
    assert events[-1][0] == "done", events
    reply = "".join(data["delta"] for name, data in events if name == "message")
    return reply, events[-1][1], events[0][1]["session_id"]


async def test_cache_serves_a_tenant_its_own_answers_only(kb_stack: Stack) -> None:
    tenant_a, tenant_b = f"cache-a-{secrets.token_hex(4)}", f"cache-b-{secrets.token_hex(4)}"
    reply_a, done_a, _ = await turn(kb_stack, tenant_a, "怎么退货？")
    again_a, done_again, _ = await turn(kb_stack, tenant_a, "怎麼退貨")  # traditional, no punctuation
    reply_b, done_b, _ = await turn(kb_stack, tenant_b, "怎么退货？")
    assert (done_a["cached"], done_again["cached"], done_b["cached"]) == (False, True, False)
    assert again_a == reply_a and reply_b == reply_a  # same FAQ, but B's came from the provider


async def test_cache_never_serves_a_second_turn(kb_stack: Stack) -> None:
    tenant = f"cache-c-{secrets.token_hex(4)}"
    _, _, session_id = await turn(kb_stack, tenant, "你好")
    for _ in range(2):
        _, done, _ = await turn(kb_stack, tenant, "怎么退货？", session_id)
        assert done["cached"] is False


async def test_cache_invalidation_rpc_drops_a_tenants_answers(kb_stack: Stack) -> None:
    tenant = f"cache-d-{secrets.token_hex(4)}"
    await turn(kb_stack, tenant, "多久发货？")
    assert (await turn(kb_stack, tenant, "多久发货？"))[1]["cached"] is True
    async with internal_channel(f"127.0.0.1:{kb_stack.config.ports.worker}", kb_stack.config.internal_token) as channel:
        reply = await llm_pb2_grpc.LlmServiceStub(channel).InvalidateCache(
            llm_pb2.InvalidateCacheRequest(tenant=tenant), timeout=5)
    assert reply.scope == "tenant"
    assert (await turn(kb_stack, tenant, "多久发货？"))[1]["cached"] is False


async def test_cache_invalidation_over_the_nats_subject(kb_stack: Stack) -> None:
    tenant = f"cache-e-{secrets.token_hex(4)}"
    await turn(kb_stack, tenant, "有哪些付款方式？")
    assert (await turn(kb_stack, tenant, "有哪些付款方式？"))[1]["cached"] is True
    nc = await nats.connect(kb_stack.nats_url, max_reconnect_attempts=3, connect_timeout=1)
    try:
        await nc.publish("kefu.cache.invalidate", json.dumps({"tenant": tenant}).encode())
        await nc.flush()
    finally:
        await nc.close()
    deadline = time.monotonic() + 5
    while (await turn(kb_stack, tenant, "有哪些付款方式？"))[1]["cached"]:
        assert time.monotonic() < deadline, "the invalidation message was not acted on"
        await asyncio.sleep(0.05)


async def test_cache_serves_a_paraphrase_its_faq_entrys_answer_and_warms_the_tenant(kb_stack: Stack) -> None:
    tenant, other = f"cache-f-{secrets.token_hex(4)}", f"cache-g-{secrets.token_hex(4)}"
    reply, done, _ = await turn(kb_stack, tenant, "多久发货？")
    paraphrase, done_paraphrase, _ = await turn(kb_stack, tenant, "下单后几天能到")  # another FAQ phrasing
    assert (done["cached"], done_paraphrase["cached"], paraphrase) == (False, True, reply)
    assert (await turn(kb_stack, other, "下单后几天能到"))[1]["cached"] is False  # never across tenants
    # The first turn warmed the tenant: every common question (26 in Chinese) lands in the shared tier,
    # and a paraphrase of an entry nobody asked about yet is then answered from the cache.
    nc = await nats.connect(kb_stack.nats_url, max_reconnect_attempts=3, connect_timeout=1)
    try:
        deadline = time.monotonic() + 60  # warming yields to live traffic: slow on a loaded machine

        async def tenant_keys() -> list[str]:
            return [v.key for v in await live_values(nc.jetstream(), "kefu_cache", f"{tenant}.>", timeout_s=5.0)]

        while len(await tenant_keys()) < 26:
            assert time.monotonic() < deadline, "the tenant's common questions were never pre-generated"
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    assert (await turn(kb_stack, tenant, "支持海外配送吗"))[1]["cached"] is True
