"""The security bench's load: ordinary visitors taking turns, and the login and visitor floods."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import time
from collections import Counter
from typing import Any

import aiohttp

from bench.security_params import AGENT, ATTACKER_ADDRESS, TENANT, SecurityParams
from bench.security_report import Phase
from bench.sse_reader import read_sse
from devtools.mint_token import mint


class Visitor:
    """One person: a token, a conversation, one turn every `interval_s`."""

    def __init__(self, base_url: str, secret: str, index: int, interval_s: float) -> None:
        self.url = f"{base_url}/v1/chat"
        token = mint(secret, tenant=TENANT, subject=f"v_bench_{index}", role="visitor", ttl_s=3600)
        self.headers = {"Authorization": f"Bearer {token}"}
        self.index = index
        self.interval_s = interval_s
        self.session_id: str | None = None
        self.turns = itertools.count()

    async def turn(self, http: aiohttp.ClientSession) -> tuple[float | None, str]:
        """(seconds to the end of the answer, "") or (None, what went wrong)."""
        body: dict[str, Any] = {"message": f"请问第 {next(self.turns)} 个订单什么时候发货？"}
        if self.session_id:
            body["session_id"] = self.session_id
        started = time.perf_counter()
        try:
            async with http.post(self.url, json=body, headers=self.headers) as response:
                if response.status != 200:
                    return None, f"http_{response.status}"
                async for event in read_sse(response):
                    if event.event == "session":
                        self.session_id = event.json()["session_id"]
                    elif event.event == "done":
                        return time.perf_counter() - started, ""
                    elif event.event == "error":
                        return None, event.json().get("code", "error")
                return None, "incomplete_stream"
        except (aiohttp.ClientError, TimeoutError) as error:
            return None, type(error).__name__

    async def run(self, http: aiohttp.ClientSession, phase: Phase, until: float) -> None:
        await asyncio.sleep(self.index * 0.05 % 1.0)  # spread the visitors over the interval
        while time.monotonic() < until:
            started = time.monotonic()
            seconds, error = await self.turn(http)
            if seconds is None:
                phase.visitor_errors[error] += 1
            else:
                phase.latencies_s.append(seconds)
            await asyncio.sleep(max(0.0, started + self.interval_s - time.monotonic()))


def from_address(address: str, *, limit: int = 0, force_close: bool = False) -> aiohttp.ClientSession:
    """A client whose connections come from `address` (any 127.0.0.0/8 address is this machine's)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(address, 0), limit=limit, force_close=force_close),
        timeout=aiohttp.ClientTimeout(total=60))


async def login(http: aiohttp.ClientSession, base_url: str, username: str, password: str,
                headers: dict[str, str] | None = None) -> str:
    """The answer's status, or "cut" when the edge closed the connection without one."""
    try:
        async with http.post(f"{base_url}/v1/console/login", headers=headers,
                             json={"tenant": TENANT, "username": username, "password": password}) as response:
            await response.read()
            return str(response.status)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        return "cut"
    except (aiohttp.ClientError, TimeoutError) as error:
        return type(error).__name__


async def login_from(address: str, base_url: str, username: str, password: str) -> str:
    async with from_address(address, force_close=True) as http:
        return await login(http, base_url, username, password)


async def login_flood(base_url: str, distributed: bool, wave_size: int, counts: Counter[str], until: float) -> None:
    async with from_address(ATTACKER_ADDRESS) as http:
        for wave in itertools.count():
            if time.monotonic() >= until:
                return
            if distributed:  # an address and a user name of its own for every login
                logins = [login_from(f"127.{100 + wave // 250 % 100}.{wave % 250}.{i + 1}", base_url,
                                     f"nobody-{wave}-{i}", "wrong password") for i in range(wave_size)]
            else:
                logins = [login(http, base_url, AGENT, f"guess {wave}-{i}") for i in range(wave_size)]
            for status in await asyncio.gather(*logins):
                counts[f"login {status}"] += 1


async def visitor_flood(http: aiohttp.ClientSession, base_url: str, secret: str, counts: Counter[str],
                        until: float) -> None:
    """`http` connects from the attacker's address."""
    token = mint(secret, tenant=TENANT, subject="v_bench_attacker", role="visitor", ttl_s=3600)
    headers = {"Authorization": f"Bearer {token}"}

    async def chats() -> None:
        session_id = None
        for n in itertools.count():
            if time.monotonic() >= until:
                return
            body: dict[str, Any] = {"message": f"flood {n}"}
            if session_id:
                body["session_id"] = session_id
            try:
                async with http.post(f"{base_url}/v1/chat", json=body, headers=headers) as response:
                    if response.status != 200:
                        counts[f"chat {response.status}"] += 1
                        await response.read()
                        continue
                    async for event in read_sse(response):
                        if event.event == "session":
                            session_id = event.json()["session_id"]
                        elif event.event in ("done", "error"):  # an answer, or refused inside the stream
                            outcome = "done" if event.event == "done" else event.json().get("code", "error")
                            counts[f"chat 200 {outcome}"] += 1
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                counts["chat cut"] += 1
            except (aiohttp.ClientError, TimeoutError) as error:
                counts[f"chat {type(error).__name__}"] += 1

    async def socket() -> None:
        while time.monotonic() < until:
            try:
                async with http.ws_connect(f"{base_url.replace('http', 'ws', 1)}/v1/ws") as ws:
                    await ws.send_json({"type": "hello", "token": token})

                    async def read() -> None:
                        async for message in ws:
                            if message.type == aiohttp.WSMsgType.TEXT:
                                kind = json.loads(message.data).get("type")
                                if kind in ("ack", "nack", "error"):
                                    counts[f"ws {kind}"] += 1

                    reader = asyncio.create_task(read())
                    try:
                        for n in itertools.count():
                            if time.monotonic() >= until or ws.closed:
                                break
                            await ws.send_json({"type": "send", "cid": secrets.token_hex(6), "text": f"ws flood {n}"})
                            await asyncio.sleep(0)
                    finally:
                        reader.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await reader
                    counts[f"ws close {ws.close_code}"] += 1
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError):
                counts["ws cut"] += 1
                await asyncio.sleep(0.05)
            except (aiohttp.ClientError, TimeoutError) as error:
                counts[f"ws {type(error).__name__}"] += 1
                await asyncio.sleep(0.05)

    await asyncio.gather(*(chats() for _ in range(8)), *(socket() for _ in range(3)))


ATTACKS = ("login-one-address", "login-many-addresses", "visitor")


async def attack(mode: str, base_url: str, secret: str, params: SecurityParams) -> Counter[str]:
    """One attack for `params.duration_s`, in its own process (see run_phase); the answers it got, by kind."""
    counts: Counter[str] = Counter()
    until = time.monotonic() + params.duration_s
    if mode == "visitor":
        async with from_address(ATTACKER_ADDRESS) as http:
            await visitor_flood(http, base_url, secret, counts, until)
    else:
        await login_flood(base_url, mode == "login-many-addresses", params.login_wave, counts, until)
    return counts
