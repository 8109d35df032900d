"""The OpenAI-compatible provider, loaded as the worker loads it, against the fake upstream on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.fake_upstream import FakeUpstream, FakeUpstreamConfig, encoding
from services.llm_worker.plugin_api import (
    ChatMessage,
    Delta,
    Finish,
    GenerationParams,
    PluginContext,
    Provider,
    ProviderError,
    StreamEvent,
)

pytestmark = pytest.mark.timeout(20)

PLUGINS_DIR = Path(__file__).resolve().parents[2] / "plugins"
CONTEXT = PluginContext(plugins_dir=PLUGINS_DIR)
QUESTION = [ChatMessage("user", "满多少包邮？")]
REPLY = "您好！国内订单满99元包邮。Anything else?"


def load_plugin(name: str) -> ModuleType:
    """Import a plugin the way the host does: a fresh module object from its file."""
    spec = importlib.util.spec_from_file_location(f"kefu_plugin_test_{name}", PLUGINS_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OPENAI = load_plugin("openai_compatible")


@contextlib.asynccontextmanager
async def serving(
    config: FakeUpstreamConfig, **settings: Any
) -> AsyncIterator[tuple[FakeUpstream, Provider]]:
    """A fake upstream and a set-up provider pointed at it."""
    async with FakeUpstream(config) as upstream:
        provider = OPENAI.plugin({"base_url": upstream.base_url, "model": "gpt-test", **settings}, CONTEXT)
        await provider.setup()
        try:
            yield upstream, provider
        finally:
            await provider.aclose()


async def collect(
    provider: Provider, messages: Sequence[ChatMessage] = QUESTION, params: GenerationParams | None = None
) -> tuple[str, Finish]:
    stream: list[StreamEvent] = [e async for e in provider.stream(messages, params or GenerationParams())]
    *deltas, finish = stream
    assert all(isinstance(d, Delta) and d.text for d in deltas)
    assert isinstance(finish, Finish)
    return "".join(d.text for d in deltas if isinstance(d, Delta)), finish


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.005)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_openai_compatible_deltas_concatenate_to_the_upstream_text() -> None:
    async with serving(FakeUpstreamConfig(reply=REPLY, chunk_count=6)) as (_, provider):
        text, finish = await collect(provider)

    assert text == REPLY
    assert finish.finish_reason == "stop"


async def test_openai_compatible_usage_comes_from_the_upstream() -> None:
    async with serving(FakeUpstreamConfig(reply=REPLY, usage=(111, 22))) as (_, provider):
        _, finish = await collect(provider)

    assert (finish.usage.prompt_tokens, finish.usage.completion_tokens) == (111, 22)


async def test_openai_compatible_estimates_usage_when_upstream_sends_none() -> None:
    async with serving(FakeUpstreamConfig(reply=REPLY, send_usage=False)) as (_, provider):
        _, finish = await collect(provider)

    assert finish.usage.completion_tokens == len(encoding().encode(REPLY))
    assert finish.usage.prompt_tokens > len(encoding().encode(QUESTION[0].content))


async def test_openai_compatible_finish_names_the_model_the_upstream_reports() -> None:
    async with serving(FakeUpstreamConfig(model="gpt-test-2024-08-06")) as (_, provider):
        _, finish = await collect(provider)

    assert finish.model == "gpt-test-2024-08-06"


async def test_openai_compatible_length_finish_reason_passes_through() -> None:
    async with serving(FakeUpstreamConfig(reply=REPLY)) as (_, provider):
        text, finish = await collect(provider, params=GenerationParams(max_tokens=3))

    assert finish.finish_reason == "length"
    assert REPLY.startswith(text) and text != REPLY


async def test_openai_compatible_request_speaks_openai_roles_and_knobs() -> None:
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "hi"),
        ChatMessage("agent", "Hello, I'm Li."),
        ChatMessage("user", "满多少包邮？"),
    ]
    async with serving(FakeUpstreamConfig()) as (upstream, provider):
        await collect(provider, messages, GenerationParams(max_tokens=50, temperature=0.2))
        sent = upstream.received[-1]

    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
    assert (sent["model"], sent["stream"], sent["stream_options"]) == (
        "gpt-test",
        True,
        {"include_usage": True},
    )
    assert (sent["max_tokens"], sent["temperature"]) == (50, 0.2)


async def test_openai_compatible_survives_split_events_and_keepalive_comments() -> None:
    config = FakeUpstreamConfig(reply=REPLY, chunk_count=8, write_size=5, keepalive_comments=True)
    async with serving(config) as (_, provider):
        text, _ = await collect(provider)

    assert text == REPLY


async def test_openai_compatible_wrong_api_key_is_a_401_error_without_the_key() -> None:
    async with serving(FakeUpstreamConfig(expected_api_key="sk-right"), api_key="sk-wrong-secret") as (
        _,
        provider,
    ):
        with pytest.raises(ProviderError) as caught:
            await collect(provider)

    assert (caught.value.status, caught.value.retryable) == (401, False)
    assert "401" in str(caught.value) and "sk-wrong-secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("status", "retryable"), [(500, True), (503, True), (429, True), (400, False), (404, False)]
)
async def test_openai_compatible_upstream_http_error_carries_status(status: int, retryable: bool) -> None:
    async with serving(FakeUpstreamConfig(fail_status=status)) as (_, provider):
        with pytest.raises(ProviderError) as caught:
            await collect(provider)

    assert (caught.value.status, caught.value.retryable) == (status, retryable)
    assert f"HTTP {status}" in str(caught.value)


async def test_openai_compatible_connection_refused_is_retryable() -> None:
    provider = OPENAI.plugin({"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "gpt-test"}, CONTEXT)
    await provider.setup()
    try:
        with pytest.raises(ProviderError, match="connection refused") as caught:
            await collect(provider)
    finally:
        await provider.aclose()

    assert caught.value.retryable and caught.value.status is None


async def test_openai_compatible_silent_upstream_times_out() -> None:
    async with serving(FakeUpstreamConfig(hang_after_chunks=1), timeout_s=0.2) as (_, provider):
        with pytest.raises(ProviderError, match="timed out") as caught:
            await collect(provider)

    assert caught.value.retryable


async def test_openai_compatible_truncated_stream_is_an_error_not_a_short_answer() -> None:
    async with serving(FakeUpstreamConfig(truncate_after_chunks=2)) as (_, provider):
        with pytest.raises(ProviderError, match="before the answer was complete"):
            await collect(provider)


async def test_openai_compatible_malformed_event_is_an_error() -> None:
    async with serving(FakeUpstreamConfig(malformed_after_chunks=1)) as (_, provider):
        with pytest.raises(ProviderError, match="malformed"):
            await collect(provider)


async def test_openai_compatible_cancel_mid_stream_reaches_the_upstream() -> None:
    async with serving(FakeUpstreamConfig(chunk_count=6, hang_after_chunks=2)) as (upstream, provider):
        two_deltas = asyncio.Event()

        async def consume() -> None:
            seen = 0
            async for _ in provider.stream(QUESTION, GenerationParams()):
                seen += 1
                if seen == 2:
                    two_deltas.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(two_deltas.wait(), 5)
        assert upstream.stats.in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        await wait_for(lambda: upstream.stats.cancelled == 1 and upstream.stats.in_flight == 0)


async def test_openai_compatible_cancel_before_first_token_reaches_the_upstream() -> None:
    async with serving(FakeUpstreamConfig(ttft_s=30)) as (upstream, provider):
        task = asyncio.create_task(collect(provider))
        await wait_for(lambda: upstream.stats.in_flight == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        await wait_for(lambda: upstream.stats.cancelled == 1 and upstream.stats.in_flight == 0)


async def test_openai_compatible_consumer_closing_the_stream_reaches_the_upstream() -> None:
    async with serving(FakeUpstreamConfig(chunk_count=6, hang_after_chunks=3)) as (upstream, provider):
        # plugin_api types stream() as AsyncIterator; it is an async generator, which the host closes.
        generator = cast(AsyncGenerator[StreamEvent, None], provider.stream(QUESTION, GenerationParams()))
        async with contextlib.aclosing(generator) as stream:
            async for _ in stream:
                break

        await wait_for(lambda: upstream.stats.cancelled == 1 and upstream.stats.in_flight == 0)


async def test_openai_compatible_self_test_names_every_bad_setting() -> None:
    provider = OPENAI.plugin({"base_url": "ftp://example.com/v1", "model": ""}, CONTEXT)
    await provider.setup()
    try:
        with pytest.raises(ProviderError, match=r"base_url.*model is required"):
            await provider.self_test()
    finally:
        await provider.aclose()


async def test_openai_compatible_self_test_does_not_call_the_upstream() -> None:
    provider = OPENAI.plugin({"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "gpt-test"}, CONTEXT)
    await provider.setup()
    try:
        await provider.self_test()
    finally:
        await provider.aclose()


def test_openai_compatible_rejects_a_non_numeric_timeout() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        OPENAI.plugin({"base_url": "http://127.0.0.1/v1", "model": "m", "timeout_s": "60"}, CONTEXT)


def test_openai_compatible_capabilities() -> None:
    assert {"stream", "temperature", "max_tokens"} <= OPENAI.plugin.capabilities


@given(
    st.lists(
        st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=20),
        min_size=1,
        max_size=5,
    ),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(min_value=1, max_value=7), min_size=1),
)
def test_sse_decoder_yields_the_same_events_however_bytes_are_split(
    data: list[str], newline: bytes, sizes: list[int]
) -> None:
    wire = b"".join(b": keep-alive" + newline + b"data: " + d.encode() + newline + newline for d in data)
    decoder = OPENAI.SSEDecoder()
    got: list[str] = []
    start = 0
    while start < len(wire):
        size = sizes[start % len(sizes)]
        got += decoder.feed(wire[start : start + size])
        start += size

    assert got + decoder.close() == data
