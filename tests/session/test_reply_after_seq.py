"""A reply stored right after the message it answers (`after_seq`): one conditional write to the log,
no second read of the state; anything stored in between sends it through the full check."""

from __future__ import annotations

import dataclasses

import pytest
from nats.aio.client import Client as NatsClient

from services.session.conversation import Change
from services.session.errors import Conflict
from services.session.models import SessionMeta
from services.session.store import META_BUCKET, SessionStore, meta_key
from tests.session.test_store import AGENT, ALICE


async def bump_version_without_an_event(nc: NatsClient, session_id: str) -> None:
    """What a state change has written in the instant before its event reaches the log: the metadata only."""
    kv = await nc.jetstream().key_value(META_BUCKET)
    entry = await kv.get(meta_key(ALICE.tenant, session_id))
    assert entry.value is not None and entry.revision is not None
    meta = SessionMeta.from_json(entry.value)
    bumped = dataclasses.replace(meta, state=dataclasses.replace(meta.state, version=meta.state.version + 1))
    await kv.update(meta_key(ALICE.tenant, session_id), bumped.to_json(), last=entry.revision)


async def assistant_texts(store: SessionStore, session_id: str) -> list[str]:
    _, messages = await store.messages(AGENT, session_id)
    return [m.content for m in messages if m.role == "assistant"]


async def test_a_reply_right_after_its_question_is_stored_on_the_log_alone(
        replicas: tuple[SessionStore, SessionStore], nats_client: NatsClient) -> None:
    first, _ = replicas
    for after_seq, expected in ((True, ["stored"]), (False, [])):
        asked = await first.append(ALICE, "", "user", "hello")
        session_id, version = asked.session_id, asked.state.version
        # The metadata moved but the log did not: the check without `after_seq` reads the state and refuses;
        # with it, the log alone decides (any change's event would come after the reply: the reply was first).
        await bump_version_without_an_event(nats_client, session_id)
        try:
            stored = await first.append(ALICE, session_id, "assistant", "stored", if_version=version,
                                        after_seq=asked.message.seq if after_seq else 0)
            assert stored.message.seq > asked.message.seq
        except Conflict:
            assert not after_seq
        assert await assistant_texts(first, session_id) == expected, after_seq


async def test_a_claim_stored_after_the_question_still_voids_the_reply(
        replicas: tuple[SessionStore, SessionStore]) -> None:
    first, second = replicas
    asked = await first.append(ALICE, "", "user", "hello")
    await second.transition(AGENT, asked.session_id, Change("claim"))  # first's view of it is cached, stale
    with pytest.raises(Conflict):
        await first.append(ALICE, asked.session_id, "assistant", "too late", if_version=asked.state.version,
                           after_seq=asked.message.seq)
    assert await assistant_texts(second, asked.session_id) == []


async def test_a_message_in_between_takes_the_full_check_and_the_reply_is_stored(
        replicas: tuple[SessionStore, SessionStore]) -> None:
    first, second = replicas
    asked = await first.append(ALICE, "", "user", "hello")
    again = await second.append(ALICE, asked.session_id, "user", "hello?")
    reply = await first.append(ALICE, asked.session_id, "assistant", "Hi!", if_version=asked.state.version,
                               after_seq=asked.message.seq)
    assert reply.message.seq > again.message.seq
    assert await assistant_texts(first, asked.session_id) == ["Hi!"]


async def test_a_retried_reply_is_stored_once(replicas: tuple[SessionStore, SessionStore]) -> None:
    first, _ = replicas
    asked = await first.append(ALICE, "", "user", "hello")
    message_id = "ab" * 16
    stored = [await first.append(ALICE, asked.session_id, "assistant", "Hi!", message_id=message_id,
                                 if_version=asked.state.version, after_seq=asked.message.seq) for _ in range(2)]
    assert not stored[0].duplicate and stored[1].duplicate
    assert stored[1].message.seq == stored[0].message.seq
    assert await assistant_texts(first, asked.session_id) == ["Hi!"]
