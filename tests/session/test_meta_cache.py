"""Appends trust this process's recent view of a session; another replica's change is still honoured."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.aio.client import Client as NatsClient

from devtools.devstack.nats_server import NatsServer
from services.common.conversation_log import LOG_STREAM, log_subject
from services.common.errors import NotFound
from services.session.conversation import Change
from services.session.errors import Conflict
from services.session.meta_cache import MetaCache
from services.session.models import SessionMeta
from services.session.store import SessionStore
from services.session.tokens import TokenCounter
from tests.session.test_store import AGENT, ALICE


def test_cache_forgets_old_entries_and_keeps_the_newest_revision() -> None:
    meta = SessionMeta("t", "alice", 0.0, 0.0)
    cache = MetaCache(fresh_s=60.0, max_entries=2)
    cache.put("a", meta, 5)
    cache.put("a", meta, 4)  # an older write finishing late does not win
    assert cache.get("a") == (meta, 5)
    cache.put("b", meta, 1)
    cache.put("c", meta, 1)
    assert cache.get("a") is None and len(cache) == 2  # least recently used went first
    stale = MetaCache(fresh_s=0.0)
    stale.put("a", meta, 1)
    assert stale.get("a") is None


async def test_append_after_another_replica_deleted_is_not_found_and_leaves_nothing(
        replicas: tuple[SessionStore, SessionStore], nats_client: NatsClient) -> None:
    first, second = replicas
    created = await first.append(ALICE, "", "user", "hello")
    await first.append(ALICE, created.session_id, "user", "still there?")  # the first replica's view is cached
    await second.delete(ALICE, created.session_id)
    with pytest.raises(NotFound):
        await first.append(ALICE, created.session_id, "user", "after the delete")
    info = await nats_client.jetstream().stream_info(
        LOG_STREAM, subjects_filter=log_subject(ALICE.tenant, created.session_id))
    assert not info.state.subjects  # the refused message did not stay behind


async def test_visitor_message_reopens_what_another_replica_closed(
        replicas: tuple[SessionStore, SessionStore]) -> None:
    first, second = replicas
    created = await first.append(ALICE, "", "user", "hello")
    await second.transition(AGENT, created.session_id, Change("close"))
    again = await first.append(ALICE, created.session_id, "user", "one more question")
    assert again.state.status == "ai"
    assert again.reopened is not None and again.reopened.event is not None
    _, messages = await second.messages(AGENT, created.session_id)
    statuses = [m.state.status for m in messages if m.kind == "state" and m.state is not None]
    assert statuses == ["closed", "ai"]


async def test_conditional_append_sees_a_claim_made_on_another_replica(
        replicas: tuple[SessionStore, SessionStore]) -> None:
    first, second = replicas
    created = await first.append(ALICE, "", "user", "hello")
    version = created.state.version
    await second.transition(AGENT, created.session_id, Change("claim"))
    with pytest.raises(Conflict):
        await first.append(ALICE, created.session_id, "assistant", "a late answer", if_version=version)
    _, messages = await second.messages(AGENT, created.session_id)
    assert [m.content for m in messages if m.role == "assistant"] == []


async def test_claim_on_another_replica_follows_the_log_while_counters_are_on_their_way(
        nats_server: NatsServer, counter: TokenCounter) -> None:
    connections = [await nats.connect(nats_server.url) for _ in range(2)]
    first, second = [await SessionStore.open(nc, counter, max_history=50, max_message_chars=1000, ttl_s=3600,
                                             answer_lease_s=1.0) for nc in connections]
    try:
        created = await first.append(ALICE, "", "user", "hello")
        session_id = created.session_id
        await first.append(ALICE, session_id, "assistant", "Hi!", if_version=created.state.version)
        asked = await first.append(ALICE, session_id, "user", "are you there?")  # its counters wait on `first`
        held = await second.claim_answer(ALICE, session_id, "", "edge-b", 30.0)
        assert not held.granted and held.message_id == asked.message.id and held.held_for_s > 0
        await asyncio.sleep(held.held_for_s + 0.05)  # the storing edge's lease runs out
        taken = await second.claim_answer(ALICE, session_id, "", "edge-b", 30.0)
        assert taken.granted and taken.message_id == asked.message.id
        await first.append(ALICE, session_id, "assistant", "Yes.", if_version=created.state.version)
        paid = await second.claim_answer(ALICE, session_id, "", "edge-c", 30.0)
        assert not paid.granted and paid.message_id == ""  # answered, though `first` has not written it yet
        await first.flush()
        meta = await second.read_meta(ALICE.tenant, session_id)
        assert meta is not None and meta.owed is None and meta.message_count == 4
    finally:
        for store in (first, second):
            await store.close()
        for nc in connections:
            await nc.close()
