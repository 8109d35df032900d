"""Issue 17 (floods): a login flood from a botnet, an address and a user name of its own per login, passes every
per-address and per-user bucket; the edge still verifies at most KEFU_LOGIN_MAX_PER_S passwords a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import pytest

from devtools.devstack.stack import Stack
from tests.e2e.stack_helpers import edge_metrics_url, start_stack

MAX_PER_S = 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Behind a trusted proxy (127.0.0.1), so every login can come from an address of its own.
    started = start_stack(tmp_path_factory.mktemp("login-rate-cap"), {
        "KEFU_TRUSTED_PROXIES": "127.0.0.1", "KEFU_LOGIN_MAX_PER_S": str(MAX_PER_S),
        "KEFU_LOGIN_MAX_CONCURRENT": "4"})
    try:
        yield started
    finally:
        started.stop()


async def metric(http: aiohttp.ClientSession, stack: Stack, name: str) -> float:
    async with http.get(edge_metrics_url(stack)) as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_sec_a_botnet_login_flood_gets_at_most_the_verification_rate(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async def login(wave: int, i: int) -> int:
            async with http.post(f"{stack.base_url}/v1/console/login",
                                 headers={"X-Forwarded-For": f"10.77.{wave}.{i + 1}"},
                                 json={"tenant": "shop1", "username": f"bot-{wave}-{i}", "password": "guess"}
                                 ) as response:
                await response.read()
                return response.status

        verified_before = await metric(http, stack, 'kefu_console_logins_total{outcome="invalid"}')
        started = time.monotonic()
        statuses = []
        for wave in range(3):
            statuses += await asyncio.gather(*(login(wave, i) for i in range(60)))
        elapsed = time.monotonic() - started
        assert set(statuses) <= {401, 429}, statuses  # never a 5xx
        verified = await metric(http, stack, 'kefu_console_logins_total{outcome="invalid"}') - verified_before
        # Each 401 is one argon2 verification: the burst, then the rate; every other login got 429 `busy`.
        assert statuses.count(401) == verified
        assert 1 <= verified <= MAX_PER_S + MAX_PER_S * elapsed + 1, (verified, elapsed)
        assert statuses.count(429) >= 180 - verified
        assert await metric(http, stack, 'kefu_console_logins_total{outcome="busy"}') >= 180 - verified
        async with http.get(f"{stack.base_url}/readyz") as response:
            assert response.status == 200
