"""A conversation's unstored frames: the edge that holds its sockets has the NATS interest, until the last
of them leaves (gateway/live/channels.py Route; issue 19)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from devtools.devstack.stack import Stack
from gateway.live.channels import conversation_subject
from tests.e2e.stack_helpers import faq_plugins_env, start_stack, token

TENANT = "shop1"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir: Path = tmp_path_factory.mktemp("routes-stack")
    started = start_stack(data_dir, {"KEFU_RATE_LIMIT_RPS": "1000", **faq_plugins_env(data_dir)})
    try:
        yield started
    finally:
        started.stop()


async def _interest(nc: NatsClient, subject: str) -> bool:
    """Whether any client subscribes to `subject`: with none, the server answers a request with "no responders"
    at once; an edge that follows it takes the request and never replies."""
    try:
        await nc.request(subject, b"{}", timeout=0.5)
    except nats.errors.NoRespondersError:
        return False
    except nats.errors.TimeoutError:
        return True
    raise AssertionError("nobody answers live frames")


async def _open(http: aiohttp.ClientSession, stack: Stack, sub: str,
                resume: str | None = None) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    ws = await http.ws_connect(f"{stack.base_url}/v1/ws")
    hello: dict[str, object] = {"type": "hello", "token": token(tenant=TENANT, sub=sub)}
    if resume is not None:
        hello["resume"] = [{"conversation_id": resume, "after_seq": 0}]
    await ws.send_json(hello)
    welcome = await ws.receive_json(timeout=10)
    assert welcome["type"] == "welcome", welcome
    if resume is not None:
        return ws, resume
    await ws.send_json({"type": "send", "cid": "first", "text": "下单后多久发货？"})
    while (frame := await ws.receive_json(timeout=20))["type"] != "ack":
        assert frame["type"] not in ("nack", "error"), frame
    return ws, await _conversation_of(ws)  # the ack carries none: the stored msg event does


async def _conversation_of(ws: aiohttp.ClientWebSocketResponse) -> str:
    while "conversation_id" not in (frame := await ws.receive_json(timeout=20)):
        pass
    return str(frame["conversation_id"])


async def _until(nc: NatsClient, subject: str, wanted: bool) -> None:
    deadline = time.monotonic() + 15
    while await _interest(nc, subject) is not wanted:
        assert time.monotonic() < deadline, f"interest in {subject} never became {wanted}"
        await asyncio.sleep(0.1)


async def test_the_interest_lasts_while_a_socket_follows_and_ends_with_the_last(stack: Stack) -> None:
    nc = await nats.connect(stack.nats_url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        async with aiohttp.ClientSession() as http:
            first, conversation_id = await _open(http, stack, "routes-visitor")
            subject = conversation_subject(TENANT, conversation_id)
            await _until(nc, subject, True)
            assert not await _interest(nc, conversation_subject("other-tenant", conversation_id))
            second, _ = await _open(http, stack, "routes-visitor", resume=conversation_id)
            await first.close()
            assert await _interest(nc, subject)  # the second socket still follows it
            await second.close()
            await _until(nc, subject, False)  # the last follower left: the edge dropped its route
    finally:
        await nc.close()
