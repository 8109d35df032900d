"""Open-loop scheduling: arrival times, starts that never wait for earlier requests, the highest passing rate."""

from __future__ import annotations

import asyncio
import itertools
import statistics

import pytest

from bench.arrivals import arrival_offsets, fire_on_schedule, highest_within
from bench.loadgen import OpenLoopSpec, Target, run_open_loop
from devtools.fake_upstream import FakeUpstream, FakeUpstreamConfig

pytestmark = pytest.mark.timeout(20)


class FakeClock:
    """Time that moves only when slept on; `overshoot_s` makes every sleep late, as a busy loop's are."""

    def __init__(self, overshoot_s: float = 0.0) -> None:
        self.now = 100.0
        self.overshoot_s = overshoot_s
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.slept.append(delay)
        await asyncio.sleep(0)  # tasks started before this sleep run now, at the time they started
        self.now += delay + self.overshoot_s


def test_even_arrivals_are_evenly_spaced_and_bounded_by_count_or_duration() -> None:
    assert arrival_offsets(10, count=4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert arrival_offsets(10, duration_s=0.5) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert len(arrival_offsets(10, count=3, duration_s=10)) == 3  # the first bound reached wins
    assert len(arrival_offsets(10, count=100, duration_s=1)) == 10
    assert arrival_offsets(10, count=0) == []
    long = arrival_offsets(3, count=30_001)
    assert long[-1] == 10_000.0  # from the index, no drift from summing 1/3


def test_poisson_arrivals_are_seeded_with_the_mean_gap_of_the_rate() -> None:
    offsets = arrival_offsets(50, count=20_000, arrivals="poisson", seed=7)
    assert offsets == arrival_offsets(50, count=20_000, arrivals="poisson", seed=7)
    assert offsets != arrival_offsets(50, count=20_000, arrivals="poisson", seed=8)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert offsets[0] == 0.0 and min(gaps) >= 0
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.03)
    # Exponential gaps: the spread equals the mean (even arrivals would have none).
    assert statistics.pstdev(gaps) == pytest.approx(1 / 50, rel=0.05)
    within = arrival_offsets(50, duration_s=2, arrivals="poisson", seed=1)
    assert within and max(within) < 2


@pytest.mark.parametrize("kwargs", [
    {"rate": 0, "count": 1}, {"rate": 10}, {"rate": 10, "count": -1}, {"rate": 10, "duration_s": 0},
    {"rate": 10, "count": 1, "arrivals": "bursty"}, {"rate": 1e9, "duration_s": 10},
])
def test_arrival_offsets_refuse_bad_bounds(kwargs: dict[str, float | str]) -> None:
    with pytest.raises(ValueError):
        arrival_offsets(**kwargs)  # type: ignore[arg-type]  # bad values on purpose


async def test_starts_follow_the_schedule_while_earlier_requests_are_still_open() -> None:
    clock = FakeClock()
    release = asyncio.Event()
    started: list[tuple[int, float]] = []

    async def start(index: int) -> int:
        started.append((index, clock() - 100.0))
        await release.wait()  # no request ends until all have started: a closed loop would hang here
        return index * 10

    offsets = arrival_offsets(20, count=5)
    run = asyncio.create_task(fire_on_schedule(offsets, start, clock=clock, sleep=clock.sleep))
    while len(started) < 5:
        await asyncio.sleep(0)
    assert [i for i, _ in started] == [0, 1, 2, 3, 4]
    assert [at for _, at in started] == pytest.approx(offsets)
    assert not run.done()
    release.set()
    fired = await run
    assert [(f.index, f.result) for f in fired] == [(i, i * 10) for i in range(5)]
    assert [f.due_s for f in fired] == offsets
    assert [f.lag_s for f in fired] == pytest.approx([0.0] * 5, abs=1e-9)


async def test_a_late_client_records_its_lag_and_does_not_shift_later_starts() -> None:
    clock = FakeClock(overshoot_s=0.03)  # every sleep ends 30 ms late
    offsets = [0.0, 0.1, 0.2, 0.21, 1.0]

    async def start(index: int) -> float:
        return clock() - 100.0

    fired = await fire_on_schedule(offsets, start, clock=clock, sleep=clock.sleep)
    # Due times stay on the schedule (from the run's start, not from the previous start), so a
    # late start is caught up on: 0.21 was already past when 0.2 started late, so it started at once.
    assert [f.lag_s for f in fired] == pytest.approx([0.0, 0.03, 0.03, 0.02, 0.03])
    assert clock.slept == pytest.approx([0.1, 0.07, 0.77])


async def test_cancelling_the_run_cancels_every_started_request() -> None:
    clock = FakeClock()
    cancelled: list[int] = []
    started = 0

    async def start(index: int) -> None:
        nonlocal started
        started += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(index)
            raise

    run = asyncio.create_task(fire_on_schedule([0.0, 0.0, 0.0], start, clock=clock, sleep=clock.sleep))
    while started < 3:
        await asyncio.sleep(0)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert sorted(cancelled) == [0, 1, 2]


async def test_offsets_must_be_ascending() -> None:
    async def start(index: int) -> None:
        return None

    with pytest.raises(ValueError, match="ascending"):
        await fire_on_schedule([0.0, 0.2, 0.1], start)


def test_highest_within_stops_at_the_first_failing_rate() -> None:
    assert highest_within({10: True, 20: True, 40: False, 60: True}) == 20
    assert highest_within({40: True, 10: True, 20: True}) == 40
    assert highest_within({10: False, 20: True}) is None
    assert highest_within({}) is None


async def test_open_loop_run_overlaps_requests_against_a_real_server() -> None:
    # Each answer takes about 100 ms; 10 arrive within 45 ms, so they must overlap.
    config = FakeUpstreamConfig(ttft_s=0.05, chunk_count=3, chunk_interval_s=0.02)
    async with FakeUpstream(config) as upstream:
        target = Target("direct", f"{upstream.base_url}/chat/completions", "openai",
                        lambda user, seq: {"model": "m", "stream": True,
                                           "messages": [{"role": "user", "content": f"{user}/{seq}"}]})
        result = await run_open_loop(target, OpenLoopSpec(rate=200, requests=10, users=4))
        assert upstream.stats.requests_total == upstream.stats.completed == 10
        assert upstream.stats.max_in_flight > 1

    assert (result.requests, result.succeeded, result.errors) == (10, 10, {})
    assert result.offered_rate == 200 and result.max_in_flight == result.concurrency > 1
    assert {r.user for r in result.samples} == {0, 1, 2, 3}
    assert result.ttft is not None and result.ttft.count == 10
    assert result.start_lag is not None and result.start_lag.count == 10


def test_open_loop_spec_needs_a_bound() -> None:
    with pytest.raises(ValueError):
        OpenLoopSpec(rate=10)
    with pytest.raises(ValueError):
        OpenLoopSpec(rate=10, requests=5, users=0)
    assert len(OpenLoopSpec(rate=10, duration_s=1, requests=100).offsets()) == 10
