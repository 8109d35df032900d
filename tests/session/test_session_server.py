"""The session gRPC service on port 0 over a real nats-server: encodings per model, metrics, settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from nats.aio.client import Client as NatsClient

from kefu.session.v1 import session_pb2, session_pb2_grpc
from services.common.grpc_client import internal_channel
from services.common.settings import SettingsError
from services.session.metrics import SessionMetrics
from services.session.server import SessionServicer, create_server
from services.session.settings import SessionSettings
from services.session.store import SessionStore
from services.session.tokens import CL100K, O200K, TokenCounters

DEV = {"KEFU_INTERNAL_AUTH": "off"}
"""Settings read as a dev machine would (no internal token); every other variable as the test names it."""

INTERNAL_TOKEN = "internal-test-token-0123456789abcdef"
"""The services' bearer credential in these tests (services.common.grpc_client)."""

ALICE = session_pb2.Principal(tenant="shop1", subject="alice", role="visitor")
TEXT = "您好，我的订单号是20240518001，快递三天了还没到，请帮我查一下物流状态，谢谢！"


@dataclass
class Service:
    stub: session_pb2_grpc.SessionServiceStub
    metrics: SessionMetrics


@pytest.fixture(scope="module")
def counters() -> TokenCounters:
    loaded = TokenCounters(CL100K)
    loaded.preload(CL100K, O200K)
    return loaded


@pytest.fixture
async def service(nats_client: NatsClient, counters: TokenCounters) -> AsyncIterator[Service]:
    settings = SessionSettings(grpc_port=0, internal_token=INTERNAL_TOKEN)
    metrics = SessionMetrics()
    store = await SessionStore.open(nats_client, counters.default_counter, max_history=50,
                                    max_message_chars=1000, ttl_s=3600)
    server, _, port = await create_server(settings, SessionServicer(settings, store, counters, metrics), metrics)
    await server.start()
    try:
        async with internal_channel(f"127.0.0.1:{port}", INTERNAL_TOKEN) as channel:
            yield Service(session_pb2_grpc.SessionServiceStub(channel), metrics)
    finally:
        await server.stop(None)


async def test_server_build_context_counts_in_the_models_encoding(service: Service) -> None:
    appended = await service.stub.Append(session_pb2.AppendRequest(principal=ALICE, role="user", content=TEXT))
    assert appended.created and appended.message.tokens == 38  # stored in the default, cl100k
    for model, tokens, encoding in (("", 38, CL100K), ("gpt-4o-mini", 28, O200K), ("gpt-4-turbo", 38, CL100K),
                                    ("qwen-plus", 38, CL100K), ("openai/gpt-5", 28, O200K)):
        built = await service.stub.BuildContext(session_pb2.BuildContextRequest(
            principal=ALICE, session_id=appended.session_id, max_tokens=500, model=model))
        assert [m.tokens for m in built.messages] == [tokens], model
        assert built.total_tokens == tokens + 4 and built.user_message_count == 1
        samples = service.metrics.registry.get_sample_value(
            "kefu_session_context_tokens_count", {"encoding": encoding})
        assert samples and samples >= 1
    assert service.metrics.registry.get_sample_value("kefu_sessions_created_total") == 1


async def test_server_budget_cuts_the_newest_message_on_a_character_boundary(service: Service) -> None:
    appended = await service.stub.Append(session_pb2.AppendRequest(principal=ALICE, role="user", content=TEXT))
    built = await service.stub.BuildContext(session_pb2.BuildContextRequest(
        principal=ALICE, session_id=appended.session_id, max_tokens=15, model="gpt-4o",
        system_prompt="You are a shop assistant."))
    assert [m.role for m in built.messages] == ["system", "user"] and built.truncated
    assert built.total_tokens <= 15
    assert TEXT.startswith(built.messages[1].content) and "\ufffd" not in built.messages[1].content


async def test_server_other_visitor_gets_not_found(service: Service) -> None:
    appended = await service.stub.Append(session_pb2.AppendRequest(principal=ALICE, role="user", content="hi"))
    bob = session_pb2.Principal(tenant="shop1", subject="bob", role="visitor")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await service.stub.BuildContext(session_pb2.BuildContextRequest(principal=bob,
                                                                        session_id=appended.session_id))
    assert error.value.code() is grpc.StatusCode.NOT_FOUND


def test_settings_token_encoding_and_ttl_are_checked() -> None:
    assert SessionSettings.load({**DEV, "KEFU_TOKEN_ENCODING": "o200k_base"}).encoding == O200K
    assert SessionSettings.load(DEV).encoding == CL100K
    with pytest.raises(SettingsError, match="KEFU_TOKEN_ENCODING"):
        SessionSettings.load({**DEV, "KEFU_TOKEN_ENCODING": "p50k_base"})
    with pytest.raises(SettingsError, match="KEFU_SESSION_TTL_S"):
        SessionSettings.load({**DEV, "KEFU_SESSION_TTL_S": "5"})
    assert SessionSettings.load({**DEV, "KEFU_SESSION_TTL_S": "60"}).session_ttl_s == 60
