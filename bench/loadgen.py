"""A load generator: streamed chat answers over HTTP, timed, from a closed loop of users or an open-loop schedule."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import aiohttp

from bench.arrivals import Arrivals, arrival_offsets, fire_on_schedule
from bench.sse_reader import SseEvent, read_sse

Flavour = Literal["kefu", "openai"]
"""`kefu`: /v1/chat events (message, done, error); `openai`: `data: {chunk}` lines, then `data: [DONE]`."""

FLAVOURS: tuple[Flavour, ...] = ("kefu", "openai")

BodyBuilder = Callable[[int, int], Mapping[str, object]]
"""(virtual user, that user's request number) -> JSON body."""
HeadersBuilder = Callable[[int], Mapping[str, str]]
"""virtual user -> request headers (a distinct principal per user keeps rate limits per user)."""


def _no_headers(user: int) -> Mapping[str, str]:
    return {}


@dataclass(frozen=True, slots=True)
class Target:
    """Where and what to send; one POST per request, answered as a server-sent event stream."""

    name: str
    url: str
    flavour: Flavour
    body: BodyBuilder
    headers: HeadersBuilder = _no_headers

    def __post_init__(self) -> None:
        if self.flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}, got {self.flavour!r}")


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """How much load: `concurrency` users in a closed loop until `requests` are sent or `duration_s` ends."""

    concurrency: int
    requests: int | None = None
    duration_s: float | None = None
    timeout_s: float = 60.0
    """Deadline of one request, connect to end of stream."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if (self.requests is None) == (self.duration_s is None):
            raise ValueError("give exactly one of requests and duration_s")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True, slots=True)
class OpenLoopSpec:
    """Open loop: requests start at `rate` per second on a fixed schedule, whether or not earlier ones ended.

    Bounded by `requests`, by `duration_s` of starts, or both; each request by `timeout_s`. Request i
    speaks as user i % `users` (one principal each), so per-user limits see a realistic spread.
    """

    rate: float
    requests: int | None = None
    duration_s: float | None = None
    arrivals: Arrivals = "even"
    seed: int = 0
    users: int = 100
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.requests is None and self.duration_s is None:
            raise ValueError("give requests, duration_s or both")
        if self.users < 1:
            raise ValueError(f"users must be >= 1, got {self.users}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        self.offsets()  # validates the rest (bounds, arrivals)

    def offsets(self) -> list[float]:
        return arrival_offsets(self.rate, count=self.requests, duration_s=self.duration_s,
                               arrivals=self.arrivals, seed=self.seed)


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One request: times are seconds from just before the POST."""

    user: int
    ok: bool
    total_s: float
    """Until the terminal event (done / [DONE] / error), or until the failure."""
    ttft_s: float | None = None
    """Until the first non-empty content delta; None when none came."""
    error: str | None = None
    """Failure code: `http_<status>[:<code>]`, the `error` event's code, or the client exception's name."""
    cached: bool = False
    """kefu's `done` said the answer came from its cache (the upstream was not asked)."""


@dataclass(frozen=True, slots=True)
class Summary:
    """Distribution of one timing in seconds."""

    count: int
    mean: float
    p50: float
    p95: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary | None:
        if not values:
            return None
        p50, p95, p99 = percentiles(values, (50, 95, 99))
        return cls(len(values), statistics.fmean(values), p50, p95, p99, min(values), max(values))


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One run against one target; timings cover the successful requests only."""

    target: str
    flavour: Flavour
    concurrency: int
    requests: int
    succeeded: int
    failed: int
    errors: dict[str, int]
    cached: int
    duration_s: float
    throughput_rps: float
    """Successful requests per second of wall time."""
    ttft: Summary | None
    total: Summary | None
    samples: tuple[RequestResult, ...] = field(default=(), repr=False)
    offered_rate: float | None = None
    """Open loop: the scheduled arrival rate (requests/s); None for a closed loop."""
    start_lag: Summary | None = None
    """Open loop: how late the client started requests against their schedule (its own delay)."""
    max_in_flight: int | None = None
    """Open loop: the most requests the client had open at once."""

    def to_dict(self, *, with_samples: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not with_samples:
            del data["samples"]
        return data


def percentiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """Percentiles (0..100) by linear interpolation between closest ranks (numpy's default method).

    Unlike statistics.quantiles it accepts a single value and any q, and sorts once for all qs.
    """
    if not values:
        raise ValueError("percentiles of no values")
    ordered = sorted(values)
    return [_interpolate(ordered, q) for q in qs]


def percentile(values: Sequence[float], q: float) -> float:
    return percentiles(values, (q,))[0]


def rank_percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile, `share` in 0..1 (the knowledge benches' figures: no interpolation)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def median_of(values: Sequence[float | None]) -> float | None:
    """The median of the values there are (None ignored); None when there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _interpolate(ordered: Sequence[float], q: float) -> float:
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True, slots=True)
class _Step:
    """What one SSE event means for the request."""

    content: bool = False
    done: bool = False
    error: str | None = None
    cached: bool = False


def _kefu_step(event: SseEvent) -> _Step:
    if event.event == "message":
        return _Step(content=bool(event.json().get("delta")))
    if event.event == "done":
        return _Step(done=True, cached=bool(event.json().get("cached")))
    if event.event == "error":
        return _Step(error=str(event.json().get("code") or "error_event"))
    return _Step()  # `session` and anything newer


def _openai_step(event: SseEvent) -> _Step:
    if event.data == "[DONE]":
        return _Step(done=True)
    chunk = event.json()
    if isinstance(chunk.get("error"), dict):  # some servers report a failure mid-stream this way
        return _Step(error=str(chunk["error"].get("code") or chunk["error"].get("type") or "error_event"))
    choices = chunk.get("choices") or []
    return _Step(content=bool(choices and (choices[0].get("delta") or {}).get("content")))


_STEPS: Mapping[Flavour, Callable[[SseEvent], _Step]] = {"kefu": _kefu_step, "openai": _openai_step}


async def _error_code(response: aiohttp.ClientResponse) -> str:
    """`http_<status>` plus the body's error code when it has one (kefu's and OpenAI's shapes)."""
    try:
        error = (await response.json(content_type=None)).get("error")
        code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
    except (ValueError, AttributeError, aiohttp.ClientError):
        code = None
    return f"http_{response.status}:{code}" if code else f"http_{response.status}"


async def _read_stream(response: aiohttp.ClientResponse, flavour: Flavour, user: int,
                       started: float) -> RequestResult:
    step_of = _STEPS[flavour]
    ttft: float | None = None
    async for event in read_sse(response):
        try:
            step = step_of(event)
        except (ValueError, AttributeError):
            return RequestResult(user, False, time.perf_counter() - started, ttft, "malformed_event")
        if step.content and ttft is None:
            ttft = time.perf_counter() - started
        if step.done or step.error:
            total = time.perf_counter() - started
            await response.read()  # drain what is left so the connection goes back to the pool
            return RequestResult(user, step.error is None, total, ttft, step.error, step.cached)
    return RequestResult(user, False, time.perf_counter() - started, ttft, "incomplete_stream")


async def _one_request(http: aiohttp.ClientSession, target: Target, user: int, seq: int) -> RequestResult:
    body, headers = target.body(user, seq), target.headers(user)
    started = time.perf_counter()
    try:
        async with http.post(target.url, json=body, headers=headers) as response:
            if response.status != 200:
                return RequestResult(user, False, time.perf_counter() - started,
                                     error=await _error_code(response))
            return await _read_stream(response, target.flavour, user, started)
    except (aiohttp.ClientError, TimeoutError) as error:
        return RequestResult(user, False, time.perf_counter() - started, error=type(error).__name__)


class _Budget:
    """Hands out requests to the users until the count is spent or the time is up."""

    def __init__(self, spec: LoadSpec) -> None:
        self._left = spec.requests
        self._deadline = None if spec.duration_s is None else time.perf_counter() + spec.duration_s

    def take(self) -> bool:
        if self._deadline is not None:
            return time.perf_counter() < self._deadline
        assert self._left is not None
        if self._left <= 0:
            return False
        self._left -= 1  # one event loop: no lock needed between check and decrement
        return True


async def _virtual_user(http: aiohttp.ClientSession, target: Target, user: int,
                        budget: _Budget) -> list[RequestResult]:
    """Closed loop: the next request leaves only when the previous answer has ended."""
    results: list[RequestResult] = []
    while budget.take():
        results.append(await _one_request(http, target, user, len(results)))
    return results


def summarise(target: Target, concurrency: int, results: Sequence[RequestResult],
              duration_s: float) -> LoadResult:
    good = [r for r in results if r.ok]
    errors = Counter(r.error or "unknown" for r in results if not r.ok)
    return LoadResult(
        target=target.name,
        flavour=target.flavour,
        concurrency=concurrency,
        requests=len(results),
        succeeded=len(good),
        failed=len(results) - len(good),
        errors=dict(sorted(errors.items())),
        cached=sum(r.cached for r in good),
        duration_s=duration_s,
        throughput_rps=len(good) / duration_s if duration_s > 0 else 0.0,
        ttft=Summary.of([r.ttft_s for r in good if r.ttft_s is not None]),
        total=Summary.of([r.total_s for r in good]),
        samples=tuple(results),
    )


async def run_load(target: Target, spec: LoadSpec) -> LoadResult:
    """Run `spec.concurrency` virtual users against `target` on one client session; return the figures."""
    # limit=0: the pool must not queue users behind each other (aiohttp's default caps it at 100).
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    budget = _Budget(spec)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        started = time.perf_counter()
        per_user = await asyncio.gather(
            *(_virtual_user(http, target, user, budget) for user in range(spec.concurrency)))
        duration = time.perf_counter() - started
    return summarise(target, spec.concurrency, [r for results in per_user for r in results], duration)


async def run_open_loop(target: Target, spec: OpenLoopSpec) -> LoadResult:
    """Start requests on `spec`'s schedule on one client session; return the figures.

    `concurrency` in the result is the most requests in flight at once (what the arrivals built up).
    """
    offsets = spec.offsets()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    in_flight = peak = 0

    async def one(index: int) -> RequestResult:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await _one_request(http, target, index % spec.users, index // spec.users)
        finally:
            in_flight -= 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        started = time.perf_counter()
        fired = await fire_on_schedule(offsets, one)
        duration = time.perf_counter() - started
    result = summarise(target, peak, [f.result for f in fired], duration)
    return replace(result, offered_rate=spec.rate, max_in_flight=peak,
                   start_lag=Summary.of([f.lag_s for f in fired]))


def format_summary(result: LoadResult) -> str:
    """One line for logs: counts, TTFT and total p50/p99 in ms, throughput."""
    def ms(summary: Summary | None, name: str) -> str:
        if summary is None:
            return f"{name} -"
        return f"{name} p50 {summary.p50 * 1e3:.1f} p99 {summary.p99 * 1e3:.1f} ms"
    load = f"c={result.concurrency}" if result.offered_rate is None else f"{result.offered_rate:g}/s"
    return (f"{result.target} {load}: {result.succeeded}/{result.requests} ok, "
            f"{ms(result.ttft, 'ttft')}, {ms(result.total, 'total')}, {result.throughput_rps:.1f} req/s"
            + (f", errors {json.dumps(result.errors)}" if result.errors else ""))
