"""The load generator counts, classifies and summarises requests; the percentile helper is exact."""

from __future__ import annotations

import statistics
from collections.abc import Mapping

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.loadgen import LoadSpec, Summary, Target, percentile, percentiles, run_load
from devtools.fake_upstream import FakeUpstream, FakeUpstreamConfig

pytestmark = pytest.mark.timeout(10)


def openai_body(user: int, seq: int) -> Mapping[str, object]:
    return {"model": "m", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"user {user} request {seq}"}]}


def openai_target(upstream: FakeUpstream) -> Target:
    return Target("direct", f"{upstream.base_url}/chat/completions", "openai", openai_body)


def assert_ordered(summary: Summary | None) -> None:
    assert summary is not None
    assert summary.min <= summary.p50 <= summary.p95 <= summary.p99 <= summary.max


async def test_loadgen_openai_stream_counts_every_request_as_success() -> None:
    config = FakeUpstreamConfig(chunk_count=4, chunk_interval_s=0.002)
    async with FakeUpstream(config) as upstream:
        result = await run_load(openai_target(upstream), LoadSpec(concurrency=3, requests=9))
        assert upstream.stats.requests_total == upstream.stats.completed == 9
        assert upstream.stats.max_in_flight <= 3

    assert (result.requests, result.succeeded, result.failed, result.errors) == (9, 9, 0, {})
    assert {r.user for r in result.samples} == {0, 1, 2}
    assert result.ttft is not None and result.ttft.count == 9
    assert result.total is not None and result.total.count == 9
    assert_ordered(result.ttft)
    assert_ordered(result.total)
    assert all(r.ttft_s is not None and r.ttft_s <= r.total_s for r in result.samples)
    assert result.throughput_rps > 0


async def test_loadgen_http_error_is_a_failure_counted_by_code() -> None:
    async with FakeUpstream(FakeUpstreamConfig(fail_status=429)) as upstream:
        result = await run_load(openai_target(upstream), LoadSpec(concurrency=2, requests=4))

    assert (result.succeeded, result.failed) == (0, 4)
    assert result.errors == {"http_429:rate_limit_exceeded": 4}
    assert result.ttft is None and result.total is None and result.throughput_rps == 0


async def test_loadgen_stream_cut_before_done_is_incomplete() -> None:
    async with FakeUpstream(FakeUpstreamConfig(chunk_count=4, truncate_after_chunks=2)) as upstream:
        result = await run_load(openai_target(upstream), LoadSpec(concurrency=1, requests=2))

    assert result.errors == {"incomplete_stream": 2}
    assert all(r.ttft_s is not None for r in result.samples)  # content came, the end did not


async def test_loadgen_duration_mode_stops_at_the_deadline() -> None:
    async with FakeUpstream(FakeUpstreamConfig(chunk_count=2)) as upstream:
        result = await run_load(openai_target(upstream), LoadSpec(concurrency=2, duration_s=0.2))

    assert result.requests >= 2 and result.failed == 0


def kefu_app(events: list[tuple[str, str]]) -> web.Application:
    """An edge stand-in that answers every /v1/chat with these (event, data) pairs."""
    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for name, data in events:
            await response.write(f"event: {name}\ndata: {data}\n\n".encode())
        return response

    app = web.Application()
    app.router.add_post("/v1/chat", chat)
    return app


@pytest.mark.parametrize(("last", "errors", "cached"), [
    (("done", '{"cached": true}'), {}, 2),
    (("error", '{"code": "content_blocked", "message": "stopped"}'), {"content_blocked": 2}, 0),
])
async def test_loadgen_kefu_stream_ends_by_its_last_event(last: tuple[str, str], errors: dict[str, int],
                                                          cached: int) -> None:
    events = [("session", '{"session_id": "s", "message_id": "m"}'), ("message", '{"delta": "你好"}'), last]
    async with TestServer(kefu_app(events)) as server:
        target = Target("kefu", str(server.make_url("/v1/chat")), "kefu", lambda u, s: {"message": "hi"})
        result = await run_load(target, LoadSpec(concurrency=1, requests=2))

    assert (result.errors, result.cached) == (errors, cached)
    assert all(r.ttft_s is not None for r in result.samples)


def test_loadgen_spec_needs_exactly_one_of_requests_and_duration() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        LoadSpec(concurrency=1)
    with pytest.raises(ValueError, match="exactly one"):
        LoadSpec(concurrency=1, requests=1, duration_s=1.0)


def test_percentile_interpolates_between_closest_ranks() -> None:
    data = [float(v) for v in range(1, 101)]
    assert percentiles(data, (0, 50, 95, 99, 100)) == pytest.approx([1.0, 50.5, 95.05, 99.01, 100.0])
    assert percentile([5.0, 1.0, 3.0, 4.0, 2.0], 50) == 3.0
    assert percentile([7.0], 99) == 7.0


def test_percentile_matches_statistics_quantiles_inclusive() -> None:
    data = [0.3, 12.5, 7.25, 1.0, 99.0, 42.0, 3.5, 8.0, 15.0, 2.25, 60.0]
    expected = statistics.quantiles(data, n=100, method="inclusive")
    assert [percentile(data, q) for q in range(1, 100)] == pytest.approx(expected)


def test_percentile_rejects_no_data_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
