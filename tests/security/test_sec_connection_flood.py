"""Issue 17 (floods): an abusive address is cut at accept, before any HTTP parsing; others, and proxies, are not.

The edge listens on 127.0.0.1; Linux answers the whole of 127/8 on loopback, so each test attacks from an
address of its own (127.0.0.x) and another address stands for everyone else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import pytest

from devtools.devstack.stack import Stack
from tests.e2e.stack_helpers import edge_metrics_url, start_stack

BURST = 10
MAX_REFUSALS = 5
PROXY = "127.0.0.60"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_stack(tmp_path_factory.mktemp("sec-conn-flood"), {
        "KEFU_CONN_RPS": "2", "KEFU_CONN_BURST": str(BURST), "KEFU_CONN_MAX_REFUSALS": str(MAX_REFUSALS),
        "KEFU_CONN_PENALTY_S": "1", "KEFU_CONN_MAX_PENALTY_S": "2", "KEFU_TRUSTED_PROXIES": PROXY,
        # Every widget token request past the first from an address is a cheap 429 (a per-address bucket).
        "KEFU_WIDGET_TOKEN_RPS": "0.01", "KEFU_WIDGET_TOKEN_BURST": "1"})
    try:
        yield started
    finally:
        started.stop()


async def get_once(stack: Stack, source: str, path: str = "/healthz") -> bytes:
    """One request on a fresh connection from `source`: the raw answer, b"" when closed without one."""
    port = int(stack.base_url.rsplit(":", 1)[1])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except ConnectionError:
        return b""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: kefu\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def metric(http: aiohttp.ClientSession, stack: Stack, name: str) -> float:
    async with http.get(edge_metrics_url(stack)) as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def hammer(http: aiohttp.ClientSession, stack: Stack, requests: int, headers: dict[str, str] | None = None
                 ) -> list[tuple[int, str]]:
    """`requests` widget-token requests in a row on one keep-alive connection of `http`: (status, Connection)."""
    answers = []
    for _ in range(requests):
        try:
            async with http.post(f"{stack.base_url}/v1/widget/token", json={"tenant": "shop1"},
                                 headers=headers) as response:
                await response.read()
                answers.append((response.status, response.headers.get("Connection", "")))
        except aiohttp.ClientConnectionError:
            answers.append((0, "cut"))
    return answers


def source(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from `address`, one keep-alive connection at a time."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0), limit=1))


async def test_sec_a_connection_flood_is_cut_at_accept_while_another_address_is_served(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        cut_before = await metric(http, stack, 'kefu_connections_cut_total{reason="rate"}')
        answers = await asyncio.gather(*(get_once(stack, "127.0.0.20") for _ in range(4 * BURST)))
        served = [a for a in answers if a.startswith(b"HTTP/1.1 200")]
        assert len(served) >= BURST - 2 and answers.count(b"") >= 2 * BURST, [a[:12] for a in answers]
        # Cut without a byte of HTTP: no 429 to build, nothing parsed.
        assert all(a == b"" or a.startswith(b"HTTP/1.1 200") for a in answers)
        assert await metric(http, stack, 'kefu_connections_cut_total{reason="rate"}') - cut_before >= 2 * BURST
        # Everyone else is served meanwhile.
        assert (await get_once(stack, "127.0.0.21")).startswith(b"HTTP/1.1 200")
        assert (await get_once(stack, "127.0.0.20")) == b""


async def test_sec_refusals_in_a_row_close_the_connection_and_the_address_recovers(stack: Stack) -> None:
    async with source("127.0.0.30") as attacker, aiohttp.ClientSession() as http:
        penalties_before = await metric(http, stack, "kefu_connection_penalties_total")
        answers = await hammer(attacker, stack, MAX_REFUSALS + 1)
        statuses = [status for status, _ in answers]
        # The first takes the address's one token (a 403 or a token), then refusals until the connection closes.
        assert statuses[1:MAX_REFUSALS + 1] == [429] * MAX_REFUSALS, answers
        assert answers[MAX_REFUSALS][1].lower() == "close", answers
        assert await metric(http, stack, "kefu_connection_penalties_total") == penalties_before + 1
        # Penalised: cut at accept, while another address is served.
        assert await get_once(stack, "127.0.0.30") == b""
        assert (await get_once(stack, "127.0.0.31")).startswith(b"HTTP/1.1 200")
        # The window (1 s) ends: served again.
        deadline = time.monotonic() + 10
        while not (answer := await get_once(stack, "127.0.0.30")) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert answer.startswith(b"HTTP/1.1 200"), answer


async def test_sec_a_trusted_proxy_is_never_cut(stack: Stack) -> None:
    async with source(PROXY) as proxy, aiohttp.ClientSession() as http:
        # Its refusals in a row (per forwarded visitor's address) never close its connection...
        answers = await hammer(proxy, stack, 4 * MAX_REFUSALS, headers={"X-Forwarded-For": "203.0.113.5"})
        assert [status for status, _ in answers[1:]] == [429] * (4 * MAX_REFUSALS - 1), answers
        assert all(connection.lower() != "close" for _, connection in answers), answers
        # ...and many more new connections than any address may open are all served.
        answers_raw = await asyncio.gather(*(get_once(stack, PROXY) for _ in range(4 * BURST)))
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers_raw), [a[:12] for a in answers_raw]
        assert (await get_once(stack, PROXY)).startswith(b"HTTP/1.1 200")
        # The per-request limits still hold behind it: the forwarded address is refused, another is not.
        assert (await hammer(proxy, stack, 1, headers={"X-Forwarded-For": "203.0.113.5"}))[0][0] == 429
        assert (await hammer(proxy, stack, 1, headers={"X-Forwarded-For": "203.0.113.6"}))[0][0] != 429
        assert await metric(http, stack, "kefu_connection_guard_addresses") >= 1
