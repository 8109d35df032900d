"""Windowed batching: the first text at once, then one text per window, the rest at the end, in order."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from services.llm_worker.coalesce import windowed

LONG_WINDOW_S = 60.0
"""Far beyond the per-test timeout: a text held for a window would hang the test, not pass it."""


async def source(events: list[object], pause_s: float = 0.0, fail: bool = False) -> AsyncIterator[object]:
    for event in events:
        await asyncio.sleep(pause_s)
        yield event
    if fail:
        raise RuntimeError("upstream went away")


async def gated(before: list[object], gate: asyncio.Event, after: list[object]) -> AsyncIterator[object]:
    """`before`, then nothing until `gate` is set, then `after`."""
    for event in before:
        yield event
    await gate.wait()
    for event in after:
        yield event


async def test_windowed_sends_the_first_text_at_once_and_the_rest_when_the_source_ends() -> None:
    gate = asyncio.Event()
    stream = windowed(gated(["您好"], gate, ["，请", "问", 42]), LONG_WINDOW_S)
    # The source holds everything else back until the first text was received: no window delays it.
    assert await anext(stream) == "您好"
    gate.set()
    # The window is a minute long; the end of the answer flushes it at once.
    assert [e async for e in stream] == ["，请问", 42]


async def test_windowed_holds_the_texts_of_a_window_for_one_message() -> None:
    gate = asyncio.Event()
    stream = windowed(gated(["a", "b", "c"], gate, ["d", "e", 42]), LONG_WINDOW_S)
    assert await anext(stream) == "abc"  # already there together: one message
    following = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    gate.set()
    # "d" and "e" came within the window: nothing goes out until the end flushes them together.
    assert await following == "de"
    assert [e async for e in stream] == [42]


async def test_windowed_zero_keeps_deltas_apart_when_the_consumer_keeps_up() -> None:
    got = [e async for e in windowed(source(["a", "b", "c", 42], pause_s=0.01), 0)]
    assert got == ["a", "b", "c", 42]


async def test_windowed_zero_joins_a_backlog_and_keeps_order() -> None:
    got = []
    async for event in windowed(source(["a", "b", "c", "d", 42]), 0):
        got.append(event)
        await asyncio.sleep(0.01)  # a busy sender
    assert "".join(e for e in got if isinstance(e, str)) == "abcd" and got[-1] == 42 and len(got) < 5


async def test_windowed_a_text_after_an_idle_window_leaves_as_it_comes() -> None:
    # Texts 50 ms apart, a 1 ms window: each window is over before the next text, which goes alone.
    got = [e async for e in windowed(source(["a", "b", "c", 42], pause_s=0.05), 0.001)]
    assert got == ["a", "b", "c", 42]


async def test_windowed_keeps_the_exact_text_of_any_chunking() -> None:
    rng = random.Random(20)
    for _ in range(20):
        answer = "".join(rng.choice("您好订单已发货，预计两到三天送达。ab ") for _ in range(rng.randint(1, 60)))
        cuts = sorted(rng.sample(range(1, len(answer)), min(len(answer) - 1, rng.randint(0, 15))))
        chunks = [answer[i:j] for i, j in zip([0, *cuts], [*cuts, len(answer)], strict=True)]

        async def jittered(parts: list[str] = chunks) -> AsyncIterator[object]:
            for part in parts:
                await asyncio.sleep(rng.choice((0, 0, 0.001, 0.003)))
                yield part
            yield 42

        got = [e async for e in windowed(jittered(), 0.002)]
        assert "".join(e for e in got if isinstance(e, str)) == answer and got[-1] == 42
        assert len(got) <= len(chunks) + 1


async def test_windowed_raises_the_source_error_after_what_came_before() -> None:
    got: list[str] = []
    with pytest.raises(RuntimeError, match="went away"):
        async for event in windowed(source(["a", "b"], pause_s=0.005, fail=True), LONG_WINDOW_S):
            assert isinstance(event, str)
            got.append(event)
    assert "".join(got) == "ab"  # "b" was held by the window and still leaves before the error


async def test_windowed_closing_early_cancels_the_source() -> None:
    cancelled = asyncio.Event()

    async def endless() -> AsyncIterator[str]:
        try:
            while True:
                await asyncio.sleep(0.001)
                yield "x"
        except asyncio.CancelledError:
            cancelled.set()
            raise

    stream = windowed(endless(), LONG_WINDOW_S)
    assert await anext(stream)
    following = asyncio.ensure_future(anext(stream))  # waiting out its window
    await asyncio.sleep(0.01)
    following.cancel()
    with pytest.raises(asyncio.CancelledError):
        await following
    assert isinstance(stream, AsyncGenerator)  # windowed is an async generator function: it can be closed
    await stream.aclose()
    assert cancelled.is_set()
