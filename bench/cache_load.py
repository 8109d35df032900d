"""The cache bench's visitors: streamed /v1/chat turns with think times, a few at a time, and the warm-up."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.cache_report import Turn
from bench.cache_workload import WARMUP_TENANT, Visitor
from bench.loadgen import _error_code
from bench.sse_reader import read_sse
from devtools.mint_token import mint


class Principals:
    """One JWT per (tenant, visitor), minted outside the timed part."""

    def __init__(self, secret: str) -> None:
        self._secret = secret
        self._tokens: dict[tuple[str, int], str] = {}

    def token(self, tenant: str, visitor: int) -> str:
        if (tenant, visitor) not in self._tokens:
            self._tokens[tenant, visitor] = mint(self._secret, tenant=tenant, subject=f"cache-bench-{visitor}",
                                                 role="visitor", ttl_s=6 * 3600)
        return self._tokens[tenant, visitor]


@dataclass(frozen=True, slots=True)
class _Answer:
    ok: bool
    ttft_s: float | None
    total_s: float
    cached: bool = False
    session_id: str = ""
    error: str | None = None


async def ask(http: aiohttp.ClientSession, url: str, token: str, message: str, session_id: str) -> _Answer:
    """POST /v1/chat (stream) and read it to the end: TTFT is the first non-empty delta."""
    body: dict[str, Any] = {"message": message, "stream": True}
    if session_id:
        body["session_id"] = session_id
    started = time.perf_counter()
    ttft: float | None = None
    try:
        async with http.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as response:
            if response.status != 200:
                return _Answer(False, None, time.perf_counter() - started, error=await _error_code(response))
            async for event in read_sse(response):
                if event.event == "session":
                    session_id = str(event.json().get("session_id") or session_id)
                elif event.event == "message":
                    if ttft is None and event.json().get("delta"):
                        ttft = time.perf_counter() - started
                elif event.event == "done":
                    total = time.perf_counter() - started
                    await response.read()
                    return _Answer(True, ttft, total, bool(event.json().get("cached")), session_id)
                elif event.event == "error":
                    return _Answer(False, ttft, time.perf_counter() - started, session_id=session_id,
                                   error=str(event.json().get("code") or "error_event"))
            return _Answer(False, ttft, time.perf_counter() - started, session_id=session_id,
                           error="incomplete_stream")
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        return _Answer(False, ttft, time.perf_counter() - started, session_id=session_id,
                       error=type(error).__name__)


async def run_visitor(http: aiohttp.ClientSession, url: str, principals: Principals, tenant: str,
                      visitor: Visitor, cacheable: Sequence[bool], think_scale: float, origin: float) -> list[Turn]:
    token = principals.token(tenant, visitor.index)
    session_id = ""
    turns: list[Turn] = []
    for index, question in enumerate(visitor.questions):
        if index:
            await asyncio.sleep(visitor.think_s[index - 1] * think_scale)
        started = time.perf_counter() - origin
        answer = await ask(http, url, token, question.text, session_id)
        turns.append(Turn(visitor.index, tenant, index, round(started, 3), question.kind, question.entry,
                          question.variant, question.text, answer.ok, answer.ttft_s, answer.total_s, answer.cached,
                          answer.error, cacheable[index]))
        if not answer.ok or not answer.session_id:
            break  # the rest of this visitor's session cannot continue; counted as not sent
        session_id = answer.session_id
    return turns


async def run_stream(edge_url: str, visitors: Sequence[Visitor], cacheable: Sequence[Sequence[bool]],
                     tenants: Sequence[str], principals: Principals, concurrency: int, timeout_s: float,
                     metrics_url: str, think_scale: float = 1.0) -> tuple[list[Turn], float, list[float]]:
    """`concurrency` visitors at a time, in visitor order; returns every turn, the wall time and the
    worker's live upstream streams (`kefu_active_streams`) sampled every second meanwhile."""
    url = f"{edge_url}/v1/chat"
    pending = iter(zip(visitors, cacheable, strict=True))
    connector = aiohttp.TCPConnector(limit=0)
    turns: list[Turn] = []

    async def slot() -> None:
        for visitor, flags in pending:  # one event loop: sharing the iterator needs no lock
            tenant = tenants[visitor.index % len(tenants)]
            turns.extend(await run_visitor(http, url, principals, tenant, visitor, flags, think_scale, started))

    async def sample_streams() -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                async with http.get(metrics_url) as reply:
                    text = await reply.text()
            except (aiohttp.ClientError, TimeoutError):
                continue
            found = re.search(r"^kefu_active_streams (\S+)$", text, re.MULTILINE)
            if found:
                streams.append(float(found.group(1)))

    streams: list[float] = []
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        started = time.perf_counter()
        sampler = asyncio.create_task(sample_streams())
        try:
            await asyncio.gather(*(slot() for _ in range(concurrency)))
        finally:
            sampler.cancel()
        duration = time.perf_counter() - started
    return sorted(turns, key=lambda t: (t.visitor, t.index)), duration, streams


async def warm_up(edge_url: str, principals: Principals, count: int, timeout_s: float) -> None:
    """Connections, tokenizers and code paths warm, in a tenant of its own; questions that match no
    FAQ entry, so the knowledge base suggests nothing to pre-generate."""
    if count < 1:
        return
    url = f"{edge_url}/v1/chat"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        answers = await asyncio.gather(*(
            ask(http, url, principals.token(WARMUP_TENANT, 100_000 + n), f"warm-up {n} zqxj {secrets.token_hex(4)}", "")
            for n in range(count)))
    failed = [a.error for a in answers if not a.ok]
    if failed:
        raise RuntimeError(f"warm-up requests failed: {failed}")
