"""The visitor's address behind trusted proxies (KEFU_TRUSTED_PROXIES), and never a spoofed one."""

from __future__ import annotations

from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from devtools.devstack.nats_server import NatsServer
from gateway import keys
from gateway.addresses import ClientAddresses, parse_trusted_proxies
from gateway.settings import GatewaySettings
from services.common.settings import SettingsError
from tests.gateway.live_http_support import (
    ClientFactory,
    EdgeClient,
    bearer,
    edge_settings,
    eventually,
    expect_error,
    start_edge,
)

DEV = {"KEFU_INTERNAL_AUTH": "off"}
"""Settings read as a dev machine would (no internal token); every other variable as the test names it."""

PROXIES = parse_trusted_proxies("10.0.0.0/8, 192.168.1.1, fd00::/8")


def request_from(peer: str, forwarded_for: str | None = None) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (peer, 40000) if name == "peername" else default
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for is not None else {}
    return make_mocked_request("POST", "/v1/widget/token", headers=headers, transport=transport)


@pytest.mark.parametrize(("peer", "forwarded_for", "client"), [
    # Through one trusted proxy, or two: the first hop outside them, read from the right.
    ("10.1.2.3", "203.0.113.9", "203.0.113.9"),
    ("10.1.2.3", "203.0.113.9, 192.168.1.1", "203.0.113.9"),
    # What the visitor put in front of the real hops is not believed.
    ("10.1.2.3", "1.2.3.4, 203.0.113.9", "203.0.113.9"),
    # A peer outside the trusted networks is the client, whatever it claims.
    ("198.51.100.7", "203.0.113.9", "198.51.100.7"),
    # No header: the proxy itself. Garbage beyond the trusted hops: the last trusted hop.
    ("10.1.2.3", None, "10.1.2.3"),
    ("10.1.2.3", "not-an-ip, 10.9.9.9", "10.9.9.9"),
    # Every hop trusted: the leftmost one.
    ("10.1.2.3", "10.7.7.7, 10.8.8.8", "10.7.7.7"),
    ("fd00::1", "2001:db8::5", "2001:db8::5"),
    ("::ffff:10.1.2.3", "203.0.113.9", "203.0.113.9"),
])
def test_client_address_behind_trusted_proxies(peer: str, forwarded_for: str | None, client: str) -> None:
    assert ClientAddresses(PROXIES).of(request_from(peer, forwarded_for)) == client


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert ClientAddresses().of(request_from("10.1.2.3", "203.0.113.9")) == "10.1.2.3"


def test_a_bad_trusted_proxy_setting_stops_the_edge() -> None:
    with pytest.raises(SettingsError, match="KEFU_TRUSTED_PROXIES"):
        GatewaySettings.load({**DEV, "KEFU_JWT_SECRET": "x" * 32,
                              "KEFU_TRUSTED_PROXIES": "10.0.0.0/8, proxy.local"})
    settings = GatewaySettings.load({**DEV, "KEFU_JWT_SECRET": "x" * 32, "KEFU_TRUSTED_PROXIES": "127.0.0.1"})
    assert [str(n) for n in settings.trusted_proxies] == ["127.0.0.1/32"]


async def test_widget_token_limits_and_blocks_each_forwarded_visitor(nats_server: NatsServer,
                                                                     aiohttp_client: ClientFactory) -> None:
    """Behind a proxy (the test client on 127.0.0.1), visitors no longer share one bucket, and blocking
    one visitor's address does not block the proxy's other visitors."""
    client: EdgeClient = await start_edge(aiohttp_client, edge_settings(
        nats_server.url, widget_token_rps=0.01, widget_token_burst=1,
        trusted_proxies=parse_trusted_proxies("127.0.0.1, ::1")))

    async def take(address: str) -> int:
        response = await client.post("/v1/widget/token", json={"tenant": "shop1"},
                                     headers={"X-Forwarded-For": address})
        return response.status

    assert [await take("203.0.113.1"), await take("203.0.113.2")] == [200, 200]
    assert await take("203.0.113.1") == 429  # that visitor's own bucket is empty
    blocked = await client.post("/v1/blacklist", json={"address": "203.0.113.3", "reason": "spam"},
                                headers=bearer())
    assert blocked.status == 201

    async def applied() -> bool:
        return bool(client.app[keys.BLACKLIST].blocks("shop1", "v_any", "203.0.113.3"))

    await eventually(applied, what="the blacklist copy picks up the address")
    await expect_error(await client.post("/v1/widget/token", json={"tenant": "shop1"},
                                         headers={"X-Forwarded-For": "203.0.113.3"}), 403, "blocked")
    assert await take("203.0.113.4") == 200
