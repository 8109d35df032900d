"""The edge bench's load: completions both ways, on connections opened first, in closed-loop rounds."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp

from bench.chat_load import warm_up
from bench.chat_params import MODEL, TENANT, BenchParams
from bench.chat_stack import fetch_json
from bench.edge_params import MODES, PATHS, EdgeParams
from bench.loadgen import LoadResult, RequestResult, Target, _error_code, _one_request, format_summary, summarise
from bench.proc_stats import cpu_snapshot, machine_busy_seconds
from devtools.mint_token import mint
from gateway.settings import DEFAULT_SYSTEM_PROMPT

log = logging.getLogger("bench.edge")


class Principals:
    """One JWT per virtual user, minted once, outside the timed part."""

    def __init__(self, secret: str) -> None:
        self._secret = secret
        self._tokens: dict[int, str] = {}

    def headers(self, user: int) -> Mapping[str, str]:
        if user not in self._tokens:
            # `api`: the bench sends its own system prompt, as the direct client does; a visitor may not.
            self._tokens[user] = mint(self._secret, tenant=TENANT, subject=f"edge-bench-{user}", role="api",
                                      ttl_s=6 * 3600)
        return {"Authorization": f"Bearer {self._tokens[user]}"}


def completion_body(model: str, stream: bool, question: str) -> dict[str, object]:
    body: dict[str, object] = {"model": model, "stream": stream,
                            "messages": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                         {"role": "user", "content": question}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def targets(upstream_url: str, edge_url: str, principals: Principals) -> dict[tuple[str, str], Target]:
    """(mode, path) -> the same body both ways; every question is unique, so nothing can come from a cache."""
    serial = itertools.count()

    def body_of(model: str, stream: bool) -> Callable[[int, int], Mapping[str, object]]:
        def body(user: int, seq: int) -> Mapping[str, object]:
            question = f"您好，我是第 {user} 位顾客，第 {seq} 个问题（#{next(serial)}）：我的订单什么时候发货？"
            return completion_body(model, stream, question)
        return body

    found: dict[tuple[str, str], Target] = {}
    for mode in MODES:
        stream = mode == "stream"
        found[(mode, "direct")] = Target(f"{mode}/direct", f"{upstream_url}/chat/completions", "openai",
                                         body_of(MODEL, stream))
        found[(mode, "kefu")] = Target(f"{mode}/kefu", f"{edge_url}/v1/chat/completions", "openai",
                                       body_of("default", stream), principals.headers)
    return found


OneRequest = Callable[[aiohttp.ClientSession, Target, int, int], Awaitable[RequestResult]]


async def one_completion(http: aiohttp.ClientSession, target: Target, user: int, seq: int) -> RequestResult:
    """A non-streaming completion: ok when the answer is a chat.completion with non-empty content."""
    body, headers = target.body(user, seq), target.headers(user)
    started = time.perf_counter()
    try:
        async with http.post(target.url, json=body, headers=headers) as response:
            if response.status != 200:
                return RequestResult(user, False, time.perf_counter() - started, error=await _error_code(response))
            answer = await response.json()
            total = time.perf_counter() - started
    except (aiohttp.ClientError, TimeoutError) as error:
        return RequestResult(user, False, time.perf_counter() - started, error=type(error).__name__)
    try:
        ok = answer["object"] == "chat.completion" and bool(answer["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError):
        ok = False
    return RequestResult(user, ok, total, error=None if ok else "malformed_completion")


@dataclass(frozen=True, slots=True)
class Round:
    result: LoadResult
    cpu_ms_per_request: dict[str, float]
    cpu_percent: dict[str, float]
    """CPU time over the round's wall time, in % of one core; `machine` is every core of the box,
    `others` what was not ours (other engineers' tests, the kernel)."""


@dataclass(frozen=True, slots=True)
class Load:
    """All rounds of one mode, concurrency and path."""

    mode: str
    path: str
    concurrency: int
    requests_per_user: int
    connect_s: float
    """Time to open `concurrency` connections before the first round."""
    rounds: tuple[Round, ...]


def requests_per_user(params: EdgeParams, concurrency: int) -> int:
    return max(1, params.min_requests // concurrency)


async def preconnect(http: aiohttp.ClientSession, url: str, concurrency: int) -> float:
    """Open `concurrency` pooled connections with cheap GETs sent at once, so no round pays for connects.

    A burst of 1000 connects overflows the listen backlog and costs whole-second SYN
    retransmits, which would land in the first round's p99 and say nothing about a turn.
    """
    t0 = time.perf_counter()

    async def get() -> None:
        async with http.get(url) as response:
            await response.read()
    await asyncio.gather(*(get() for _ in range(concurrency)))
    return time.perf_counter() - t0


async def measure_round(http: aiohttp.ClientSession, target: Target, one: OneRequest, concurrency: int,
                        per_user: int, processes: dict[str, int]) -> Round:
    """`concurrency` users in a closed loop, each sending `per_user` requests; throughput over the whole round."""
    async def user(number: int) -> list[RequestResult]:
        return [await one(http, target, number, seq) for seq in range(per_user)]

    cpu_before, busy_before, t0 = cpu_snapshot(processes), machine_busy_seconds(), time.perf_counter()
    per = await asyncio.gather(*(user(n) for n in range(concurrency)))
    elapsed, cpu_after, busy_after = time.perf_counter() - t0, cpu_snapshot(processes), machine_busy_seconds()
    result = summarise(target, concurrency, [r for results in per for r in results], elapsed)
    spent = {n: cpu_after[n] - cpu_before[n] for n in cpu_after if n in cpu_before}
    percent = {n: round(s * 100 / elapsed, 1) for n, s in spent.items()}
    if busy_before is not None and busy_after is not None:
        percent["machine"] = round((busy_after - busy_before) * 100 / elapsed, 1)
        percent["others"] = round(percent["machine"] - sum(spent.values()) * 100 / elapsed, 1)
    log.info("%s, client CPU %.0f%%, others %.0f%%", format_summary(result), percent.get("client", float("nan")),
             percent.get("others", float("nan")))
    return Round(result, {n: round(s * 1000 / max(result.requests, 1), 2) for n, s in spent.items()}, percent)


async def wait_upstream_idle(stats_url: str, timeout_s: float) -> float | None:
    """Seconds until the upstream has nothing in flight (None: not within `timeout_s`)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if (await asyncio.to_thread(fetch_json, stats_url)).get("in_flight") == 0:
            return round(time.perf_counter() - t0, 2)
        await asyncio.sleep(0.1)
    return None


async def run_rates(params: EdgeParams, found: Mapping[tuple[str, str], Target], processes: dict[str, int],
                    cheap_urls: Mapping[str, str], upstream_stats_url: str) -> list[Load]:
    # Open connections, load tokenizers and JIT paths before anything is measured (bench/chat_load.py).
    await warm_up(BenchParams(warmup=20, timeout_s=params.timeout_s),
                  {path: found[("stream", path)] for path in PATHS})
    loads: list[Load] = []
    timeout = aiohttp.ClientTimeout(total=params.timeout_s)
    for mode, concurrency in itertools.product(params.modes, params.concurrency):
        one: OneRequest = one_completion if mode == "json" else _one_request
        per_user = requests_per_user(params, concurrency)
        rounds: dict[str, list[Round]] = {path: [] for path in PATHS}
        connect_s: dict[str, float] = {}
        async with contextlib.AsyncExitStack() as stack:
            sessions = {}
            for path in PATHS:
                # limit=0: the pool must not queue users; a long keep-alive: idle while the other path runs.
                connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=600)
                sessions[path] = await stack.enter_async_context(
                    aiohttp.ClientSession(connector=connector, timeout=timeout))
                connect_s[path] = await preconnect(sessions[path], cheap_urls[path], concurrency)
            for round_ in range(params.rounds):
                # Alternate which path goes first: a noisy neighbour then hurts both alike.
                for path in PATHS if round_ % 2 == 0 else PATHS[::-1]:
                    rounds[path].append(await measure_round(sessions[path], found[(mode, path)], one, concurrency,
                                                            per_user, processes))
                    if await wait_upstream_idle(upstream_stats_url, 30.0) is None:
                        log.warning("the upstream still has requests in flight 30 s after a round")
        loads += [Load(mode, path, concurrency, per_user, round(connect_s[path], 2), tuple(rounds[path]))
                  for path in PATHS]
    return loads
