"""Issue 17 item 9 (but lone surrogates): public /metrics, /readyz fan-out, endless visitor tokens, pregen backlog."""

from __future__ import annotations

import asyncio
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import AsyncGenerator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from devtools.devstack.stack import Stack, listens_on
from services.llm_worker.cache import AnswerCache, LocalTier
from services.llm_worker.metrics import WorkerMetrics
from services.llm_worker.plugin_api import ChatMessage, Delta, Finish, GenerationParams, StreamEvent, Usage
from services.llm_worker.plugin_host import Target
from services.llm_worker.pregen import Pregenerator, PregenJob
from services.llm_worker.routes import TargetSpec
from tests.e2e.stack_helpers import SECRET, edge_metrics_url, start_stack

DAY_S = 86400
MAX_LIFETIME_S = 90 * DAY_S  # KEFU_VISITOR_MAX_LIFETIME_S's default


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("small-items"), {"KEFU_WIDGET_TENANTS": "shop1"})
    try:
        yield stack
    finally:
        stack.stop()


def edge_metric(stack: Stack, sample: str) -> float:
    with urllib.request.urlopen(edge_metrics_url(stack), timeout=5) as response:
        body = response.read().decode()
    found = re.search(rf"^{re.escape(sample)} (\S+)$", body, re.MULTILINE)
    return float(found[1]) if found else 0.0


async def test_sec_metrics_are_not_on_the_public_port(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.base_url}/metrics") as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "not_found"
            assert "kefu_" not in await response.text()
        async with http.get(edge_metrics_url(stack)) as response:
            assert response.status == 200
            assert "kefu_http_request_duration_seconds" in await response.text()


def test_sec_each_edge_worker_serves_its_metrics_on_a_port_of_its_own(tmp_path: Path) -> None:
    """Two edge processes share the public port; each keeps its own registry on its own metrics port."""
    two = start_stack(tmp_path, workers=2)
    try:
        pids = {name: process.pid for name, process in two.processes.items() if name.startswith("gateway")}
        assert len(pids) == 2
        owners = set()
        for worker in range(2):
            url = edge_metrics_url(two, worker)
            with urllib.request.urlopen(url, timeout=5) as response:
                assert "kefu_http_request_duration_seconds" in response.read().decode()
            port = int(url.split(":")[2].split("/")[0])
            owners |= {pid for pid in pids.values() if listens_on(pid, port)}
        assert owners == set(pids.values())  # one port each, not one answering for both
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{two.base_url}/metrics", timeout=5)
        refused.value.close()
        assert refused.value.code == 404
    finally:
        two.stop()


async def test_sec_readyz_burst_makes_about_one_round_of_checks_a_second(stack: Stack) -> None:
    before = edge_metric(stack, "kefu_readiness_checks_total")
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        async def probe() -> int:
            async with http.get(f"{stack.base_url}/readyz") as response:
                return response.status

        statuses = []
        for _ in range(6):  # 300 probes, 50 at a time
            statuses += await asyncio.gather(*(probe() for _ in range(50)))
    elapsed = time.monotonic() - started
    rounds = edge_metric(stack, "kefu_readiness_checks_total") - before
    assert set(statuses) == {200}
    # Before: one round (three gRPC calls) per probe, 300 here.
    assert 0 <= rounds <= math.ceil(elapsed) + 1, (rounds, elapsed)


async def visitor_token(http: aiohttp.ClientSession, stack: Stack,
                        previous: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {previous}"} if previous else {}
    async with http.post(f"{stack.base_url}/v1/widget/token", json={"tenant": "shop1"}, headers=headers) as response:
        return response.status, await response.json()


def claims_of(token: str) -> dict[str, int | str]:
    return jwt.decode(token, SECRET, algorithms=["HS256"])


async def test_sec_visitor_token_renewal_keeps_the_chain_start_and_the_chain_ends(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        status, first = await visitor_token(http, stack)
        assert status == 200
        start = claims_of(first["token"])["orig_iat"]
        assert start == claims_of(first["token"])["iat"]
        status, renewed = await visitor_token(http, stack, first["token"])
        assert status == 200 and renewed["visitor_id"] == first["visitor_id"]
        assert claims_of(renewed["token"])["orig_iat"] == start  # a renewal keeps the original start

        now = int(time.time())

        def old_token(chain_started_s_ago: int, **extra: int) -> str:
            return jwt.encode({"sub": "v_regular_visitor_0000", "tenant": "shop1", "role": "visitor",
                               "iat": now - DAY_S, "exp": now - 3600, "orig_iat": now - chain_started_s_ago, **extra},
                              SECRET, algorithm="HS256")

        # A chain that started beyond the cap renews no more, however fresh its last token.
        status, refused = await visitor_token(http, stack, old_token(MAX_LIFETIME_S + DAY_S))
        assert status == 401 and refused["error"]["code"] == "unauthorized"
        assert "renew no more" in refused["error"]["message"]
        # Near the end of its chain, a renewal is valid only until the chain ends.
        status, last = await visitor_token(http, stack, old_token(MAX_LIFETIME_S - 600))
        assert status == 200 and last["expires_in"] <= 600
        expires = claims_of(last["token"])["exp"]
        assert isinstance(expires, int) and expires <= now - (MAX_LIFETIME_S - 600) + MAX_LIFETIME_S + 1
        # A token from before chains had a start (no orig_iat): its own iat starts one.
        legacy = jwt.encode({"sub": "v_legacy_visitor_00000", "tenant": "shop1", "role": "visitor",
                             "iat": now - 100 * DAY_S, "exp": now - 99 * DAY_S}, SECRET, algorithm="HS256")
        assert (await visitor_token(http, stack, legacy))[0] == 401


async def test_sec_readyz_says_503_soon_after_a_backend_dies(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async def ready_status() -> int:
            async with http.get(f"{stack.base_url}/readyz") as response:
                return response.status

        assert await ready_status() == 200
        stack.kill("moderation")
        try:
            deadline = time.monotonic() + 3  # one cached second plus a round of checks
            while await ready_status() != 503:
                assert time.monotonic() < deadline, "readyz still 200 three seconds after moderation died"
                await asyncio.sleep(0.05)
        finally:
            stack.start_process("moderation")
        stack.wait_grpc_serving("moderation", stack.config.ports.moderation, time.monotonic() + 30)
        deadline = time.monotonic() + 10
        while await ready_status() != 200:
            assert time.monotonic() < deadline, "readyz not 200 again after moderation came back"
            await asyncio.sleep(0.1)


class CountingProvider:
    """A real provider (it streams an answer), recording the questions it was asked."""

    capabilities = frozenset({"stream"})

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def setup(self) -> None:
        pass

    async def stream(self, messages: Sequence[ChatMessage],
                     params: GenerationParams) -> AsyncGenerator[StreamEvent, None]:
        self.asked.append(messages[-1].content)
        yield Delta(f"answer to {messages[-1].content}")
        yield Finish("stop", Usage(5, 5), "counting-model")

    async def self_test(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_sec_pregeneration_backlog_is_bounded_and_drops_the_oldest() -> None:
    metrics = WorkerMetrics()
    provider = CountingProvider()
    target = Target(TargetSpec("counting"), provider)
    busy = True
    pregen = Pregenerator(AnswerCache(LocalTier(1 << 20, 60)), metrics, live_streams=lambda: 100 if busy else 0,
                          concurrency=1, max_queued=8, max_wait_s=60)
    try:
        jobs = [PregenJob("t", "default", "v1", target, (), f"question {i}", GenerationParams()) for i in range(30)]
        pregen.schedule(jobs[:1])
        await asyncio.sleep(0.05)  # the first job takes the tenant's one slot and waits for live traffic there
        pregen.schedule(jobs[1:])
        assert pregen.queued() == 8
        assert metrics.registry.get_sample_value("kefu_pregenerations_total", {"result": "dropped"}) == 21
        busy = False
        deadline = time.monotonic() + 10
        while len(provider.asked) < 9:
            assert time.monotonic() < deadline, provider.asked
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        # The newest eight and the one already running; the oldest waiting ones were dropped.
        assert sorted(provider.asked) == sorted(f"question {i}" for i in (0, *range(22, 30)))
        assert pregen.queued() == 0
    finally:
        await pregen.aclose()
