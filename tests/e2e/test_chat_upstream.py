"""POST /v1/chat against a fake OpenAI upstream: output moderation, crashes, disconnects."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from bench.sse_reader import read_sse
from devtools.devstack.stack import Stack
from devtools.fake_upstream import FakeUpstream, FakeUpstreamConfig
from tests.e2e.stack_helpers import auth


async def collect(stack: Stack, message: str, sub: str = "visitor-1") -> list[tuple[str, dict[str, Any]]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.base_url}/v1/chat", json={"message": message}, headers=auth(sub=sub)) as r:
            assert r.status == 200, await r.text()
            return [(e.event, e.json()) async for e in read_sse(r)]


def deltas(events: list[tuple[str, dict[str, Any]]]) -> str:
    return "".join(data["delta"] for name, data in events if name == "message")


async def test_upstream_answer_streams_with_its_model_and_usage(upstream_stack: Stack, upstream_port: int) -> None:
    config = FakeUpstreamConfig(reply="您好，欢迎光临 Kefu 茶铺！", chunk_count=6, usage=(31, 12))
    async with FakeUpstream(config, port=upstream_port) as upstream:
        events = await collect(upstream_stack, "你好")
    assert [n for n, _ in events][0] == "session" and events[-1][0] == "done"
    assert deltas(events) == "您好，欢迎光临 Kefu 茶铺！"
    done = events[-1][1]
    assert done["model"] == "fake-model" and done["usage"] == {"prompt_tokens": 31, "completion_tokens": 12}
    sent = upstream.received[-1]
    assert sent["model"] == "fake-model" and sent["stream"] is True
    assert sent["messages"][0]["role"] == "system" and sent["messages"][-1] == {"role": "user", "content": "你好"}


async def test_upstream_mask_word_split_across_chunks_is_masked(upstream_stack: Stack, upstream_port: int) -> None:
    # 12 chunks of one character each: "傻" and "逼" arrive in different deltas.
    config = FakeUpstreamConfig(reply="这个傻逼问题我来回答好吗", chunk_count=12)
    async with FakeUpstream(config, port=upstream_port):
        events = await collect(upstream_stack, "hello")
    assert events[-1][0] == "done"
    assert deltas(events) == "这个**问题我来回答好吗"
    assert all("傻" not in data.get("delta", "") for _, data in events)


async def test_upstream_block_word_ends_stream_with_error_and_nothing_of_it(upstream_stack: Stack,
                                                                              upstream_port: int) -> None:
    # Chunks apart in time, so the harmless start is released before the blocked word arrives.
    config = FakeUpstreamConfig(reply="欢迎加入我们的刷单返利群，日赚千元", chunk_count=16, chunk_interval_s=0.03)
    async with FakeUpstream(config, port=upstream_port):
        events = await collect(upstream_stack, "hello")
    assert events[-1] == ("error", {"code": "content_blocked",
                                    "message": "the answer contained blocked content and was stopped"})
    assert "done" not in [n for n, _ in events]
    assert "刷" not in deltas(events) and deltas(events).startswith("欢迎")


async def test_worker_killed_mid_stream_gives_error_event_then_recovers(upstream_stack: Stack,
                                                                      upstream_port: int) -> None:
    slow = FakeUpstreamConfig(reply="x" * 100, chunk_count=100, chunk_interval_s=0.05)
    async with FakeUpstream(slow, port=upstream_port):
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{upstream_stack.base_url}/v1/chat", json={"message": "hi"},
                                 headers=auth()) as response:
                events: list[str] = []
                killed_at = 0.0
                async for event in read_sse(response):
                    events.append(event.event)
                    if events.count("message") == 3 and not killed_at:
                        upstream_stack.kill("llm_worker")
                        killed_at = time.monotonic()
                    if event.event == "error":
                        assert event.json()["code"] == "upstream_unavailable"
                        break
                assert time.monotonic() - killed_at < 5
    assert events[-1] == "error" and "done" not in events
    async with aiohttp.ClientSession() as http:  # while it is down, a non-streaming turn is a clean 503
        async with http.post(f"{upstream_stack.base_url}/v1/chat", json={"message": "hi", "stream": False},
                             headers=auth()) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "upstream_unavailable"
    upstream_stack.start_process("llm_worker")
    await asyncio.to_thread(upstream_stack.wait_grpc_serving, "llm_worker", upstream_stack.config.ports.worker,
                            time.monotonic() + 30)
    await asyncio.to_thread(upstream_stack.wait_http_ready, time.monotonic() + 30)
    async with FakeUpstream(FakeUpstreamConfig(reply="back again"), port=upstream_port):
        events_after = await collect(upstream_stack, "are you there?")
    assert events_after[-1][0] == "done" and deltas(events_after) == "back again"


async def test_client_disconnect_cancels_the_upstream_request(upstream_stack: Stack, upstream_port: int) -> None:
    config = FakeUpstreamConfig(reply="abcdefgh", chunk_count=8, hang_after_chunks=2)
    async with FakeUpstream(config, port=upstream_port) as upstream:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{upstream_stack.base_url}/v1/chat", json={"message": "hi"},
                                 headers=auth()) as response:
                async for event in read_sse(response):
                    if event.event == "message":
                        break  # hang up while the upstream is still streaming
        deadline = time.monotonic() + 5
        while upstream.stats.cancelled < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert upstream.stats.cancelled == 1 and upstream.stats.in_flight == 0


async def test_upstream_killed_mid_stream_gives_error_event(upstream_stack: Stack, upstream_port: int) -> None:
    upstream = FakeUpstream(FakeUpstreamConfig(reply="y" * 60, chunk_count=60, chunk_interval_s=0.05),
                            port=upstream_port)
    await upstream.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{upstream_stack.base_url}/v1/chat", json={"message": "hi"},
                                 headers=auth()) as response:
                events = []
                async for event in read_sse(response):
                    events.append((event.event, event.json()))
                    if event.event == "message" and len(events) == 3:
                        await upstream.close()  # the upstream goes away mid-answer
    finally:
        await upstream.close()
    assert events[-1][0] == "error" and "done" not in [n for n, _ in events]
    assert events[-1][1]["code"] == "upstream_unavailable"


async def test_upstream_refusals_map_to_clear_http_errors(upstream_stack: Stack, upstream_port: int) -> None:
    expected = {429: (429, "upstream_rate_limited"), 401: (502, "upstream_error"), 400: (422, "invalid_request"),
                503: (503, "upstream_unavailable")}
    for upstream_status, (status, code) in expected.items():
        async with FakeUpstream(FakeUpstreamConfig(fail_status=upstream_status), port=upstream_port):
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{upstream_stack.base_url}/v1/chat/completions", headers=auth(), json={
                        "model": "default", "messages": [{"role": "user", "content": "hi"}]}) as response:
                    body = await response.json()
        assert (response.status, body["error"]["code"]) == (status, code), upstream_status
        if status == 429:
            assert response.headers["Retry-After"] == "1"
