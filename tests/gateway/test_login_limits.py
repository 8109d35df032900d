"""gateway/login_limits.py and gateway/readiness.py: bounded verification slots, failure buckets, one health round."""

from __future__ import annotations

import asyncio

import pytest

from gateway.login_limits import SLOT_WAIT_S, WAITERS_PER_SLOT, LoginLimits, LoginThrottled
from gateway.readiness import Readiness


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_login_limits_slots_queue_a_bounded_few_then_refuse_at_once() -> None:
    limits = LoginLimits(1, 100, 100, 600)
    held, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with limits.slot():
            held.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await held.wait()
    waiters = [asyncio.create_task(limits.slot().__aenter__()) for _ in range(WAITERS_PER_SLOT)]
    await asyncio.sleep(0)
    with pytest.raises(LoginThrottled) as refused:  # one more than may wait: no queue, an answer now
        await limits.slot().__aenter__()
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
    # The waiters give up after SLOT_WAIT_S while the slot stays taken.
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), SLOT_WAIT_S + 2)
    assert all(isinstance(result, LoginThrottled) for result in results)
    release.set()
    await holder
    async with limits.slot():  # free again
        pass
    limits.close()


async def test_login_limits_failures_per_address_and_user_name_with_successes_given_back() -> None:
    clock = Clock()
    limits = LoginLimits(2, 3, 2, 60, clock=clock)
    limits.charge("10.0.0.1", "shop1", "alice")
    limits.charge("10.0.0.2", "shop1", "Alice ")  # the same user name, folded
    with pytest.raises(LoginThrottled, match="user name") as refused:
        limits.charge("10.0.0.3", "shop1", "alice")
    assert refused.value.headers["RateLimit-Limit"] == "2" and int(refused.value.headers["Retry-After"]) == 30
    limits.charge("10.0.0.3", "shop2", "alice")  # another tenant's alice; 10.0.0.3 was not charged above
    ok = limits.charge("10.0.0.1", "shop1", "bob")
    limits.forgive(ok)  # bob logged in: no failure
    limits.charge("10.0.0.1", "shop1", "carol")
    limits.charge("10.0.0.1", "shop1", "dave")  # the address's third failure (alice, carol, dave)
    with pytest.raises(LoginThrottled, match="address"):
        limits.charge("10.0.0.1", "shop1", "erin")
    for _ in range(5):  # checking takes nothing
        limits.check("10.0.0.4", "shop1", "zoe")
    with pytest.raises(LoginThrottled, match="user name"):
        limits.check("10.0.0.4", "shop1", "alice")
    clock.now += 30  # one failure per window / N
    limits.check("10.0.0.3", "shop1", "alice")
    limits.charge("10.0.0.3", "shop1", "alice")
    limits.close()


async def test_readiness_one_round_a_second_shared_by_concurrent_askers() -> None:
    clock, rounds, gate = Clock(), [], asyncio.Event()

    async def check() -> dict[str, bool]:
        rounds.append(clock.now)
        await gate.wait()
        return {"session": True}

    readiness = Readiness(check, clock=clock)
    askers = [asyncio.create_task(readiness.backends()) for _ in range(50)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*askers) == [{"session": True}] * 50
    assert len(rounds) == 1
    clock.now += 0.9
    await readiness.backends()
    assert len(rounds) == 1  # still fresh
    clock.now += 0.2
    await readiness.backends()
    assert len(rounds) == 2
    await readiness.aclose()


async def test_readiness_a_cancelled_asker_does_not_cancel_the_round() -> None:
    gate = asyncio.Event()

    async def check() -> dict[str, bool]:
        await gate.wait()
        return {"session": False}

    readiness = Readiness(check)
    first = asyncio.create_task(readiness.backends())
    second = asyncio.create_task(readiness.backends())
    await asyncio.sleep(0)
    first.cancel()  # a prober that hung up
    gate.set()
    assert await second == {"session": False}
    await readiness.aclose()


async def test_login_limits_verifications_a_second_are_capped_then_refused_at_once() -> None:
    clock = Clock()
    limits = LoginLimits(4, 100, 100, 600, max_per_s=2, clock=clock)
    for _ in range(2):
        async with limits.slot():
            pass
    with pytest.raises(LoginThrottled) as refused:  # a free slot, but this second's verifications are spent
        async with limits.slot():
            pass
    assert refused.value.outcome == "busy" and refused.value.headers["Retry-After"] == "1"
    clock.now += 0.5  # one refilled
    async with limits.slot():
        pass
    with pytest.raises(LoginThrottled):
        async with limits.slot():
            pass
    limits.close()
