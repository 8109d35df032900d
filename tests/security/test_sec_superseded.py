"""Issue 17 item 8: when an agent claims a conversation mid-answer, /v1/chat stops relaying the AI's answer at
once and ends `superseded`; nothing of that answer is stored and its generation is cancelled upstream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

from bench.sse_reader import read_sse
from devtools.devstack.stack import Stack, free_port
from devtools.fake_upstream import FakeUpstream, FakeUpstreamConfig
from tests.e2e.stack_helpers import auth, start_stack, token

TENANT = "sec-superseded"
CHUNKS = 60
# Three seconds of answer, one delta every 50 ms: long enough that a claim lands mid-answer.
SLOW = FakeUpstreamConfig(chunk_count=CHUNKS, chunk_interval_s=0.05, reply="慢" * CHUNKS)
IN_FLIGHT_S = 0.15
"""Deltas already on their way when the claim is acknowledged may still arrive this long after it."""

Frame = dict[str, Any]


@pytest.fixture(scope="module")
def upstream_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream_port: int) -> Iterator[Stack]:
    """An LLM route on the fake upstream, and a second edge for the agent: the claim crosses edges over NATS."""
    stack = start_stack(tmp_path_factory.mktemp("sec-superseded"), {
        "KEFU_CACHE_ENABLED": "false", "KEFU_OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
        "KEFU_MODEL": "fake-model", "KEFU_OPENAI_API_KEY": "sk-test"})
    try:
        stack.start_edge("edge-b", free_port())
        yield stack
    finally:
        stack.stop()


async def next_frame(ws: aiohttp.ClientWebSocketResponse, predicate: Callable[[Frame], bool]) -> Frame:
    async with asyncio.timeout(10):
        while True:
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.TEXT, f"socket ended: {message}"
            frame: Frame = json.loads(message.data)
            if predicate(frame):
                return frame


async def claim(http: aiohttp.ClientSession, stack: Stack, conversation_id: str,
                sockets: list[aiohttp.ClientWebSocketResponse]) -> float:
    """An agent claims over the WebSocket of the other edge; when (monotonic) its ack arrived."""
    ws = await http.ws_connect(f"ws://127.0.0.1:{stack.edges['edge-b']}/v1/ws")
    sockets.append(ws)
    await ws.send_json({"type": "hello", "token": token(tenant=TENANT, sub="agent-ann", role="agent")})
    await next_frame(ws, lambda f: f["type"] == "welcome")
    await ws.send_json({"type": "claim", "conversation_id": conversation_id, "cid": "claim-1"})
    answer = await next_frame(ws, lambda f: f["type"] in ("ack", "nack") and f.get("cid") == "claim-1")
    acked_at = time.monotonic()
    assert answer["type"] == "ack", answer
    return acked_at


async def stored_roles(http: aiohttp.ClientSession, stack: Stack, sub: str, conversation_id: str) -> list[str]:
    async with http.get(f"{stack.base_url}/v1/sessions/{conversation_id}/messages",
                        headers=auth(tenant=TENANT, sub=sub)) as response:
        assert response.status == 200
        return [m["role"] for m in (await response.json())["messages"]]


async def wait_cancelled(upstream: FakeUpstream) -> None:
    deadline = time.monotonic() + 5
    while upstream.stats.cancelled < 1:
        assert time.monotonic() < deadline, f"the upstream request was never cancelled: {upstream.stats}"
        await asyncio.sleep(0.02)


async def test_sec_superseded_claim_mid_answer_ends_the_chat_stream_at_once(stack: Stack, upstream_port: int) -> None:
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    async with FakeUpstream(SLOW, port=upstream_port) as upstream, aiohttp.ClientSession() as http:
        try:
            names: list[str] = []
            arrivals: list[float] = []
            claiming: asyncio.Task[float] | None = None
            async with http.post(f"{stack.base_url}/v1/chat", json={"message": "讲一个很长的故事"},
                                 headers=auth(tenant=TENANT, sub="storyteller")) as response:
                assert response.status == 200
                async for event in read_sse(response):
                    names.append(event.event)
                    if event.event == "session":
                        conversation_id = event.json()["session_id"]
                    elif event.event == "message":
                        arrivals.append(time.monotonic())
                        if len(arrivals) == 5:  # mid-answer; the stream is read on meanwhile
                            claiming = asyncio.create_task(claim(http, stack, conversation_id, sockets))
                    else:
                        last = event.json()
            assert claiming is not None
            acked_at = await claiming
        finally:
            for ws in sockets:
                await ws.close()
        assert names[0] == "session" and names[-1] == "done", names
        assert last["finish_reason"] == "superseded", last
        assert len(arrivals) < CHUNKS // 2, f"{len(arrivals)} of {CHUNKS} deltas relayed: the stream went on"
        late = [round(at - acked_at, 3) for at in arrivals if at > acked_at + IN_FLIGHT_S]
        assert late == [], f"deltas relayed after the claim (seconds after its ack): {late}"
        await wait_cancelled(upstream)  # the generation stopped too, not only the relay
        assert await stored_roles(http, stack, "storyteller", conversation_id) == ["user"]


async def test_sec_superseded_non_streamed_reply_is_empty(stack: Stack, upstream_port: int) -> None:
    """Without streaming nothing was relayed yet: the reply must not carry what had arrived of the answer."""
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    async with FakeUpstream(SLOW, port=upstream_port) as upstream, aiohttp.ClientSession() as http:
        try:
            async with http.post(f"{stack.base_url}/v1/chat", json={"message": "你好", "stream": False},
                                 headers=auth(tenant=TENANT, sub="quiet")) as first:
                conversation_id = (await first.json())["session_id"]
            asking = asyncio.create_task(_post_json(http, f"{stack.base_url}/v1/chat", {
                "message": "再讲一个很长的故事", "session_id": conversation_id, "stream": False}, "quiet"))
            deadline = time.monotonic() + 10
            while upstream.stats.in_flight < 1:  # the second answer is being generated
                assert time.monotonic() < deadline and not asking.done(), "the second turn never reached the model"
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # a few deltas in
            await claim(http, stack, conversation_id, sockets)
            status, body = await asking
        finally:
            for ws in sockets:
                await ws.close()
        assert status == 200, body
        assert (body["finish_reason"], body["reply"]) == ("superseded", "")
        await wait_cancelled(upstream)
        assert await stored_roles(http, stack, "quiet", conversation_id) == ["user", "assistant", "user"]


async def _post_json(http: aiohttp.ClientSession, url: str, body: dict[str, object], sub: str,
                     ) -> tuple[int, dict[str, Any]]:
    async with http.post(url, json=body, headers=auth(tenant=TENANT, sub=sub)) as response:
        return response.status, await response.json()
