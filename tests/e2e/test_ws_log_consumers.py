"""Live conversations cost each edge one consumer on the conversation log, not one per conversation (issue 19)."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import nats
import pytest

from devtools.devstack.stack import Stack
from services.common.conversation_log import LOG_STREAM
from tests.e2e.stack_helpers import edge_metrics_url, faq_plugins_env, start_stack, token

CONVERSATIONS = 50
EDGES = 2


@pytest.fixture(scope="module")
def two_edges(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir: Path = tmp_path_factory.mktemp("feed-stack")
    stack = start_stack(data_dir, {"KEFU_RATE_LIMIT_RPS": "1000", **faq_plugins_env(data_dir)}, workers=EDGES)
    try:
        yield stack
    finally:
        stack.stop()


async def _open_conversation(http: aiohttp.ClientSession, stack: Stack, n: int) -> aiohttp.ClientWebSocketResponse:
    """A visitor socket that sent a message: its edge follows the new conversation's log."""
    ws = await http.ws_connect(f"{stack.base_url}/v1/ws", autoping=True)
    await ws.send_json({"type": "hello", "token": token(sub=f"feed-visitor-{n}")})
    assert (await ws.receive_json(timeout=10))["type"] == "welcome"
    await ws.send_json({"type": "send", "cid": "first", "text": f"第 {n} 位顾客：下单后多久发货？"})
    while (frame := await ws.receive_json(timeout=20))["type"] != "ack":
        assert frame["type"] not in ("nack", "error"), frame
    return ws


async def _log_consumers(stack: Stack) -> int:
    nc = await nats.connect(stack.nats_url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        return (await nc.jetstream().stream_info(LOG_STREAM)).state.consumer_count
    finally:
        await nc.close()


def _followed(stack: Stack, worker: int) -> float:
    """kefu_live_log_consumers of one edge: the conversation logs it follows."""
    with urllib.request.urlopen(edge_metrics_url(stack, worker), timeout=5) as reply:
        text = reply.read().decode()
    found = re.search(r"^kefu_live_log_consumers (\S+)$", text, re.MULTILINE)
    assert found, "kefu_live_log_consumers missing from /metrics"
    return float(found.group(1))


async def test_fifty_live_conversations_on_two_edges_cost_two_log_consumers(two_edges: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        sockets = await asyncio.gather(*(_open_conversation(http, two_edges, n) for n in range(CONVERSATIONS)))
        try:
            # A feed starts following its log in the background of the first join: poll, bounded.
            deadline = time.monotonic() + 20
            while sum(followed := [_followed(two_edges, worker) for worker in range(EDGES)]) < CONVERSATIONS:
                assert time.monotonic() < deadline, followed
                await asyncio.sleep(0.1)
            # The kernel spreads the sockets over both edges (SO_REUSEPORT): each follows some of them.
            assert sum(followed) >= CONVERSATIONS and min(followed) > 0, followed
            assert await _log_consumers(two_edges) == EDGES
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))
