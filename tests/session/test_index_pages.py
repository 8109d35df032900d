"""A newest-first page of a status reads the stream's end, not every entry the tenant stored (issue 19)."""

from __future__ import annotations

import asyncio
import uuid

from nats.aio.client import Client as NatsClient

from services.session.index import ConversationIndex, ConversationSummary
from services.session.models import ConversationState, SessionMeta


def meta(tenant: str, status: str, at: float, assignee: str = "") -> SessionMeta:
    return SessionMeta(tenant, f"visitor-{at:g}", at, at, state=ConversationState(status, 2, assignee, since=at))


async def write(index: ConversationIndex, metas: list[SessionMeta]) -> list[str]:
    """Index entries written one after the other (the stream's order is the order of writing)."""
    ids = []
    for entry in metas:
        session_id = uuid.uuid4().hex
        await index.add_new(entry.tenant, session_id, entry)
        ids.append(session_id)
    return ids


def newest(summaries: list[ConversationSummary], limit: int) -> list[str]:
    return [s.session_id for s in sorted(summaries, key=lambda s: s.updated_at, reverse=True)[:limit]]


async def test_a_page_of_a_large_status_holds_its_newest_entries_without_reading_them_all(
        nats_client: NatsClient) -> None:
    index = await ConversationIndex.open(nats_client, ttl_s=3600)
    # 600 closed conversations of shop1, among other statuses and another tenant's entries.
    closed, others = [], []
    for n in range(600):
        closed.append(meta("shop1", "closed", 1000.0 + n))
        others.append(meta("shop2" if n % 2 else "shop1", "ai", 1000.0 + n))
    ids = await write(index, [m for pair in zip(closed, others, strict=True) for m in pair])
    closed_ids = ids[0::2]

    page = await index.newest_in_status("shop1", "closed", 20)

    assert newest(page, 20) == closed_ids[::-1][:20]
    assert 20 <= len(page) < 200  # the end of the stream, not the 600
    assert all(s.tenant == "shop1" and s.state.status == "closed" for s in page)
    everything = await index.in_status("shop1", "closed")
    assert newest(everything, 20) == newest(page, 20) and len(everything) == 600


async def test_a_filtered_page_reads_back_until_it_has_enough_or_the_stream_begins(nats_client: NatsClient) -> None:
    index = await ConversationIndex.open(nats_client, ttl_s=3600)
    held = [meta("shop1", "human", 1.0 + n, assignee="agent-1" if n < 3 else "agent-2") for n in range(400)]
    ids = await write(index, held)

    def of_agent_1(summary: ConversationSummary) -> bool:
        return summary.state.assignee == "agent-1"

    page = await index.newest_in_status("shop1", "human", 10, of_agent_1)
    assert sorted(s.session_id for s in page) == sorted(ids[:3])  # the oldest three, at the stream's start
    assert await index.newest_in_status("shop1", "waiting_human", 10) == []
    assert len(await index.newest_in_status("shop1", "human", 1000)) == 400


async def test_a_page_sees_an_entry_written_while_it_reads(nats_client: NatsClient) -> None:
    index = await ConversationIndex.open(nats_client, ttl_s=3600)
    await write(index, [meta("shop1", "closed", 1.0 + n) for n in range(50)])
    page, late = await asyncio.gather(index.newest_in_status("shop1", "closed", 5),
                                      write(index, [meta("shop1", "closed", 999.0)]))
    again = await index.newest_in_status("shop1", "closed", 5)
    assert late[0] in {s.session_id for s in again}
    assert len(page) >= 5
