"""The edge across process boundaries: request ids in every log, hang-ups leak nothing, SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
import urllib.request

import aiohttp

from bench.sse_reader import read_sse
from devtools.devstack.stack import Stack
from devtools.fake_upstream import FakeUpstream, FakeUpstreamConfig
from tests.e2e.stack_helpers import auth, edge_metrics_url


def metric(url: str, name: str) -> float:
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


async def test_request_id_reaches_every_service_log(upstream_stack: Stack, upstream_port: int) -> None:
    request_id = f"trace-{random.getrandbits(64):016x}"
    async with FakeUpstream(FakeUpstreamConfig(reply="ok"), port=upstream_port):
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{upstream_stack.base_url}/v1/chat", json={"message": "hi", "stream": False},
                                 headers={**auth(), "X-Request-Id": request_id}) as response:
                assert response.headers["X-Request-Id"] == request_id
    log_dir = upstream_stack.config.log_dir
    assert log_dir is not None
    for process in ("session", "moderation", "llm_worker"):
        records = [json.loads(line) for line in (log_dir / f"{process}.log").read_text().splitlines()
                   if line.startswith("{")]
        assert any(r.get("request_id") == request_id for r in records), process


async def test_two_hundred_hang_ups_leave_no_stream_open(upstream_stack: Stack, upstream_port: int) -> None:
    # 40 chunks over 2 s; every client leaves within its first 10 events, i.e. mid-answer.
    config = FakeUpstreamConfig(reply="z" * 40, chunk_count=40, chunk_interval_s=0.05)
    async with FakeUpstream(config, port=upstream_port) as upstream:
        async def hang_up_somewhere(http: aiohttp.ClientSession, index: int) -> None:
            keep = random.randint(0, 10)
            async with http.post(f"{upstream_stack.base_url}/v1/chat", json={"message": f"hi {index}"},
                                 headers=auth(sub=f"leaver-{index}")) as response:
                seen = 0
                async for event in read_sse(response):
                    seen += event.event == "message"
                    if seen >= keep:
                        return  # leaving the block closes the connection mid-stream

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as http:
            await asyncio.gather(*(hang_up_somewhere(http, i) for i in range(200)))
        deadline = time.monotonic() + 20
        ports = upstream_stack.config.ports
        while time.monotonic() < deadline:
            gauges = (upstream.stats.in_flight, metric(edge_metrics_url(upstream_stack), "kefu_active_streams"),
                      metric(f"http://127.0.0.1:{ports.worker_metrics}/metrics", "kefu_active_streams"))
            if gauges == (0, 0, 0):
                break
            await asyncio.sleep(0.1)
        assert gauges == (0, 0, 0)
        stats = upstream.stats
        # Clients that left before the answer began never reached the upstream; every one that
        # left mid-answer shows up there as a cancelled request (a few may have seen the whole
        # answer in 10 events when deltas were batched under load).
        assert stats.cancelled + stats.completed == stats.requests_total <= 200
        assert stats.cancelled >= 0.9 * stats.requests_total > 0


async def test_sigterm_drains_the_stream_in_flight_and_exits_zero(upstream_stack: Stack, upstream_port: int) -> None:
    config = FakeUpstreamConfig(reply="d" * 30, chunk_count=30, chunk_interval_s=0.05)
    async with FakeUpstream(config, port=upstream_port):
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{upstream_stack.base_url}/v1/chat", json={"message": "hi"},
                                 headers=auth()) as response:
                names = []
                async for event in read_sse(response):
                    names.append(event.event)
                    if names.count("message") == 2:
                        upstream_stack.processes["gateway"].send_signal(signal.SIGTERM)
                        await asyncio.sleep(0.2)
                        async with http.get(f"{upstream_stack.base_url}/readyz") as ready:
                            assert ready.status == 503
                        async with http.post(f"{upstream_stack.base_url}/v1/chat", json={"message": "new"},
                                             headers=auth(sub="late")) as late:
                            assert late.status == 503
                            assert (await late.json())["error"]["code"] == "draining"
        assert names[-1] == "done" and names.count("message") > 2
        assert await asyncio.to_thread(upstream_stack.processes["gateway"].wait, 10) == 0
    upstream_stack.start_process("gateway")
    await asyncio.to_thread(upstream_stack.wait_http_ready, time.monotonic() + 30)
