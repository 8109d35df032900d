"""bench.scale_bench seeds conversations from several processes in the format the session service reads."""

from __future__ import annotations

import asyncio
from collections import Counter

import nats

from bench.scale_bench import seed_store
from bench.scale_params import LIMITS, SEED_STATUSES, TENANTS
from bench.session_idle import seed
from devtools.devstack.nats_server import NatsServer
from services.session.index import ConversationIndex
from services.session.schedule import TIMERS_STREAM
from services.session.store import META_STREAM


async def _open_streams(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await ConversationIndex.open(nc, ttl_s=LIMITS.retention_s)
    finally:
        await nc.close()
    await seed(url, 0, True, limits=LIMITS)  # the buckets and streams, as the session service makes them


async def _read_back(url: str) -> tuple[dict[str, int], Counter[str], int, int]:
    nc = await nats.connect(url)
    try:
        index = await ConversationIndex.open(nc, ttl_s=LIMITS.retention_s)
        counts = {status: await index.count(status) for status in set(SEED_STATUSES)}
        per_tenant: Counter[str] = Counter()
        for status in set(SEED_STATUSES):
            per_tenant.update(summary.state.status for summary in await index.in_status("t3", status))
        js = nc.jetstream()
        metas = (await js.stream_info(META_STREAM)).state.messages
        timers = (await js.stream_info(TIMERS_STREAM)).state.messages
        return counts, per_tenant, metas, timers
    finally:
        await nc.close()


def test_seed_store_writes_every_conversation_with_its_status_index_and_timers(nats_server: NatsServer) -> None:
    asyncio.run(_open_streams(nats_server.url))
    conversations = 10 * TENANTS  # each tenant gets each entry of SEED_STATUSES once
    seeded = seed_store(nats_server.url, conversations, procs=3)
    assert seeded["conversations"] == conversations and seeded["per_second"] > 0
    counts, per_tenant, metas, timers = asyncio.run(_read_back(nats_server.url))
    expected = Counter(SEED_STATUSES)
    assert counts == {status: TENANTS * n for status, n in expected.items()}
    assert per_tenant == expected
    assert metas == conversations
    # closed: the purge; ai and human: the idle close; waiting_human: the handoff wait and the idle close;
    # plus the backfill's mark, which _open_streams wrote (the seeded timers are armed already).
    assert timers == TENANTS * (len(SEED_STATUSES) + expected["waiting_human"]) + 1
