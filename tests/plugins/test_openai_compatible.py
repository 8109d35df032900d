"""The OpenAI-compatible provider, loaded as the worker loads it, against the fake upstream on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from devtools.fake_replies import encoding
from devtools.fake_upstream import FakeUpstream, FakeUpstreamConfig, create_app
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
from tests.plugins.plugin_loading import PLUGINS_DIR, load_plugin

pytestmark = pytest.mark.timeout(20)

CONTEXT = PluginContext(plugins_dir=PLUGINS_DIR)
QUESTION = [ChatMessage("user", "满多少包邮？")]
REPLY = "您好！国内订单满99元包邮。Anything else?"


OPENAI = load_plugin("openai_compatible")


@contextlib.asynccontextmanager
async def provider_for(base_url: str, **settings: Any) -> AsyncIterator[Provider]:
    """A set-up provider for `base_url`; retries back off for 1 ms unless the test says otherwise."""
    provider = OPENAI.plugin({"base_url": base_url, "model": "gpt-test", "retry_backoff_s": 0.001, **settings}, CONTEXT)
    await provider.setup()
    try:
        yield provider
    finally:
        await provider.aclose()


@contextlib.asynccontextmanager
async def serving(config: FakeUpstreamConfig, **settings: Any) -> AsyncIterator[tuple[FakeUpstream, Provider]]:
    """A fake upstream and a set-up provider pointed at it."""
    async with FakeUpstream(config) as upstream, provider_for(upstream.base_url, **settings) as provider:
        yield upstream, provider


@dataclass
class Arrivals:
    """What a flaky upstream saw: when each request arrived, and from which client address."""

    times: list[float] = field(default_factory=list)
    peers: list[Any] = field(default_factory=list)

    @property
    def gaps(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.times, self.times[1:], strict=False)]


@contextlib.asynccontextmanager
async def flaky_upstream(
    failures: int, status: int | None = 503, headers: dict[str, str] | None = None
) -> AsyncIterator[tuple[str, Arrivals]]:
    """The fake upstream behind a middleware that fails the first `failures` requests.

    A failure is an OpenAI-shaped error with `status` and `headers`, or, with `status=None`, a
    connection dropped before any answer (a reset). Later requests get the fake's normal stream.
    """
    arrivals = Arrivals()

    @web.middleware
    async def fail_first(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        arrivals.times.append(time.monotonic())
        assert request.transport is not None
        arrivals.peers.append(request.transport.get_extra_info("peername"))
        if len(arrivals.times) > failures:
            return await handler(request)
        if status is None:
            request.transport.abort()
            raise asyncio.CancelledError
        error = {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}
        return web.json_response(error, status=status, headers=headers)

    app = create_app(FakeUpstreamConfig(reply=REPLY, chunk_count=4))
    app.middlewares.append(fail_first)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1", arrivals
    finally:
        await runner.cleanup()


async def drain(provider: Provider) -> tuple[str, ProviderError]:
    """The text streamed before the stream failed, and its error (fails if the stream succeeds)."""
    texts: list[str] = []
    with pytest.raises(ProviderError) as caught:
        async for event in provider.stream(QUESTION, GenerationParams()):
            if isinstance(event, Delta):
                texts.append(event.text)
    return "".join(texts), caught.value


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
    ("status", "retryable"),
    [
        (500, True),
        (502, True),
        (503, True),
        (429, True),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
    ],
)
async def test_openai_compatible_upstream_http_error_carries_status_after_retrying_only_retryable_ones(
    status: int, retryable: bool
) -> None:
    async with serving(FakeUpstreamConfig(fail_status=status), max_retries=2) as (upstream, provider):
        with pytest.raises(ProviderError) as caught:
            await collect(provider)

    assert (caught.value.status, caught.value.retryable) == (status, retryable)
    assert f"HTTP {status}" in str(caught.value)
    assert upstream.stats.requests_total == (3 if retryable else 1)


@pytest.mark.parametrize("status", [503, 500, 429, None])
async def test_openai_compatible_retries_a_failure_before_the_first_token(status: int | None) -> None:
    async with (
        flaky_upstream(failures=1, status=status) as (base_url, arrivals),
        provider_for(base_url) as provider,
    ):
        text, finish = await collect(provider)

    assert (text, finish.finish_reason) == (REPLY, "stop")
    assert len(arrivals.times) == 2


async def test_openai_compatible_max_retries_zero_sends_one_request() -> None:
    async with serving(FakeUpstreamConfig(fail_status=503), max_retries=0) as (upstream, provider):
        with pytest.raises(ProviderError):
            await collect(provider)

    assert upstream.stats.requests_total == 1


@pytest.mark.parametrize(
    ("config", "settings"),
    [
        (FakeUpstreamConfig(reply=REPLY, chunk_count=6, hang_after_chunks=2), {"idle_timeout_s": 0.2}),
        (FakeUpstreamConfig(reply=REPLY, chunk_count=6, truncate_after_chunks=2), {}),
        (FakeUpstreamConfig(reply=REPLY, chunk_count=6, malformed_after_chunks=2), {}),
    ],
    ids=["hang", "truncate", "malformed"],
)
async def test_openai_compatible_never_retries_after_the_first_token(
    config: FakeUpstreamConfig, settings: dict[str, float]
) -> None:
    async with serving(config, max_retries=3, **settings) as (upstream, provider):
        text, error = await drain(provider)

    assert text and REPLY.startswith(text) and text != REPLY
    assert error.retryable and error.status is None
    assert upstream.stats.requests_total == 1


@pytest.mark.parametrize(("headers", "wait_s"), [({"Retry-After": "1"}, 1.0), ({"retry-after-ms": "300"}, 0.3)])
async def test_openai_compatible_waits_as_long_as_retry_after_says(headers: dict[str, str], wait_s: float) -> None:
    async with (
        flaky_upstream(failures=1, status=429, headers=headers) as (base_url, arrivals),
        provider_for(base_url, retry_backoff_s=0.001, retry_backoff_max_s=5) as provider,
    ):
        text, _ = await collect(provider)

    assert text == REPLY
    assert wait_s <= arrivals.gaps[0] < wait_s + 0.5


async def test_openai_compatible_retry_after_beyond_the_cap_fails_at_once() -> None:
    async with (
        flaky_upstream(failures=1, status=429, headers={"Retry-After": "60"}) as (
            base_url,
            arrivals,
        ),
        provider_for(base_url, retry_backoff_max_s=2) as provider,
    ):
        started = time.monotonic()
        with pytest.raises(ProviderError) as caught:
            await collect(provider)

    assert (caught.value.status, caught.value.retryable) == (429, True)
    assert len(arrivals.times) == 1 and time.monotonic() - started < 1


async def test_openai_compatible_never_waits_past_the_total_timeout() -> None:
    async with (
        flaky_upstream(failures=1, status=503, headers={"Retry-After": "1"}) as (
            base_url,
            arrivals,
        ),
        provider_for(base_url, total_timeout_s=0.5) as provider,
    ):
        started = time.monotonic()
        with pytest.raises(ProviderError) as caught:
            await collect(provider)

    assert caught.value.status == 503
    assert len(arrivals.times) == 1 and time.monotonic() - started < 0.5


async def test_openai_compatible_reuses_pooled_connections() -> None:
    async with flaky_upstream(failures=0) as (base_url, arrivals), provider_for(base_url) as provider:
        for _ in range(3):
            assert (await collect(provider))[0] == REPLY

    assert len(arrivals.peers) == 3 and len(set(arrivals.peers)) == 1


async def test_openai_compatible_max_connections_bounds_concurrent_upstream_requests() -> None:
    config = FakeUpstreamConfig(reply=REPLY, chunk_count=4, chunk_interval_s=0.05)
    async with serving(config, max_connections=2) as (upstream, provider):
        results = await asyncio.gather(*(collect(provider) for _ in range(5)))

    assert [text for text, _ in results] == [REPLY] * 5
    assert upstream.stats.max_in_flight == 2


async def test_openai_compatible_connection_refused_is_retryable() -> None:
    async with provider_for(f"http://127.0.0.1:{free_port()}/v1") as provider:
        with pytest.raises(ProviderError, match="connection refused") as caught:
            await collect(provider)

    assert caught.value.retryable and caught.value.status is None
    assert not isinstance(caught.value.__cause__, TimeoutError)


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A port whose connects hang: a listener with a full backlog that never accepts (Linux drops the SYNs)."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(3):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port


async def test_openai_compatible_connect_timeout() -> None:
    with unanswered_port() as port:
        async with provider_for(f"http://127.0.0.1:{port}/v1", connect_timeout_s=0.2, max_retries=0) as provider:
            started = time.monotonic()
            _, error = await drain(provider)

    assert time.monotonic() - started < 1.5
    assert "connect_timeout_s" in str(error) and isinstance(error.__cause__, TimeoutError)
    assert (error.status, error.retryable) == (None, True)


async def test_openai_compatible_silent_upstream_times_out_with_the_legacy_timeout_s() -> None:
    async with serving(FakeUpstreamConfig(hang_after_chunks=1), timeout_s=0.2) as (upstream, provider):
        with pytest.raises(ProviderError, match="timed out") as caught:
            await collect(provider)

    assert caught.value.retryable and caught.value.status is None
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert upstream.stats.requests_total == 1


@pytest.mark.parametrize(
    "config",
    [FakeUpstreamConfig(ttft_s=5), FakeUpstreamConfig(hang_after_chunks=0, keepalive_comments=True)],
    ids=["no-headers", "role-chunk-only"],
)
async def test_openai_compatible_first_token_timeout(config: FakeUpstreamConfig) -> None:
    async with serving(config, first_token_timeout_s=0.2, idle_timeout_s=10, max_retries=0) as (_, provider):
        started = time.monotonic()
        _, error = await drain(provider)

    assert time.monotonic() - started < 1.5
    assert "timed out" in str(error) and "first_token_timeout_s" in str(error)
    assert isinstance(error.__cause__, TimeoutError)
    assert (error.status, error.retryable) == (None, True)


async def test_openai_compatible_first_token_timeout_is_retried() -> None:
    async with serving(FakeUpstreamConfig(ttft_s=5), first_token_timeout_s=0.1, max_retries=1) as (
        upstream,
        provider,
    ):
        _, error = await drain(provider)

    assert isinstance(error.__cause__, TimeoutError)
    assert upstream.stats.requests_total == 2


async def test_openai_compatible_total_timeout_ends_a_slow_stream_without_retrying() -> None:
    config = FakeUpstreamConfig(reply=REPLY, chunk_count=20, chunk_interval_s=0.05)
    async with serving(config, total_timeout_s=0.3, max_retries=2) as (upstream, provider):
        text, error = await drain(provider)

    assert text and REPLY.startswith(text) and text != REPLY
    assert "total_timeout_s" in str(error) and isinstance(error.__cause__, TimeoutError)
    assert upstream.stats.requests_total == 1


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
        # The host closes the stream with contextlib.aclosing when its consumer stops early.
        generator = provider.stream(QUESTION, GenerationParams())
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


def test_openai_compatible_timeout_defaults() -> None:
    settings = OPENAI.OpenAISettings.from_mapping({"base_url": "http://127.0.0.1/v1", "model": "m"})
    assert (
        settings.connect_timeout_s,
        settings.first_token_timeout_s,
        settings.idle_timeout_s,
        settings.total_timeout_s,
        settings.max_retries,
    ) == (5, 30, 60, 300, 2)


def test_openai_compatible_legacy_timeout_s_sets_first_token_and_idle_unless_given() -> None:
    base = {"base_url": "http://127.0.0.1/v1", "model": "m", "timeout_s": 7}
    legacy = OPENAI.OpenAISettings.from_mapping(base)
    explicit = OPENAI.OpenAISettings.from_mapping({**base, "first_token_timeout_s": 3})

    assert (legacy.first_token_timeout_s, legacy.idle_timeout_s) == (7, 7)
    assert (explicit.first_token_timeout_s, explicit.idle_timeout_s) == (3, 7)


async def test_openai_compatible_self_test_names_a_bad_timeout() -> None:
    async with provider_for("http://127.0.0.1:1/v1", total_timeout_s=0) as provider:
        with pytest.raises(ProviderError, match="total_timeout_s must be > 0"):
            await provider.self_test()


@pytest.mark.parametrize("attempt", range(8))
def test_backoff_delay_is_full_jitter_under_the_capped_exponential(attempt: int) -> None:
    rng = random.Random(attempt)
    ceiling = min(2.0, 0.1 * 2**attempt)
    delays = [OPENAI.backoff_delay(attempt, 0.1, 2.0, rng) for _ in range(200)]

    assert all(0 <= d <= ceiling for d in delays)
    assert min(delays) < ceiling * 0.1 and max(delays) > ceiling * 0.9


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "3"}, 3.0),
        ({"Retry-After": "0"}, 0.0),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"Retry-After": email.utils.formatdate(1_000_010.0, usegmt=True)}, 10.0),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_seconds_milliseconds_and_http_dates(headers: dict[str, str], expected: float | None) -> None:
    assert OPENAI.retry_after_s(headers, now=1_000_000.0) == expected


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


async def test_openai_compatible_idle_deadline_moves_with_every_read() -> None:
    # 1.2 s of chunks 0.1 s apart against a 0.3 s idle timeout: one timer serves every read, so it
    # must follow the reads rather than expire at the first deadline it was set for.
    config = FakeUpstreamConfig(reply=REPLY, chunk_count=12, chunk_interval_s=0.1)
    async with serving(config, idle_timeout_s=0.3, first_token_timeout_s=0.3, max_retries=0) as (_, provider):
        text, finish = await collect(provider)

    assert (text, finish.finish_reason) == (REPLY, "stop")


async def test_openai_compatible_idle_timeout_shorter_than_the_first_token_one_still_fires() -> None:
    config = FakeUpstreamConfig(reply=REPLY, chunk_count=6, hang_after_chunks=2)
    async with serving(config, first_token_timeout_s=10, idle_timeout_s=0.2, max_retries=0) as (_, provider):
        started = time.monotonic()
        text, error = await drain(provider)

    assert time.monotonic() - started < 5  # the idle deadline, not the first token's 10 s
    assert text and REPLY.startswith(text) and text != REPLY
    assert "idle_timeout_s" in str(error) and isinstance(error.__cause__, TimeoutError)
