"""The edge's one keepalive: a silent socket is pinged and, if it stays silent, dropped; a talking one is left be."""

from __future__ import annotations

import asyncio
import time

from aiohttp import ClientWebSocketResponse, WSMsgType
from pytest_aiohttp import AiohttpClient

from devtools.mint_token import mint
from gateway import keys
from gateway.app import create_app
from gateway.settings import GatewaySettings

SECRET = "keepalive-test-secret-0123456789abcdef"
HEARTBEAT_S = 1.0


def keepalive_settings() -> GatewaySettings:
    # Backends point nowhere: a socket that says nothing, or hello without resume, needs none of them.
    return GatewaySettings(jwt_secret=SECRET, session_addr="127.0.0.1:9", moderation_addr="127.0.0.1:9",
                           worker_addr="127.0.0.1:9", ws_heartbeat_s=HEARTBEAT_S, rpc_timeout_s=0.5)


def visitor_header() -> dict[str, str]:
    return {"Authorization": f"Bearer {mint(SECRET, tenant='shop1', subject='v1', role='visitor', ttl_s=60)}"}


async def frames_for(ws: ClientWebSocketResponse, seconds: float) -> list[WSMsgType]:
    """The types of the frames received within `seconds` (answering no ping: autoping is off)."""
    seen: list[WSMsgType] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = await ws.receive(timeout=left)
        except TimeoutError:
            break
        seen.append(message.type)
        if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR):
            break
    return seen


async def test_a_silent_socket_that_answers_pings_stays_open(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(keepalive_settings()))
    ws = await client.ws_connect("/v1/ws", headers=visitor_header(), autoping=False)
    pings = 0
    deadline = time.monotonic() + 4 * HEARTBEAT_S
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = await ws.receive(timeout=left)
        except TimeoutError:
            break
        assert message.type is WSMsgType.PING, message
        pings += 1
        await ws.pong(message.data)
    assert 2 <= pings <= 4  # one per heartbeat of silence
    assert not ws.closed
    await ws.close()


async def test_a_socket_that_ignores_pings_is_dropped_and_counted(aiohttp_client: AiohttpClient) -> None:
    app = create_app(keepalive_settings())
    client = await aiohttp_client(app)
    ws = await client.ws_connect("/v1/ws", headers=visitor_header(), autoping=False)
    started = time.monotonic()
    seen = await frames_for(ws, 4 * HEARTBEAT_S)
    assert seen[0] is WSMsgType.PING and seen[-1] in (WSMsgType.CLOSED, WSMsgType.ERROR), seen
    assert time.monotonic() - started < 2.5 * HEARTBEAT_S  # pinged after 1-1.25, dropped 0.5-0.75 later
    dropped = app[keys.METRICS].registry.get_sample_value("kefu_ws_silent_dropped_total")
    assert dropped == 1


async def test_a_client_that_talks_gets_no_ping_and_its_own_pings_answered(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(keepalive_settings()))
    ws = await client.ws_connect("/v1/ws", headers=visitor_header(), autoping=False)
    await ws.send_json({"type": "hello"})
    while (message := await ws.receive(timeout=10)).type is WSMsgType.PING:  # silent while the edge works on it
        await ws.pong(message.data)
    welcome = message.json()
    assert welcome["type"] == "welcome" and welcome["heartbeat_s"] == HEARTBEAT_S
    # A ping the edge sent for that silence may cross the welcome: answered before the client starts talking.
    await ws.send_json({"type": "ping"})
    while (message := await ws.receive(timeout=2)).type is WSMsgType.PING:
        await ws.pong(message.data)
    assert message.json()["type"] == "pong"
    seen: list[str] = []
    for _ in range(8):  # the widget's `ping` frame, more often than the heartbeat, for 3.2 s
        await ws.send_json({"type": "ping"})
        message = await ws.receive(timeout=2)
        seen.append(message.json()["type"] if message.type is WSMsgType.TEXT else message.type.name)
        await asyncio.sleep(0.4)
    assert seen == ["pong"] * 8  # no WebSocket ping among them: the socket was never silent
    await ws.ping(b"are you there")
    answer = await ws.receive(timeout=2)
    assert (answer.type, answer.data) == (WSMsgType.PONG, b"are you there")
    await ws.close()
