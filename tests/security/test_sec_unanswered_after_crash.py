"""Issue 17 item 7: an edge killed while an AI answer streams leaves an acked message unanswered; the visitor's
return (resume or resend, on the edge started again) gets it answered, exactly once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from devtools.devstack.stack import EDGE, Stack, free_port
from devtools.fake_upstream import FakeUpstream, FakeUpstreamConfig
from tests.e2e.stack_helpers import auth, start_stack, token

LEASE_S = 2.0
"""KEFU_ANSWER_LEASE_S here: how long a dead edge's claim on an answer blocks the others."""
SLOW = FakeUpstreamConfig(reply="Your parcel leaves the warehouse within two working days.", chunk_count=12,
                          chunk_interval_s=0.25)
"""About three seconds an answer, longer than a lease: the edge is killed in the middle of it."""
CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


@pytest.fixture(scope="module")
def upstream_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream_port: int) -> Iterator[Stack]:
    started = start_stack(tmp_path_factory.mktemp("sec-crash"), {
        "KEFU_OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1", "KEFU_MODEL": "fake-model",
        "KEFU_OPENAI_API_KEY": "sk-test", "KEFU_CACHE_ENABLED": "false", "KEFU_ANSWER_LEASE_S": str(LEASE_S)})
    try:
        yield started
    finally:
        started.stop()


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = 15.0) -> dict[str, Any]:
    message = await ws.receive(timeout=timeout_s)
    assert message.type is aiohttp.WSMsgType.TEXT, (message.type, message.data)
    frame: dict[str, Any] = json.loads(message.data)
    return frame


async def until(ws: aiohttp.ClientWebSocketResponse, kind: str, sender: str | None = None) -> dict[str, Any]:
    while True:
        frame = await receive(ws)
        assert frame["type"] not in ("error", "nack"), frame
        if frame["type"] == kind and (sender is None or frame.get("sender", {}).get("type") == sender):
            return frame


async def welcomed(http: aiohttp.ClientSession, stack: Stack, sub: str,
                   **hello: Any) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(f"{stack.base_url}/v1/ws")
    await ws.send_json({"type": "hello", "token": token(sub=sub), **hello})
    assert (await receive(ws))["type"] == "welcome"
    return ws


async def cut_off_answer(http: aiohttp.ClientSession, stack: Stack, sub: str) -> tuple[str, dict[str, Any]]:
    """A question acked and its answer streaming when the edge is SIGKILLed, then the edge started again."""
    ws = await welcomed(http, stack, sub)
    await ws.send_json({"type": "send", "cid": "q1", "text": "when does my parcel ship?"})
    echo = await until(ws, "msg", "visitor")
    await until(ws, "ack")
    await until(ws, "ai_delta")
    stack.kill(EDGE)
    assert (await ws.receive(timeout=10)).type in CLOSED
    stack.start_process(EDGE)
    await asyncio.to_thread(stack.wait_http_ready, time.monotonic() + 60)
    return str(echo["conversation_id"]), echo


async def answers_stored(http: aiohttp.ClientSession, stack: Stack, sub: str, conversation_id: str) -> list[str]:
    async with http.get(f"{stack.base_url}/v1/sessions/{conversation_id}/messages", headers=auth(sub=sub)) as response:
        assert response.status == 200, await response.text()
        messages = (await response.json())["messages"]
    return [m["content"] for m in messages if m["role"] == "assistant"]


async def test_sec_a_resume_after_the_edge_died_mid_answer_gets_the_answer_once(stack: Stack,
                                                                                upstream_port: int) -> None:
    async with FakeUpstream(SLOW, port=upstream_port) as upstream, aiohttp.ClientSession() as http:
        conversation_id, echo = await cut_off_answer(http, stack, "crash-resume")
        assert await answers_stored(http, stack, "crash-resume", conversation_id) == []  # the bug's state
        ws = await welcomed(http, stack, "crash-resume",
                            resume=[{"conversation_id": conversation_id, "after_seq": echo["seq"]}])
        answer = await until(ws, "msg", "ai")
        assert answer["text"] == SLOW.reply and answer["seq"] > echo["seq"]
        # Nothing more comes once another lease would have run out: one answer, stored once.
        await asyncio.sleep(LEASE_S + 1)
        assert await answers_stored(http, stack, "crash-resume", conversation_id) == [SLOW.reply]
        assert upstream.stats.requests_total == 2  # the cut one and the one given
        await ws.close()


async def test_sec_a_resend_and_two_resumes_at_once_get_one_answer(stack: Stack, upstream_port: int) -> None:
    async with FakeUpstream(SLOW, port=upstream_port), aiohttp.ClientSession() as http:
        conversation_id, echo = await cut_off_answer(http, stack, "crash-many")
        point = {"conversation_id": conversation_id, "after_seq": echo["seq"]}
        sockets = await asyncio.gather(welcomed(http, stack, "crash-many", resume=[point]),
                                       welcomed(http, stack, "crash-many", resume=[point]),
                                       welcomed(http, stack, "crash-many"))
        resender = sockets[2]
        await resender.send_json({"type": "send", "cid": "q1", "conversation_id": conversation_id,
                                  "text": "when does my parcel ship?"})
        ack = await until(resender, "ack")
        assert ack["duplicate"] is True and ack["seq"] == echo["seq"]
        answers = await asyncio.gather(*(until(ws, "msg", "ai") for ws in sockets))
        assert {a["message_id"] for a in answers} == {answers[0]["message_id"]}  # the same one, everywhere
        await asyncio.sleep(LEASE_S + 1)
        assert await answers_stored(http, stack, "crash-many", conversation_id) == [SLOW.reply]
        for ws in sockets:
            await ws.close()


async def test_sec_a_resume_while_the_answer_still_streams_elsewhere_adds_none(stack: Stack,
                                                                              upstream_port: int) -> None:
    """No crash: the socket drops, the edge goes on answering (and renews its lease past LEASE_S)."""
    async with FakeUpstream(SLOW, port=upstream_port) as upstream, aiohttp.ClientSession() as http:
        ws = await welcomed(http, stack, "drop-only")
        await ws.send_json({"type": "send", "cid": "q1", "text": "when does my parcel ship?"})
        echo = await until(ws, "msg", "visitor")
        await until(ws, "ai_delta")
        await ws.close()
        again = await welcomed(http, stack, "drop-only",
                               resume=[{"conversation_id": echo["conversation_id"], "after_seq": echo["seq"]}])
        answer = await until(again, "msg", "ai")
        assert answer["text"] == SLOW.reply
        await asyncio.sleep(LEASE_S + 1)
        assert await answers_stored(http, stack, "drop-only", echo["conversation_id"]) == [SLOW.reply]
        assert upstream.stats.requests_total == 1
        await again.close()
