"""The fake upstream speaks OpenAI's Chat Completions wire format, streaming and not, errors included."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devtools.fake_replies import encoding
from devtools.fake_upstream import FakeUpstream, FakeUpstreamConfig

pytestmark = pytest.mark.timeout(20)

REPO_ROOT = Path(__file__).resolve().parents[2]
USER = [{"role": "user", "content": "你好，世界"}]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession, upstream: FakeUpstream, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """(status, content type, body text) of one chat request."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(
        f"{upstream.base_url}/chat/completions",
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
    ) as response:
        return response.status, response.content_type, await response.text()


def sse_data(text: str) -> list[str]:
    """The `data:` payload of every event, in order; fails on anything but data events."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    return [event.removeprefix("data: ") for event in events]


async def stream_chunks(http: aiohttp.ClientSession, upstream: FakeUpstream, **extra: Any) -> list[Any]:
    status, content_type, text = await post(
        http, upstream, {"model": "gpt-test", "messages": USER, "stream": True, **extra}
    )
    assert (status, content_type) == (200, "text/event-stream")
    data = sse_data(text)
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.005)


async def test_fake_upstream_stream_is_chunk_objects_then_done(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream(FakeUpstreamConfig(chunk_count=3)) as upstream:
        chunks = await stream_chunks(http, upstream)

    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["model"] for c in chunks} == {"gpt-test"}
    assert all(isinstance(c["created"], int) for c in chunks)


async def test_fake_upstream_stream_first_chunk_is_the_assistant_role(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream() as upstream:
        chunks = await stream_chunks(http, upstream)

    first = chunks[0]["choices"][0]
    assert first["delta"]["role"] == "assistant" and first["delta"]["content"] == ""
    assert first["finish_reason"] is None


async def test_fake_upstream_stream_content_echoes_chinese_in_whole_characters(
    http: aiohttp.ClientSession,
) -> None:
    async with FakeUpstream(FakeUpstreamConfig(chunk_count=4)) as upstream:
        chunks = await stream_chunks(http, upstream)

    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert pieces == ["Ech", "o: ", "你好，", "世界"]


async def test_fake_upstream_stream_ends_with_stop_chunk_and_no_usage(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream() as upstream:
        chunks = await stream_chunks(http, upstream)

    last = chunks[-1]["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)


async def test_fake_upstream_include_usage_adds_usage_chunk_before_done(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream() as upstream:
        chunks = await stream_chunks(http, upstream, stream_options={"include_usage": True})

    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == len(encoding().encode("Echo: 你好，世界"))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


async def test_fake_upstream_max_tokens_cuts_answer_with_length(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream(FakeUpstreamConfig(reply="one two three four five six seven")) as upstream:
        chunks = await stream_chunks(http, upstream, max_tokens=3, stream_options={"include_usage": True})

    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == "one two three"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_fake_upstream_non_stream_is_a_chat_completion(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream(FakeUpstreamConfig(model="gpt-fake-2024-01-01")) as upstream:
        status, content_type, text = await post(http, upstream, {"model": "gpt-test", "messages": USER})

    body = json.loads(text)
    assert (status, content_type) == (200, "application/json")
    assert body["object"] == "chat.completion" and body["model"] == "gpt-fake-2024-01-01"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"] == "Echo: 你好，世界"
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


async def test_fake_upstream_missing_messages_is_openai_error_shape(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream() as upstream:
        status, _, text = await post(http, upstream, {"model": "gpt-test"})

    assert status == 400
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("invalid_request_error", "messages")


async def test_fake_upstream_body_not_json_is_400(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream() as upstream:
        status, _, text = await post(http, upstream, b"{not json")

    assert status == 400
    assert json.loads(text)["error"]["type"] == "invalid_request_error"


async def test_fake_upstream_stream_options_without_stream_is_400(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream() as upstream:
        status, _, text = await post(
            http, upstream, {"model": "m", "messages": USER, "stream_options": {"include_usage": True}}
        )

    assert status == 400
    assert json.loads(text)["error"]["param"] == "stream_options"


async def test_fake_upstream_wrong_api_key_is_401_without_echoing_it(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream(FakeUpstreamConfig(expected_api_key="sk-right")) as upstream:
        status, _, text = await post(
            http, upstream, {"model": "m", "messages": USER}, headers={"Authorization": "Bearer sk-wrong"}
        )

    assert status == 401
    assert json.loads(text)["error"]["code"] == "invalid_api_key"
    assert "sk-wrong" not in text


async def test_fake_upstream_fail_status_answers_that_error(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream(FakeUpstreamConfig(fail_status=503)) as upstream:
        status, _, text = await post(http, upstream, {"model": "m", "messages": USER, "stream": True})

    assert status == 503
    assert json.loads(text)["error"]["type"] == "server_error"


async def test_fake_upstream_lists_models(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream(FakeUpstreamConfig(model="gpt-fake")) as upstream:
        async with http.get(f"{upstream.base_url}/models") as response:
            body = await response.json()

    assert body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [("gpt-fake", "model")]


async def test_fake_upstream_stats_count_a_finished_request(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream() as upstream:
        await stream_chunks(http, upstream)
        async with http.get(f"http://127.0.0.1:{upstream.port}/stats") as response:
            stats = await response.json()

    assert stats["requests_total"] == stats["completed"] == 1
    assert stats["in_flight"] == stats["cancelled"] == 0


async def test_fake_upstream_counts_client_disconnect_as_cancelled(http: aiohttp.ClientSession) -> None:
    async with FakeUpstream(FakeUpstreamConfig(hang_after_chunks=1)) as upstream:
        response = await http.post(
            f"{upstream.base_url}/chat/completions", json={"model": "m", "messages": USER, "stream": True}
        )
        await response.content.readuntil(b"\n\n")  # the role chunk: the request is being served
        assert upstream.stats.in_flight == 1
        response.close()

        await wait_for(lambda: upstream.stats.cancelled == 1 and upstream.stats.in_flight == 0)


async def test_fake_upstream_cli_serves_on_the_printed_url(http: aiohttp.ClientSession) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devtools.fake_upstream",
        "--port",
        "0",
        "--chunks",
        "2",
        "--model",
        "cli-model",
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
        base_url = line.split()[-1]
        async with http.get(f"{base_url}/models") as response:
            body = await response.json()
        assert body["data"][0]["id"] == "cli-model"
    finally:
        process.terminate()
        await process.wait()
