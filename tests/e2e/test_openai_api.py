"""The OpenAI-compatible API, driven by the official openai SDK against the real processes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

from devtools.devstack.stack import Stack
from devtools.fake_upstream import FakeUpstream, FakeUpstreamConfig
from tests.e2e.stack_helpers import auth, token

REPLY = "您好！This is kefu."


# The full OpenAI surface (own system prompt, any route, max_tokens) is an `api` token's; a visitor's is
# narrower (tests/security/test_sec_visitor_llm_proxy.py).
def sync_client(stack: Stack, *, role: str = "api") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=token(role=role), max_retries=0)


def async_client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=token(role="api"), max_retries=0)


@pytest.fixture
async def upstream(upstream_port: int) -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(FakeUpstreamConfig(reply=REPLY, chunk_count=5, usage=(20, 7)),
                            port=upstream_port) as fake:
        yield fake


async def test_openai_sdk_async_stream_with_usage(upstream_stack: Stack, upstream: FakeUpstream) -> None:
    async with async_client(upstream_stack) as client:
        stream = await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True}, max_completion_tokens=50, temperature=0.3, user="u-1")
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (20, 7)
    sent = upstream.received[-1]
    assert sent["max_tokens"] == 50 and abs(sent["temperature"] - 0.3) < 1e-6


async def test_openai_sdk_async_non_stream(upstream_stack: Stack, upstream: FakeUpstream) -> None:
    async with async_client(upstream_stack) as client:
        reply = await client.chat.completions.create(
            model="default", messages=[{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == REPLY and reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.total_tokens == 27
    assert upstream.received[-1]["messages"][0] == {"role": "system", "content": "Be brief."}


async def test_openai_sdk_sync_stream_and_non_stream(upstream_stack: Stack, upstream: FakeUpstream) -> None:
    import asyncio

    def run() -> tuple[str, str]:
        with sync_client(upstream_stack) as client:
            streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": "hi"}], stream=True) if c.choices)
            whole = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}])
            return streamed, whole.choices[0].message.content or ""

    assert await asyncio.to_thread(run) == (REPLY, REPLY)


async def test_openai_sdk_lists_models(upstream_stack: Stack, upstream: FakeUpstream) -> None:
    async with async_client(upstream_stack) as client:
        models = [m.id async for m in client.models.list()]
    assert "default" in models


async def test_openai_errors_use_openai_shape(upstream_stack: Stack, upstream: FakeUpstream) -> None:
    async with async_client(upstream_stack) as client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        assert missing.value.code == "not_found"
        with pytest.raises(openai.BadRequestError) as blocked:
            await client.chat.completions.create(model="default", messages=[{"role": "user", "content": "刷单返利"}])
        assert blocked.value.code == "content_blocked"
        with pytest.raises(openai.UnprocessableEntityError):
            await client.chat.completions.create(model="default", messages=[])
    bad = openai.AsyncOpenAI(base_url=f"{upstream_stack.base_url}/v1", api_key="not-a-token", max_retries=0)
    async with bad:
        with pytest.raises(openai.AuthenticationError) as denied:
            await bad.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}])
    assert denied.value.code == "unauthorized"


async def test_openai_with_session_header_logs_the_turn(upstream_stack: Stack, upstream: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{upstream_stack.base_url}/v1/chat", json={"message": "start", "stream": False},
                             headers=auth(sub="logger")) as response:
            session_id = (await response.json())["session_id"]
    async with openai.AsyncOpenAI(base_url=f"{upstream_stack.base_url}/v1", api_key=token(sub="logger"),
                                  max_retries=0, default_headers={"X-Session-Id": session_id}) as client:
        await client.chat.completions.create(model="default", messages=[{"role": "user", "content": "second"}])
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{upstream_stack.base_url}/v1/sessions/{session_id}/messages",
                            headers=auth(sub="logger")) as response:
            messages = (await response.json())["messages"]
    assert [(m["role"], m["content"]) for m in messages][-2:] == [("user", "second"), ("assistant", REPLY)]
