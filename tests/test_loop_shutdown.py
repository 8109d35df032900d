"""The test loop's shutdown cancels a task again when it swallowed the first cancel (tests/loop_shutdown.py)."""

from __future__ import annotations

import asyncio

import pytest

from tests.loop_shutdown import TasksOutlivedTheTest, cancel_all_tasks_until_done


async def _swallows_cancels(times: list[int], ended: list[str]) -> None:
    swallowed = 0
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed += 1
            if swallowed > times[0]:
                ended.append("ended")
                raise


def test_a_task_swallowing_two_cancels_is_cancelled_until_it_ends() -> None:
    loop = asyncio.new_event_loop()
    ended: list[str] = []
    try:
        task = loop.create_task(_swallows_cancels([2], ended))
        loop.run_until_complete(asyncio.sleep(0))
        cancel_all_tasks_until_done(loop)
        assert task.cancelled() and ended == ["ended"]
    finally:
        loop.close()


def test_a_task_that_never_ends_fails_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.loop_shutdown.GIVE_UP_AFTER_S", 0.5)
    loop = asyncio.new_event_loop()
    ended: list[str] = []
    try:
        times = [10**6]
        task = loop.create_task(_swallows_cancels(times, ended))
        loop.run_until_complete(asyncio.sleep(0))
        with pytest.raises(TasksOutlivedTheTest, match="_swallows_cancels"):
            cancel_all_tasks_until_done(loop)
        assert not task.done() and ended == []
        times[0] = 0  # let it end, so the loop closes clean
        task.cancel()
        loop.run_until_complete(asyncio.wait([task]))
        assert ended == ["ended"]
    finally:
        loop.close()


def test_the_runner_uses_it() -> None:
    assert asyncio.runners._cancel_all_tasks is cancel_all_tasks_until_done  # type: ignore[attr-defined]
