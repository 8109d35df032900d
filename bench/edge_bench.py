"""`python -m bench.edge_bench`: the edge's OpenAI-compatible /v1/chat/completions against the direct path.

In one run:

1. Rates. The fake upstream (its own process) and a kefu stack pointed at it, as `make
   bench` starts them. For each mode (`json`: non-streaming, `stream`: SSE), each
   concurrency (100, 1000) and each path (`direct`: the client straight to the upstream;
   `kefu`: the same body to the edge with `model: "default"` and a JWT per virtual user):
   `concurrency` connections are opened first (cheap GETs), then `--rounds` rounds run with
   the paths alternating; in a round every virtual user sends `--min-requests / concurrency`
   requests (at least 1) in a closed loop. Throughput is a round's answers over its whole
   wall time, so it covers whole cycles: a saturated kefu shares the CPU among all open
   turns, and turns started together end together, in waves a shorter window would cut.
   The table shows the median over the rounds and the spread.
2. Open streams (bench/open_streams.py). A fresh stack whose upstream streams very slowly;
   streams are opened gradually up to each `--levels` level, and at each one the RSS of every
   process, the stream gauges and the CPU spent holding them are sampled.

Results: bench/results/edge-<UTC>.json, and the markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import platform
import re
import secrets
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.__main__ import (
    MODEL,
    REPLY,
    RESULTS_DIR,
    TENANT,
    BenchParams,
    _cell,
    _write,
    cpu_snapshot,
    edge_metrics_url,
    fetch_json,
    start_stack,
    start_upstream,
    stop_process,
    warm_up,
)
from bench.loadgen import LoadResult, RequestResult, Target, _error_code, _one_request, format_summary, summarise
from bench.open_streams import OpenStreamsSpec, open_files_limit, raise_open_files_limit, run_open_streams
from bench.processes import bench_work_dir
from devtools.devstack.stack import Stack
from devtools.mint_token import mint
from gateway.settings import DEFAULT_SYSTEM_PROMPT

log = logging.getLogger("bench.edge")

MODES = ("json", "stream")
"""`json`: `stream: false`, one JSON completion; `stream`: SSE chunks, timed to the first content delta."""
PATHS = ("direct", "kefu")
RATE_PROCESSES = ("client", "upstream", "gateway", "moderation", "llm_worker", "session", "nats")
KEFU_PROCESSES = ("gateway", "moderation", "llm_worker", "session", "nats")


@dataclass(frozen=True, slots=True)
class EdgeParams:
    concurrency: tuple[int, ...] = (100, 1000)
    modes: tuple[str, ...] = MODES
    rounds: int = 3
    """Measured rounds per mode, concurrency and path."""
    min_requests: int = 300
    """Requests per round: every user sends min_requests // concurrency of them, at least one."""
    ttft_ms: float = 50.0
    chunks: int = 20
    interval_ms: float = 10.0
    timeout_s: float = 120.0
    """Deadline of one request in the rate rounds."""
    levels: tuple[int, ...] = (1000, 5000, 10000)
    open_parallel: int = 200
    open_interval_ms: float = 30_000.0
    """The slow upstream's chunk interval: below the worker's 60 s idle timeout, and long enough
    that 10k streams cost little CPU to hold (10k / 30 s = 333 deltas/s through the whole path)."""
    open_chunks: int = 30
    open_budget_s: float = 300.0
    rates: bool = True
    open_streams: bool = True

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"--concurrency needs positive integers, got {self.concurrency}")
        if not set(self.modes) <= set(MODES) or not self.modes:
            raise ValueError(f"--modes must be a subset of {MODES}, got {self.modes}")
        if self.rounds < 1 or self.min_requests < 1:
            raise ValueError("--rounds and --min-requests must be >= 1")
        if self.open_chunks > len(REPLY):
            raise ValueError(f"--open-chunks must be <= {len(REPLY)} (the reply's characters)")
        if self.open_interval_ms >= 60_000:
            raise ValueError("--open-interval-ms must stay below the worker's 60 s idle timeout")


QUICK = EdgeParams(rounds=1, levels=(1000,))


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> tuple[EdgeParams, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench.edge_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 round, open streams up to 1000 only: about 1.5 minutes")
    parser.add_argument("--concurrency", help="comma-separated virtual users (default 100,1000)")
    parser.add_argument("--modes", help="comma-separated, of json,stream (default both)")
    parser.add_argument("--rounds", type=int, help="measured rounds per mode, concurrency and path (default 3)")
    parser.add_argument("--min-requests", type=int,
                        help="requests per round: each user sends this // concurrency, at least 1 (default 300)")
    parser.add_argument("--ttft-ms", type=float, help="rates: upstream time to first token (default 50)")
    parser.add_argument("--chunks", type=int, help="rates: upstream content chunks (default 20)")
    parser.add_argument("--interval-ms", type=float, help="rates: upstream delay between chunks (default 10)")
    parser.add_argument("--timeout-s", type=float, help="rates: deadline of one request (default 120)")
    parser.add_argument("--levels", help="open-stream levels (default 1000,5000,10000)")
    parser.add_argument("--open-parallel", type=int, help="streams opening at once (default 200)")
    parser.add_argument("--open-interval-ms", type=float, help="slow upstream's chunk interval (default 30000)")
    parser.add_argument("--open-chunks", type=int, help="slow upstream's chunks per answer (default 30)")
    parser.add_argument("--open-budget-s", type=float, help="longest open-streams ramp (default 300)")
    parser.add_argument("--no-rates", dest="rates", action="store_false", default=None)
    parser.add_argument("--no-open-streams", dest="open_streams", action="store_false", default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary data and log folders")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else EdgeParams()
    names = ("rounds", "min_requests", "ttft_ms", "chunks", "interval_ms", "timeout_s",
             "open_parallel", "open_interval_ms", "open_chunks", "open_budget_s", "rates", "open_streams")
    overrides: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    try:
        if args.concurrency:
            overrides["concurrency"] = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
        if args.levels:
            overrides["levels"] = tuple(int(c) for c in args.levels.split(",") if c.strip())
        if args.modes:
            overrides["modes"] = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        return replace(base, **overrides), args
    except ValueError as error:
        parser.error(str(error))


# ---------------------------------------------------------------- targets and requests


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


# ---------------------------------------------------------------- closed-loop rounds on warm connections


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


def machine_busy_seconds() -> float | None:
    """CPU time all cores of the machine spent busy (not idle, not waiting on I/O) since boot."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


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
    # Open connections, load tokenizers and JIT paths before anything is measured (bench/__main__).
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


# ---------------------------------------------------------------- figures


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ms(summary: Any, q: str) -> float | None:
    return None if summary is None else getattr(summary, q) * 1000


def combine(load: Load) -> dict[str, Any]:
    """Medians over the rounds; the spread of throughput and p99; counts summed."""
    per = [{"ttft_p50": _ms(r.result.ttft, "p50"), "ttft_p99": _ms(r.result.ttft, "p99"),
            "total_p50": _ms(r.result.total, "p50"), "total_p99": _ms(r.result.total, "p99"),
            "throughput_rps": r.result.throughput_rps} for r in load.rounds]
    errors: Counter[str] = Counter()
    for r in load.rounds:
        errors.update(r.result.errors)
    names = sorted({n for r in load.rounds for n in r.cpu_ms_per_request})
    percent_names = sorted({n for r in load.rounds for n in r.cpu_percent})

    def spread(key: str) -> list[float]:
        values = [v for f in per if (v := f[key]) is not None]
        return [min(values), max(values)] if values else []
    return {
        **{key: _median([f[key] for f in per]) for key in per[0]},
        "spread": {key: spread(key) for key in per[0]},
        "requests_per_user": load.requests_per_user,
        "connect_s": load.connect_s,
        "requests": sum(r.result.requests for r in load.rounds),
        "failed": sum(r.result.failed for r in load.rounds),
        "errors": dict(sorted(errors.items())),
        "cpu_ms_per_request": {n: _median([r.cpu_ms_per_request.get(n) for r in load.rounds]) for n in names},
        "cpu_percent": {n: _median([r.cpu_percent.get(n) for r in load.rounds]) for n in percent_names},
    }


def rate_table(medians: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> list[str]:
    """Medians over the rounds; `headline p99 min–max` spreads the figure the mode is about
    (json: latency p99, stream: TTFT p99) over the rounds, as `req/s min–max` does throughput."""
    lines = ["| mode | users | path | req/user | requests | errors | TTFT p50 | TTFT p99 | latency p50 "
             "| latency p99 | headline p99 min–max | req/s | req/s min–max | client CPU | others' CPU |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, by_users in medians.items():
        headline = "ttft_p99" if mode == "stream" else "total_p99"
        for users, row in by_users.items():
            for path in PATHS:
                f = row[path]
                p99_low, p99_high = f["spread"][headline] or (None, None)
                rps_low, rps_high = f["spread"]["throughput_rps"] or (None, None)
                lines.append(
                    f"| {mode} | {users} | {path} | {f['requests_per_user']} | {f['requests']} | {f['failed']} "
                    f"| {_cell(f['ttft_p50'], '.0f')} | {_cell(f['ttft_p99'], '.0f')} | {_cell(f['total_p50'], '.0f')} "
                    f"| {_cell(f['total_p99'], '.0f')} | {_cell(p99_low, '.0f')}–{_cell(p99_high, '.0f')} "
                    f"| {_cell(f['throughput_rps'], '.1f')} | {_cell(rps_low, '.0f')}–{_cell(rps_high, '.0f')} "
                    f"| {_cell(f['cpu_percent'].get('client'), '.0f')} % "
                    f"| {_cell(f['cpu_percent'].get('others'), '.0f')} % |")
            r = {key: _ratio(row["direct"][key], row["kefu"][key])
                 for key in ("ttft_p50", "ttft_p99", "total_p50", "total_p99", "throughput_rps")}
            lines.append(f"| {mode} | {users} | kefu / direct | | | | {r['ttft_p50']} | {r['ttft_p99']} "
                         f"| {r['total_p50']} | {r['total_p99']} | | {r['throughput_rps']} | | | |")
    return lines


def _ratio(direct: float | None, kefu: float | None) -> str:
    return "–" if not direct or kefu is None else f"{kefu / direct:.2f}×"


def cpu_table(medians: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> list[str]:
    lines = ["| mode | users | path | " + " | ".join(RATE_PROCESSES) + " | kefu total |",
             "|---|---:|---|" + "---:|" * (len(RATE_PROCESSES) + 1)]
    for mode, by_users in medians.items():
        for users, row in by_users.items():
            for path in PATHS:
                cpu = row[path]["cpu_ms_per_request"]
                total = sum(cpu.get(n) or 0.0 for n in KEFU_PROCESSES)
                lines.append(f"| {mode} | {users} | {path} | "
                             + " | ".join(_cell(cpu.get(n), ".2f") for n in RATE_PROCESSES)
                             + f" | {_cell(total, '.2f') if path == 'kefu' else '–'} |")
    return lines


def open_streams_tables(result: Mapping[str, Any]) -> list[str]:
    names = ("gateway", "llm_worker", "moderation", "upstream", "client")
    per_stream_of = ("gateway", "llm_worker", "moderation")
    head = ("| streams | open | failed | ramp s | opened/s | first chunk p50 / p99 ms | "
            + " | ".join(f"{n} RSS MiB" for n in names)
            + " | KiB/stream gw / worker / mod | gateway fds | edge / worker gauge | upstream in flight "
              "| CPU % gw / worker / mod |")
    lines = [head, "|" + "---:|" * (len(names) + 11)]
    base = result["baseline"]["memory"]
    for sample in [result["baseline"], *result["levels"]]:
        memory, gauges, cpu = sample["memory"], sample["gauges"], sample["cpu_percent"]
        failed = sample.get("failed_to_open", 0) + sample.get("ended_early", 0)
        first = sample.get("first_chunk_ms") or {}
        lines.append(
            f"| {sample['streams']} | {sample.get('open', 0)} | "
            f"{failed} | {_cell(sample.get('ramp_s'), '.0f')} | "
            f"{_cell(sample.get('open_rate_per_s'), '.0f')} | {_cell(first.get('p50'), '.0f')} / "
            f"{_cell(first.get('p99'), '.0f')} | "
            + " | ".join(_cell(memory.get(n, {}).get("rss_mib"), ".0f") for n in names) + " | "
            + " / ".join(_cell(_per_stream(memory, base, n, sample["streams"]), ".0f") for n in per_stream_of)
            + f" | {memory.get('gateway', {}).get('open_files', '–')} | "
              f"{_gauge(gauges.get('gateway'))} / {_gauge(gauges.get('llm_worker'))} | "
              f"{_gauge(gauges.get('upstream_in_flight'))} | "
              f"{_cell(cpu.get('gateway'), '.0f')} / {_cell(cpu.get('llm_worker'), '.0f')} / "
              f"{_cell(cpu.get('moderation'), '.0f')} |")
    return lines


def _per_stream(memory: Mapping[str, Mapping[str, float]], idle: Mapping[str, Mapping[str, float]], name: str,
                streams: int) -> float | None:
    """KiB of RSS per open stream above the idle process."""
    rss, base = memory.get(name, {}).get("rss_mib"), idle.get(name, {}).get("rss_mib")
    if not streams or rss is None or base is None:
        return None
    return (rss - base) * 1024 / streams


def _gauge(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


# ---------------------------------------------------------------- stacks and logs


def start_slow_stack(work_dir: Path, upstream_url: str, secret: str) -> Stack:
    """bench/__main__'s stack, with stream deadlines long enough for a slow ramp (the worker's
    whole-stream deadline defaults to 120 s)."""
    return start_stack(work_dir, upstream_url, secret,
                       {"KEFU_UPSTREAM_TIMEOUT_S": "3600", "KEFU_STREAM_TIMEOUT_S": "3600"})


PROBLEM = re.compile(r"Traceback|ERROR|CRITICAL|WARNING|Too many open files|EMFILE|out of system resource",
                     re.IGNORECASE)


def log_problems(log_dir: Path, limit: int = 12) -> dict[str, list[str]]:
    """The distinct warning/error lines of each process log (numbers blanked to group them), most frequent first."""
    found: dict[str, list[str]] = {}
    for path in sorted(log_dir.glob("*.log")):
        counts: Counter[str] = Counter()
        examples: dict[str, str] = {}
        for line in path.read_text(errors="replace").splitlines():
            if not PROBLEM.search(line):
                continue
            key = re.sub(r"\d+", "N", _message_of(line))[:200]
            counts[key] += 1
            examples.setdefault(key, line[:400])
        if counts:
            found[path.stem] = [f"{n}× {examples[k]}" for k, n in counts.most_common(limit)]
    return found


def _message_of(line: str) -> str:
    """The message and level of a JSON log line (so timestamps and request ids do not split groups)."""
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict):
        return line
    return f"{record.get('level', '')} {record.get('logger', '')} {record.get('message', record.get('msg', line))}"


def _processes(stack: Stack, upstream_pid: int) -> dict[str, int]:
    processes = {"client": os.getpid(), "upstream": upstream_pid,
                 **{name: p.pid for name, p in stack.processes.items()}}
    if stack.nats is not None:
        processes["nats"] = stack.nats.process.pid
    return processes


def _limits(processes: Mapping[str, int]) -> dict[str, int | None]:
    return {name: open_files_limit(pid) for name, pid in processes.items()}


# ---------------------------------------------------------------- the two phases


def rates_phase(params: EdgeParams, work_dir: Path, secret: str) -> dict[str, Any]:
    work_dir.mkdir(parents=True, exist_ok=True)
    upstream_params = BenchParams(ttft_ms=params.ttft_ms, chunks=params.chunks, interval_ms=params.interval_ms)
    upstream, upstream_url = start_upstream(upstream_params, work_dir / "upstream.log")
    stack: Stack | None = None
    try:
        stack = start_stack(work_dir, upstream_url, secret)
        processes = _processes(stack, upstream.pid)
        stats_url = upstream_url.removesuffix("/v1") + "/stats"
        principals = Principals(secret)
        for user in range(max(params.concurrency)):
            principals.headers(user)  # mint before anything is timed
        found = targets(upstream_url, stack.base_url, principals)
        cheap = {"direct": f"{upstream_url}/models", "kefu": f"{stack.base_url}/healthz"}
        loads = asyncio.run(run_rates(params, found, processes, cheap, stats_url))
        limits = _limits(processes)
        stats = fetch_json(stats_url)
    finally:
        if stack is not None:
            stack.stop()
        stop_process(upstream)
    medians: dict[str, dict[int, dict[str, Any]]] = {}
    for load in loads:
        medians.setdefault(load.mode, {}).setdefault(load.concurrency, {})[load.path] = combine(load)
    return {
        "upstream": {"base_url": upstream_url, "stats": stats},
        "open_files_limit": limits,
        "medians": medians,
        "rounds": [{"mode": load.mode, "path": load.path, "round": i, "cpu_ms_per_request": r.cpu_ms_per_request,
                    "cpu_percent": r.cpu_percent, **r.result.to_dict()}
                   for load in loads for i, r in enumerate(load.rounds)],
        "problems_in_logs": log_problems(work_dir / "logs"),
    }


def open_streams_phase(params: EdgeParams, work_dir: Path, secret: str) -> dict[str, Any]:
    work_dir.mkdir(parents=True, exist_ok=True)
    upstream_params = BenchParams(ttft_ms=20.0, chunks=params.open_chunks, interval_ms=params.open_interval_ms)
    upstream, upstream_url = start_upstream(upstream_params, work_dir / "upstream.log")
    stack: Stack | None = None
    try:
        stack = start_slow_stack(work_dir, upstream_url, secret)
        processes = _processes(stack, upstream.pid)
        principals = Principals(secret)
        for user in range(max(params.levels)):
            principals.headers(user)  # mint before the ramp, not during it
        spec = OpenStreamsSpec(
            url=f"{stack.base_url}/v1/chat/completions",
            metrics_urls={"gateway": edge_metrics_url(stack),
                          "llm_worker": f"http://127.0.0.1:{stack.config.ports.worker_metrics}/metrics"},
            upstream_stats_url=upstream_url.removesuffix("/v1") + "/stats",
            levels=params.levels, parallel=params.open_parallel, budget_s=params.open_budget_s)
        polls = {name: p.poll for name, p in stack.processes.items()}
        polls["upstream"] = upstream.poll

        def body(user: int) -> Mapping[str, object]:
            return completion_body("default", True, f"您好，第 {user} 位顾客：请问我的订单什么时候发货？")

        result = asyncio.run(run_open_streams(spec, body, principals.headers, processes, polls))
        result["open_files_limit"] = _limits(processes)
        result["stream_seconds"] = (params.open_chunks - 1) * params.open_interval_ms / 1000
        result["upstream"] = {"base_url": upstream_url, "chunk_interval_ms": params.open_interval_ms,
                              "chunks": params.open_chunks}
    finally:
        if stack is not None:
            stack.stop()
        stop_process(upstream)
    result["problems_in_logs"] = log_problems(work_dir / "logs")
    return result


# ---------------------------------------------------------------- report


def render_markdown(report: Mapping[str, Any]) -> str:
    p, machine = report["parameters"], report["machine"]
    lines = [f"# kefu edge bench, {report['timestamp']}", "",
             f"{machine['cpu_count']} CPUs, Python {machine['python']}, load average {machine['loadavg_start'][0]:.2f} "
             f"at start, {machine['loadavg_end'][0]:.2f} at end; open files limit of this process "
             f"{machine['open_files_limit']}."]
    rates = report.get("rates")
    if rates:
        lines += ["", "## /v1/chat/completions: direct vs kefu", "",
                  f"Upstream: TTFT {p['ttft_ms']:g} ms, {p['chunks']} chunks {p['interval_ms']:g} ms apart. "
                  f"Closed loop on connections opened beforehand; {p['rounds']} round(s) per row, paths "
                  f"alternating; in a round each user sends `req/user` requests (throughput: the round's "
                  f"answers over its wall time). Figures are medians over the rounds, times in ms (latency: to "
                  f"the whole JSON answer, or to `[DONE]`). `client CPU` is the load generator in % of one core "
                  f"(one Python process: near 100 % it is the bottleneck); `others' CPU` is what the rest of the "
                  f"shared machine used meanwhile, in % of one core (of {machine['cpu_count'] * 100} %).", "",
                  *rate_table(rates["medians"]),
                  "", "CPU per request (ms):", "", *cpu_table(rates["medians"])]
        errors = [f"- {mode} c={users} {path}: {json.dumps(f['errors'])}"
                  for mode, by_users in rates["medians"].items() for users, row in by_users.items()
                  for path, f in ((n, row[n]) for n in PATHS) if f["errors"]]
        lines += ["", "Errors (all rounds):", "", *errors] if errors else []
    streams = report.get("open_streams")
    if streams:
        lines += ["", "## Open streams held by one edge process", "",
                  f"Slow upstream: a chunk every {streams['upstream']['chunk_interval_ms'] / 1000:g} s, "
                  f"{streams['upstream']['chunks']} chunks ({streams['stream_seconds']:g} s a stream); opened at most "
                  f"{streams['parallel']} at a time; a stream is open when its client got the first chunk. "
                  f"RSS in MiB (VmRSS); gateway KiB/stream = (RSS − idle RSS) / streams; CPU in % of one core "
                  f"while holding the level. Open files limit: {json.dumps(streams['open_files_limit'])}.", "",
                  *open_streams_tables(streams), "",
                  f"Highest level held: **{streams['highest_level_held']}** streams. "
                  + (f"What broke: {streams['broke']}" if streams["broke"] else "Nothing broke."),
                  f"After hanging up: gauges {json.dumps(streams['close']['gauges'])} after "
                  f"{streams['close']['seconds_to_zero']:g} s; gateway RSS "
                  f"{streams['close']['memory_after'].get('gateway', {}).get('rss_mib', '–')} MiB."]
    for phase in ("rates", "open_streams"):
        problems = (report.get(phase) or {}).get("problems_in_logs") or {}
        if problems:
            lines += ["", f"Warnings and errors in the process logs ({phase}):", ""]
            for name, entries in problems.items():
                lines += [f"- {name}:"] + [f"  - `{e}`" for e in entries]
    return "\n".join(lines) + "\n"


def run(params: EdgeParams, work_dir: Path) -> dict[str, Any]:
    started, loadavg_start = datetime.now(UTC), os.getloadavg()
    soft, _ = raise_open_files_limit()
    secret = secrets.token_hex(32)
    report: dict[str, Any] = {"timestamp": started.strftime("%Y%m%dT%H%M%SZ"), "parameters": asdict(params)}
    if params.rates:
        report["rates"] = rates_phase(params, work_dir / "rates", secret)
    if params.open_streams:
        report["open_streams"] = open_streams_phase(params, work_dir / "open_streams", secret)
    report["machine"] = {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                         "platform": platform.platform(), "loadavg_start": loadavg_start,
                         "loadavg_end": os.getloadavg(), "open_files_limit": soft,
                         "seconds": round((datetime.now(UTC) - started).total_seconds())}
    return report


def had_errors(report: Mapping[str, Any]) -> bool:
    rates = report.get("rates") or {}
    failed = any(r["failed"] for r in rates.get("rounds", []))
    streams = report.get("open_streams") or {}
    return failed or bool(streams.get("broke")) or bool(rates.get("problems_in_logs")) \
        or bool(streams.get("problems_in_logs"))


def main(argv: Sequence[str] | None = None) -> None:
    params, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    with bench_work_dir("kefu-edge-bench-", args.keep_logs) as work:
        report = run(params, work.path)
        work.keep = work.keep or had_errors(report)
    report["markdown"] = render_markdown(report)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.results_dir / f"edge-{report['timestamp']}.json"
    _write(json_path, json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    print(report["markdown"], end="")
    log.info("wrote %s in %d s", json_path, report["machine"]["seconds"])


if __name__ == "__main__":
    main()
