"""The main bench's load: the same question both ways, warm-up, closed-loop rounds, then open-loop rates."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Mapping

from bench.chat_params import MODEL, TENANT, BenchParams
from bench.chat_report import IDLE_S, PATHS, Measured
from bench.loadgen import LoadSpec, OpenLoopSpec, Target, format_summary, run_load, run_open_loop
from bench.proc_stats import Processes, cpu_snapshot
from devtools.mint_token import mint
from gateway.settings import DEFAULT_SYSTEM_PROMPT

log = logging.getLogger("bench")


# ---------------------------------------------------------------- targets


def targets(upstream_url: str, edge_url: str, secret: str) -> dict[str, Target]:
    """The same question both ways; every message is unique so no answer can come from a cache."""
    serial = itertools.count()

    def question(user: int, seq: int) -> str:
        return (f"您好，我是第 {user} 位顾客，这是我的第 {seq} 个问题"
                f"（#{next(serial)}）：我的订单什么时候发货？")

    def direct_body(user: int, seq: int) -> Mapping[str, object]:
        # kefu sends the system prompt plus the question; the direct client sends the same.
        return {"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                             {"role": "user", "content": question(user, seq)}]}

    def kefu_body(user: int, seq: int) -> Mapping[str, object]:
        return {"message": question(user, seq), "stream": True}

    tokens: dict[int, str] = {}

    def kefu_headers(user: int) -> Mapping[str, str]:
        # One principal per virtual user, as real visitors are; minted once, outside the timed part.
        if user not in tokens:
            tokens[user] = mint(secret, tenant=TENANT, subject=f"bench-user-{user}", role="visitor",
                                ttl_s=6 * 3600)
        return {"Authorization": f"Bearer {tokens[user]}"}

    return {
        "direct": Target("direct", f"{upstream_url}/chat/completions", "openai", direct_body),
        "kefu": Target("kefu", f"{edge_url}/v1/chat", "kefu", kefu_body, kefu_headers),
    }


# ---------------------------------------------------------------- running


async def measure(target: Target, spec: LoadSpec | OpenLoopSpec, processes: Processes, round_: int) -> Measured:
    before = cpu_snapshot(processes)
    result = await (run_load(target, spec) if isinstance(spec, LoadSpec) else run_open_loop(target, spec))
    after = cpu_snapshot(processes)
    per_request = {name: round((after[name] - before[name]) * 1000 / max(result.requests, 1), 2)
                   for name in after if name in before}
    log.info("round %d %s", round_, format_summary(result))
    return Measured(target.name, round_, result, per_request)


async def warm_up(params: BenchParams, paths: Mapping[str, Target]) -> None:
    """Open connections, load tokenizers and fill caches before anything is measured."""
    if not params.warmup:
        return
    for target in paths.values():
        spec = LoadSpec(min(10, params.warmup), requests=params.warmup, timeout_s=params.timeout_s)
        result = await run_load(target, spec)
        log.info("warm-up %s", format_summary(result))
        if not result.succeeded:
            raise RuntimeError(f"every warm-up request to {target.name} failed: {result.errors}")


async def idle_cpu(processes: Processes, seconds: float = IDLE_S) -> dict[str, float]:
    """CPU ms per second each process spends with nothing sent (timers, heartbeats, watchers)."""
    before = cpu_snapshot(processes)
    await asyncio.sleep(seconds)
    after = cpu_snapshot(processes)
    return {name: round((after[name] - before[name]) * 1000 / seconds, 1) for name in after if name in before}


async def run_rounds(params: BenchParams, paths: Mapping[str, Target],
                     processes: Processes) -> tuple[list[Measured], dict[str, float]]:
    """The closed-loop rounds, then the open-loop rates; and the idle CPU measured between them."""
    await warm_up(params, paths)
    measured: list[Measured] = []
    for concurrency in params.concurrency:
        spec = LoadSpec(concurrency, requests=concurrency * params.requests_per_user,
                        timeout_s=params.timeout_s)
        for round_ in range(params.rounds):
            # Alternate which path goes first: a noisy neighbour then hurts both alike.
            order = PATHS if round_ % 2 == 0 else PATHS[::-1]
            for name in order:
                measured.append(await measure(paths[name], spec, processes, round_))
    idle = await idle_cpu(processes) if params.rates else {}
    for index, rate in enumerate(params.rates):
        # The same seed on both paths: identical arrivals, so only the path differs.
        open_spec = OpenLoopSpec(rate, duration_s=params.open_s, arrivals=params.arrivals, seed=index,
                                 timeout_s=params.timeout_s)
        order = PATHS if index % 2 == 0 else PATHS[::-1]
        for name in order:
            measured.append(await measure(paths[name], open_spec, processes, index))
    return measured, idle
