"""The shared settings helpers for secrets: the internal token, the JWT secret's length, NATS credentials."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import CollectorRegistry

from services.common.grpc_client import internal_channel, internal_metadata
from services.common.grpc_server import create_grpc_server
from services.common.nats_client import NatsEndpoint, redacted
from services.common.settings import SettingsError, internal_token, nats_url

TOKEN = "t" * 32


def test_internal_token_is_required_unless_turned_off_explicitly() -> None:
    assert internal_token({"KEFU_INTERNAL_TOKEN": TOKEN}) == TOKEN
    assert internal_token({"KEFU_INTERNAL_AUTH": "off"}) == ""
    with pytest.raises(SettingsError, match="^KEFU_INTERNAL_TOKEN is not set"):
        internal_token({})
    with pytest.raises(SettingsError, match="^KEFU_INTERNAL_TOKEN is too short: 31 bytes"):
        internal_token({"KEFU_INTERNAL_TOKEN": TOKEN[:-1]})
    with pytest.raises(SettingsError, match="KEFU_INTERNAL_AUTH=off contradicts"):
        internal_token({"KEFU_INTERNAL_AUTH": "off", "KEFU_INTERNAL_TOKEN": TOKEN})
    with pytest.raises(SettingsError, match="^KEFU_INTERNAL_AUTH must be required or off"):
        internal_token({"KEFU_INTERNAL_AUTH": "maybe", "KEFU_INTERNAL_TOKEN": TOKEN})


def test_nats_credentials_ride_in_the_url_and_come_out_intact() -> None:
    password = "p@ss:w/rd%?#"  # every character a URL would misread
    url = nats_url({"KEFU_NATS_URL": "nats://n1:4222,nats://n2:4222", "KEFU_NATS_USER": "edge",
                    "KEFU_NATS_PASSWORD": password})
    endpoint = NatsEndpoint.parse(url)
    assert (endpoint.servers, endpoint.user, endpoint.password) == (("nats://n1:4222", "nats://n2:4222"), "edge",
                                                                     password)
    assert endpoint.inbox_prefix == "_INBOX.edge"
    assert password not in repr(endpoint) and password not in redacted(url) and "edge" in redacted(url)
    assert NatsEndpoint.parse("nats://127.0.0.1:4222").inbox_prefix == "_INBOX"


@pytest.mark.parametrize(("env", "message"), [
    ({"KEFU_NATS_USER": "edge"}, "must be set together"),
    ({"KEFU_NATS_PASSWORD": "x"}, "must be set together"),
    ({"KEFU_NATS_USER": "edge.x", "KEFU_NATS_PASSWORD": "x"}, "KEFU_NATS_USER must be"),
    ({"KEFU_NATS_URL": "nats://a:b@h:1", "KEFU_NATS_USER": "edge", "KEFU_NATS_PASSWORD": "x"}, "use one"),
])
def test_bad_nats_credentials_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        nats_url(env)


OLD, NEW = "o" * 32, "n" * 32


def test_a_rotation_list_checks_each_token() -> None:
    assert internal_token({"KEFU_INTERNAL_TOKEN": f" {NEW} , {OLD} "}) == f"{NEW},{OLD}"
    with pytest.raises(SettingsError, match="^KEFU_INTERNAL_TOKEN is too short"):
        internal_token({"KEFU_INTERNAL_TOKEN": f"{NEW},short"})


async def test_during_a_rotation_the_service_accepts_both_tokens_and_callers_send_the_first() -> None:
    server = create_grpc_server(CollectorRegistry(), f"{OLD},{NEW}")  # step 1: accept both, send old

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "kefu.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        outcomes = {}
        for caller in (OLD, NEW, f"{NEW},{OLD}", "x" * 32):
            async with internal_channel(f"127.0.0.1:{port}", caller) as channel:
                try:
                    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/kefu.test.Echo/Echo")
                    await call(b"hi", timeout=5)
                    outcomes[caller[:1]] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    outcomes[caller[:1]] = error.code()
        assert outcomes == {"o": grpc.StatusCode.OK, "n": grpc.StatusCode.OK, "x": grpc.StatusCode.UNAUTHENTICATED}
        assert internal_metadata(f"{NEW},{OLD}") == (("authorization", f"Bearer {NEW}"),)
    finally:
        await server.stop(None)
