"""Open-loop arrivals: each request starts on its schedule, whether or not earlier ones have ended."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

T = TypeVar("T")

Arrivals = Literal["even", "poisson"]
"""`even`: one start every 1/rate s; `poisson`: exponential gaps of mean 1/rate s (seeded)."""
ARRIVALS: tuple[Arrivals, ...] = ("even", "poisson")
MAX_ARRIVALS = 1_000_000
"""A schedule longer than this is refused: it would be a typo, not a benchmark."""


def arrival_offsets(rate: float, *, count: int | None = None, duration_s: float | None = None,
                    arrivals: Arrivals = "even", seed: int = 0) -> list[float]:
    """Start times in seconds from the run's start, the first at 0, ascending.

    Bounded by `count` starts, by `duration_s` (every start is before it), or by both (the first
    bound reached). The same arguments always give the same schedule, so two paths measured at
    one rate get identical arrivals.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {ARRIVALS}, got {arrivals!r}")
    if count is None and duration_s is None:
        raise ValueError("give count, duration_s or both")
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if count is not None and count > MAX_ARRIVALS or duration_s is not None and rate * duration_s > MAX_ARRIVALS:
        raise ValueError(f"at most {MAX_ARRIVALS} arrivals per schedule")
    limit = MAX_ARRIVALS if count is None else count
    draw = random.Random(seed).expovariate
    offsets: list[float] = []
    at = 0.0
    while len(offsets) < limit and (duration_s is None or at < duration_s):
        offsets.append(at)
        # Even: computed from the index, not summed, so no rounding drift over a long run.
        at = (len(offsets) / rate) if arrivals == "even" else at + draw(rate)
    return offsets


@dataclass(frozen=True, slots=True)
class Fired(Generic[T]):
    """One scheduled start and what it returned."""

    index: int
    due_s: float
    """When it was due, seconds from the run's start."""
    lag_s: float
    """How late it actually started: the client's own delay, not the server's."""
    result: T


Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


async def fire_on_schedule(offsets: Sequence[float], start: Callable[[int], Coroutine[object, object, T]], *,
                           clock: Clock = time.perf_counter, sleep: Sleep = asyncio.sleep) -> list[Fired[T]]:
    """Start `start(i)` as its own task at `offsets[i]` after now, never waiting for an earlier one;
    return once every one has ended, in schedule order.

    `start` owns its deadline (a request's timeout), so the run is bounded by the last offset plus
    that deadline. If this coroutine is cancelled or a start raises, every started task is cancelled.
    """
    if any(b < a for a, b in itertools.pairwise(offsets)):
        raise ValueError("offsets must be ascending")
    t0 = clock()
    tasks: list[asyncio.Task[T]] = []
    lags: list[float] = []
    try:
        for index, offset in enumerate(offsets):
            delay = t0 + offset - clock()
            if delay > 0:
                await sleep(delay)
            lags.append(max(0.0, clock() - t0 - offset))
            tasks.append(asyncio.create_task(start(index)))
        results = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return [Fired(i, offsets[i], lags[i], result) for i, result in enumerate(results)]


def highest_within(passed: Mapping[float, bool]) -> float | None:
    """The highest rate that passed with every lower measured rate passing too; None if the lowest failed.

    A pass above a failure is noise on a shared machine, not capacity, so it does not count.
    """
    best: float | None = None
    for rate in sorted(passed):
        if not passed[rate]:
            break
        best = rate
    return best
