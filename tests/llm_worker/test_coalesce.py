"""Adaptive batching: nothing waits when the consumer keeps up; a backlog goes out as one delta."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.llm_worker.coalesce import coalesced


async def source(events: list[object], pause_s: float = 0.0, fail: bool = False) -> AsyncIterator[object]:
    for event in events:
        await asyncio.sleep(pause_s)
        yield event
    if fail:
        raise RuntimeError("upstream went away")


async def test_coalesce_keeps_deltas_apart_when_the_consumer_keeps_up() -> None:
    got = [e async for e in coalesced(source(["a", "b", "c", 42], pause_s=0.01))]
    assert got == ["a", "b", "c", 42]


async def test_coalesce_joins_a_backlog_and_keeps_order() -> None:
    got = []
    async for event in coalesced(source(["a", "b", "c", "d", 42])):
        got.append(event)
        await asyncio.sleep(0.01)  # a busy sender
    assert "".join(e for e in got if isinstance(e, str)) == "abcd" and got[-1] == 42 and len(got) < 5


async def test_coalesce_raises_the_source_error_after_what_came_before() -> None:
    got = []
    with pytest.raises(RuntimeError, match="went away"):
        async for event in coalesced(source(["a", "b"], pause_s=0.005, fail=True)):
            got.append(event)
    assert "".join(got) == "ab"


async def test_coalesce_closing_early_cancels_the_source() -> None:
    cancelled = asyncio.Event()

    async def endless() -> AsyncIterator[str]:
        try:
            while True:
                await asyncio.sleep(0.001)
                yield "x"
        except asyncio.CancelledError:
            cancelled.set()
            raise

    stream = coalesced(endless())
    assert await anext(stream)
    await stream.aclose()
    assert cancelled.is_set()
