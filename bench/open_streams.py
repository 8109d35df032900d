"""How many concurrent open SSE streams one edge process holds, and the memory each process needs for them.

Used by `python -m bench.edge_bench`. The fake upstream answers very slowly (a chunk every
`interval` seconds, many chunks), so every stream stays open. Streams are opened
gradually (at most `parallel` waiting for their first chunk at a time) up to each level in
turn; a stream counts as open when its client has received the first `data:` chunk (which
the edge sends only once the worker's first delta has passed output moderation, so the
whole path edge -> moderation -> worker -> upstream is up for it). At each level the
figures are sampled: every process's RSS, the edge's and the worker's `kefu_active_streams`
gauges, the upstream's in-flight count, and the CPU each process spends holding the streams.
The ramp stops at the first level where anything failed; then all streams are closed and
the gauges must return to zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.chat_stack import fetch_json
from bench.loadgen import Summary
from bench.proc_stats import Processes, cpu_snapshot, memory_mib
from bench.sse_reader import read_sse

log = logging.getLogger("bench.open_streams")

MEMORY_OF = ("gateway", "llm_worker", "moderation", "session", "nats", "upstream", "client")


@dataclass(frozen=True, slots=True)
class OpenStreamsSpec:
    url: str
    """The edge's /v1/chat/completions."""
    metrics_urls: Mapping[str, str]
    """Prometheus endpoints whose `kefu_active_streams` is read, by process name."""
    upstream_stats_url: str
    levels: tuple[int, ...]
    parallel: int = 200
    """Streams waiting for their first chunk at once (the ramp's pace)."""
    first_chunk_timeout_s: float = 60.0
    settle_s: float = 2.0
    """Pause after a level is reached, before sampling."""
    hold_sample_s: float = 3.0
    """CPU is measured over this long while the level is held."""
    budget_s: float = 300.0
    """The ramp gives up when it has run this long."""
    close_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.levels or list(self.levels) != sorted(set(self.levels)) or self.levels[0] < 1:
            raise ValueError(f"levels must be increasing positive integers, got {self.levels}")
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")


@dataclass(slots=True)
class _Tally:
    """What the holders report, shared on one event loop (no locks needed)."""

    opened: int = 0
    failed: int = 0
    ended_early: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_chunk_s: list[float] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def fail(self, error: str, *, after_open: bool) -> None:
        if after_open:
            self.ended_early += 1
        else:
            self.failed += 1
        self.errors[error] += 1
        self.changed.set()


def _describe(error: BaseException) -> str:
    text = str(error).strip().replace("\n", " ")
    return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


async def _hold(http: aiohttp.ClientSession, spec: OpenStreamsSpec, body: Mapping[str, object],
                headers: Mapping[str, str], gate: asyncio.Semaphore, tally: _Tally) -> None:
    """Open one stream, report it open at its first chunk, then read it until cancelled."""
    opened = False
    try:
        async with gate:
            started = time.perf_counter()
            async with asyncio.timeout(spec.first_chunk_timeout_s):
                response = await http.post(spec.url, json=body, headers=headers)
                if response.status != 200:
                    text = (await response.text())[:200]
                    response.release()
                    tally.fail(f"http_{response.status}: {text}", after_open=False)
                    return
                events = aiter(read_sse(response))
                first = await anext(events, None)
            if first is None:
                tally.fail("ended before its first chunk", after_open=False)
                return
            opened = True
            tally.opened += 1
            tally.first_chunk_s.append(time.perf_counter() - started)
            tally.changed.set()
        try:
            async for event in events:
                if event.data == "[DONE]":
                    tally.fail("ended early: [DONE] (the stream ran to its end)", after_open=True)
                    return
                if _is_error(event.data):
                    tally.fail(f"ended early: error event {event.data[:200]}", after_open=True)
                    return
            tally.fail("ended early: connection closed without [DONE]", after_open=True)
        finally:
            response.close()
    except TimeoutError:
        tally.fail(f"no first chunk within {spec.first_chunk_timeout_s:g} s", after_open=opened)
    except (aiohttp.ClientError, OSError) as error:
        tally.fail(_describe(error), after_open=opened)


async def _active_streams(url: str) -> float | None:
    """`kefu_active_streams` of one process; None when the endpoint does not answer."""
    try:
        text = await asyncio.to_thread(_get_text, url)
    except (OSError, urllib.error.URLError):
        return None
    for line in text.splitlines():
        if line.startswith("kefu_active_streams "):
            return float(line.split()[1])
    return None


def _is_error(data: str) -> bool:
    """OpenAI's mid-stream failure: a chunk that is an `{"error": {...}}` object."""
    try:
        chunk = json.loads(data)
    except ValueError:
        return True
    return isinstance(chunk, dict) and isinstance(chunk.get("error"), dict)


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


async def _gauges(spec: OpenStreamsSpec) -> dict[str, Any]:
    readings: dict[str, Any] = {name: await _active_streams(url) for name, url in spec.metrics_urls.items()}
    try:
        readings["upstream_in_flight"] = (await asyncio.to_thread(fetch_json, spec.upstream_stats_url))["in_flight"]
    except (OSError, urllib.error.URLError, KeyError, ValueError):
        readings["upstream_in_flight"] = None
    return readings


def open_files(pid: int) -> int | None:
    try:
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        return None


def open_files_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of a process, from /proc/<pid>/limits."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        return None
    return None


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; return (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _snapshot(processes: Processes) -> dict[str, dict[str, float]]:
    return {name: {**memory_mib(pid), "open_files": open_files(pid) or 0}
            for name, pid in processes.items() if name in MEMORY_OF}


async def _cpu_percent(processes: Processes, seconds: float) -> dict[str, float]:
    before, t0 = cpu_snapshot(processes), time.perf_counter()
    await asyncio.sleep(seconds)
    after, elapsed = cpu_snapshot(processes), time.perf_counter() - t0
    return {name: round((after[name] - before[name]) * 100 / elapsed, 1) for name in after if name in before}


def _dead(processes: Mapping[str, Callable[[], int | None]]) -> dict[str, int]:
    return {name: code for name, poll in processes.items() if (code := poll()) is not None}


async def run_open_streams(spec: OpenStreamsSpec, body: Callable[[int], Mapping[str, object]],
                           headers: Callable[[int], Mapping[str, str]], processes: Processes,
                           polls: Mapping[str, Callable[[], int | None]]) -> dict[str, Any]:
    """Ramp through the levels; return every level's figures, what broke, and the close-down."""
    tally = _Tally()
    gate = asyncio.Semaphore(spec.parallel)
    holders: list[asyncio.Task[None]] = []
    levels: list[dict[str, Any]] = []
    broke: str | None = None
    baseline = {"streams": 0, "memory": _snapshot(processes), "gauges": await _gauges(spec),
                "cpu_percent": await _cpu_percent(processes, min(2.0, spec.hold_sample_s))}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=spec.first_chunk_timeout_s, sock_read=None)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        try:
            for level in spec.levels:
                ramp_from, level_started = len(holders), time.perf_counter()
                first_chunks_before = len(tally.first_chunk_s)
                while len(holders) < level:
                    user = len(holders)
                    holders.append(asyncio.create_task(_hold(http, spec, body(user), headers(user), gate, tally)))
                    if len(holders) % spec.parallel == 0:
                        await asyncio.sleep(0)  # let the holders start
                while tally.opened + tally.failed + tally.ended_early < level and not tally.failed:
                    tally.changed.clear()
                    if time.perf_counter() - started > spec.budget_s:
                        broke = (f"the ramp ran out of its {spec.budget_s:g} s budget at {tally.opened} open "
                                 f"streams (opening is too slow on this machine)")
                        break
                    if dead := _dead(polls):
                        broke = f"process(es) exited: {dead}"
                        break
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await tally.changed.wait()
                ramp_s = time.perf_counter() - level_started
                if broke is None and tally.failed == 0 and tally.ended_early == 0:
                    await asyncio.sleep(spec.settle_s)
                cpu = await _cpu_percent(processes, spec.hold_sample_s)
                still_open = tally.opened - tally.ended_early
                memory = _snapshot(processes)
                sample: dict[str, Any] = {
                    "streams": level,
                    "open": still_open,
                    "opened_total": tally.opened,
                    "failed_to_open": tally.failed,
                    "ended_early": tally.ended_early,
                    "ramp_s": round(ramp_s, 1),
                    "open_rate_per_s": round((len(holders) - ramp_from) / ramp_s, 1) if ramp_s > 0 else None,
                    "first_chunk_ms": _summary_ms(tally.first_chunk_s[first_chunks_before:]),
                    "memory": memory,
                    "gauges": await _gauges(spec),
                    "cpu_percent": cpu,
                    "errors": dict(tally.errors.most_common(10)),
                    "dead": _dead(polls),
                }
                levels.append(sample)
                log.info("level %d: %d open, %d failed to open, %d ended early, gateway RSS %s MiB, gauges %s",
                         level, still_open, tally.failed, tally.ended_early,
                         memory.get("gateway", {}).get("rss_mib"), sample["gauges"])
                if broke is None and (tally.failed or tally.ended_early or sample["dead"]):
                    broke = (f"at level {level}: {tally.failed} failed to open, {tally.ended_early} ended early, "
                             f"dead processes {sample['dead']}; errors {dict(tally.errors.most_common(5))}")
                if broke is not None:
                    break
        finally:
            close = await _close(holders, spec, processes, http)
    held = [s["streams"] for s in levels if s["open"] == s["streams"] and not s["errors"]]
    return {
        "levels_asked": list(spec.levels),
        "parallel": spec.parallel,
        "baseline": baseline,
        "levels": levels,
        "highest_level_held": max(held) if held else 0,
        "broke": broke,
        "close": close,
    }


async def _close(holders: Sequence[asyncio.Task[None]], spec: OpenStreamsSpec, processes: Processes,
                 http: aiohttp.ClientSession) -> dict[str, Any]:
    """Hang up every stream; wait for the gauges and the upstream to reach zero."""
    t0 = time.perf_counter()
    for task in holders:
        task.cancel()
    await asyncio.gather(*holders, return_exceptions=True)
    await http.close()  # close the pooled connections too, so the edge sees every hang-up
    gauges: dict[str, Any] = {}
    while time.perf_counter() - t0 < spec.close_timeout_s:
        gauges = await _gauges(spec)
        if all(value == 0 for value in gauges.values()):
            break
        await asyncio.sleep(0.5)
    seconds = time.perf_counter() - t0
    await asyncio.sleep(1.0)
    return {"seconds_to_zero": round(seconds, 1), "gauges": gauges,
            "all_zero": all(value == 0 for value in gauges.values()),
            "memory_after": _snapshot(processes)}


def _summary_ms(values: Sequence[float]) -> dict[str, float] | None:
    summary = Summary.of(values)
    if summary is None:
        return None
    return {"p50": round(summary.p50 * 1000, 1), "p99": round(summary.p99 * 1000, 1),
            "max": round(summary.max * 1000, 1)}
