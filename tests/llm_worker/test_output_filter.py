"""The worker's output filter: an answer's events through the StreamFilter (pure, no process)."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest

from services.common.lexicon.matcher import Matcher
from services.common.lexicon.model import Action, Category, Lexicon
from services.llm_worker import output_filter
from services.llm_worker.output_filter import Blocked, Verdict, screened

MATCHER = Matcher(Lexicon((Category("fraud", Action.BLOCK, ("刷单返利",)), Category("abuse", Action.MASK, ("傻逼",))),
                          ()))


class End:
    """Stands for the answerer's AnswerDone."""


class Source:
    """An answer's events; remembers how far it was read and whether it was closed."""

    def __init__(self, *events: str | End) -> None:
        self.events = events
        self.read = 0
        self.closed = False
        self.finished = False

    async def run(self) -> AsyncGenerator[str | End, None]:
        try:
            for event in self.events:
                self.read += 1
                yield event
            self.finished = True  # the answerer schedules pre-generation here, after its last yield
        finally:
            self.closed = True


async def collect(source: Source) -> list[object]:
    return [event async for event in screened(source.run(), MATCHER)]


async def test_output_filter_masks_a_word_split_across_deltas() -> None:
    end = End()
    events = await collect(Source("这个傻", "逼问题", end))
    assert "".join(e for e in events if isinstance(e, str)) == "这个**问题"
    assert events[-2:] == [Verdict(Action.MASK), end]


async def test_output_filter_block_stops_the_answer_and_closes_its_source() -> None:
    source = Source("欢迎加入", "刷单", "返利群", "日赚千元", End())
    events = await collect(source)
    texts = "".join(e for e in events if isinstance(e, str))
    assert texts == "欢迎加入" and "刷" not in texts
    assert isinstance(events[-1], Blocked) and events[-1].hit is not None and events[-1].hit.word == "刷单返利"
    assert source.closed and source.read == 3  # never read further: the generation is cancelled


async def test_output_filter_releases_a_held_prefix_at_the_end() -> None:
    end = End()
    events = await collect(Source("一起刷", end))  # 刷 could start 刷单返利: held until the end
    assert events == ["一起", "刷", Verdict(Action.ALLOW), end]


async def test_output_filter_reads_its_source_to_the_end_and_drops_text_after_it() -> None:
    end, late = End(), End()
    source = Source("你好", end, "不该出现", late)
    events = await collect(source)
    assert events == ["你好", Verdict(Action.ALLOW), end, late]
    assert source.finished and source.closed


async def test_output_filter_stops_an_answer_it_cannot_check_in_bounded_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output_filter, "MAX_HELD_CHARS", 10)
    # 刷 then noise only: all of it stays held, since 刷单返利 could still follow the noise.
    source = Source("开始刷", "." * 8, "." * 8, "单返利", End())
    events = await collect(source)
    assert events == ["开始", Blocked(None)] and source.closed
