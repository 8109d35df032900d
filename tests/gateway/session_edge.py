"""An edge over the real session service (in process, gRPC) and nats-server: the fixtures `session`, `stub` and
`client`, and who says what. Test modules import the fixtures by name."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NatsClient

from devtools.devstack.nats_server import NatsServer
from kefu.session.v1 import session_pb2, session_pb2_grpc
from services.common.grpc_client import internal_channel
from services.session.metrics import SessionMetrics
from services.session.server import SessionServicer, create_server
from services.session.settings import SessionSettings
from services.session.store import SessionStore
from services.session.tokens import CL100K, TokenCounters
from tests.gateway.live_http_support import ClientFactory, EdgeClient, edge_settings, start_edge

INTERNAL_TOKEN = "internal-test-token-0123456789abcdef"
"""The services' bearer credential in these tests (services.common.grpc_client)."""


def who(subject: str, role: str = "visitor", tenant: str = "shop1") -> session_pb2.Principal:
    return session_pb2.Principal(tenant=tenant, subject=subject, role=role)


AGENT = who("agent-1", "agent")


@pytest.fixture
async def session(nats_client: NatsClient) -> AsyncIterator[tuple[session_pb2_grpc.SessionServiceStub, int]]:
    counters = TokenCounters(CL100K)
    settings = SessionSettings(grpc_port=0, internal_token=INTERNAL_TOKEN)
    metrics = SessionMetrics()
    store = await SessionStore.open(nats_client, counters.default_counter, max_history=200, max_message_chars=1000,
                                    ttl_s=3600)
    server, _, port = await create_server(settings, SessionServicer(settings, store, counters, metrics), metrics)
    await server.start()
    try:
        async with internal_channel(f"127.0.0.1:{port}", INTERNAL_TOKEN) as channel:
            yield session_pb2_grpc.SessionServiceStub(channel), port
    finally:
        await server.stop(None)


@pytest.fixture
async def stub(session: tuple[session_pb2_grpc.SessionServiceStub, int]) -> session_pb2_grpc.SessionServiceStub:
    return session[0]


@pytest.fixture
async def client(nats_server: NatsServer, session: tuple[session_pb2_grpc.SessionServiceStub, int],
                 aiohttp_client: ClientFactory) -> EdgeClient:
    return await start_edge(aiohttp_client, edge_settings(nats_server.url, session_addr=f"127.0.0.1:{session[1]}",
                                                   internal_token=INTERNAL_TOKEN))


async def say(stub: session_pb2_grpc.SessionServiceStub, visitor: session_pb2.Principal, text: str,
              session_id: str = "") -> str:
    reply = await stub.Append(session_pb2.AppendRequest(principal=visitor, session_id=session_id, role="user",
                                                        content=text))
    stored: str = reply.session_id  # the generated stub is untyped
    return stored
