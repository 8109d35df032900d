"""The grounding policy of a turn (grounded.py), citations and the grounded cache key, on real indexes and plugins."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence

import nats.errors
import pytest

from devtools.fake_upstream import DEFAULT_DECLINE_MARKER, FakeUpstream, FakeUpstreamConfig
from services.llm_worker.cache import CachedAnswer
from services.llm_worker.cache_key import CacheKey, knowledge_part
from services.llm_worker.citations import Citation, CitedFinish, citations_of
from services.llm_worker.grounded import (
    GroundedProvider,
    Grounding,
    TenantSnapshot,
    grounded_prompt,
    plan_turn,
)
from services.llm_worker.kb.library import TenantKnowledge
from services.llm_worker.knowledge.chunking import chunk_document
from services.llm_worker.knowledge.grounding import GroundingMode
from services.llm_worker.knowledge.index import KnowledgeIndex
from services.llm_worker.knowledge.parsing import parse_document
from services.llm_worker.plugin_api import (
    ChatMessage,
    Delta,
    GenerationParams,
    Hit,
    PluginContext,
    Provider,
    ProviderError,
)
from tests.plugins.plugin_loading import PLUGINS_DIR, load_plugin

pytestmark = pytest.mark.timeout(30)

RETURNS = """# 退换货政策

## 退货
收到商品 7 天内可以申请退货，商品需保持完好。退货运费由买家承担，质量问题除外。

## 退款
退款在收到退货后 3 个工作日内原路退回原支付账户。
"""
SHIPPING = """# 配送说明

## 发货时间
下单后 48 小时内发货，节假日顺延。

## 运费
订单运费 10 元，满 99 元包邮。
"""
KB = load_plugin("knowledge_base")
OPENAI = load_plugin("openai_compatible")


def snapshot(version: int, returns: str = RETURNS) -> TenantKnowledge:
    chunks = [*chunk_document(parse_document(returns.encode(), "returns.md"), document_id="returns",
                              version=version, title="退换货政策", url="https://shop.example/returns"),
              *chunk_document(parse_document(SHIPPING.encode(), "shipping.md"), document_id="shipping",
                              version=version, title="配送说明", url="")]
    return TenantKnowledge("shop", version, KnowledgeIndex.build(chunks))


class Library:
    """A KnowledgeSource over snapshots built here: `current` is what the next turn gets."""

    def __init__(self, current: TenantSnapshot) -> None:
        self.current = current

    async def snapshot(self, tenant: str) -> TenantSnapshot:
        return self.current


def turn(*users: str) -> list[ChatMessage]:
    messages = [ChatMessage("system", "You are the tea shop's assistant.")]
    for text in users:
        messages += [ChatMessage("user", text), ChatMessage("assistant", "…")]
    return messages[:-1]


@pytest.mark.parametrize(("mode", "expected"), [("open", "open"), ("strict", "strict"), ("", "strict"),
                                                ("loose", "strict")])
def test_grounding_of_is_strict_unless_open(mode: str, expected: GroundingMode) -> None:
    assert Grounding.of(mode, "  Mei ") == Grounding(expected, "Mei")


async def test_plan_answers_small_talk_for_tenants_with_documents_and_offline_routes_only() -> None:
    with_documents, without = Library(snapshot(3)), Library(TenantKnowledge("shop", 0, None))
    assert (await plan_turn(with_documents, "shop", turn("你好"), Grounding(), offline=False)).kind == "small_talk"
    assert (await plan_turn(without, "shop", turn("你好"), Grounding(), offline=True)).kind == "small_talk"
    # An LLM route of a tenant without documents answers a greeting itself, as it always did.
    assert (await plan_turn(without, "shop", turn("你好"), Grounding(), offline=False)).kind == "ungrounded"
    assert (await plan_turn(None, "shop", turn("怎么退货？"), Grounding(), offline=True)).kind == "ungrounded"


async def test_plan_retrieves_on_the_snapshot_and_hands_off_what_the_documents_do_not_answer() -> None:
    library = Library(snapshot(3))
    answered = await plan_turn(library, "shop", turn("怎么退货？"), Grounding(), offline=True)
    assert answered.kind == "grounded" and answered.answerable and answered.knowledge_version == 3
    assert answered.hits[0].chunk.document_id == "returns" and not answered.follow_up
    assert answered.retrieval_seconds > 0
    unknown = await plan_turn(library, "shop", turn("量子色动力学是什么？"), Grounding(), offline=True)
    assert (unknown.kind, unknown.hits) == ("handoff", ())
    opened = await plan_turn(library, "shop", turn("量子色动力学是什么？"), Grounding("open"), offline=False)
    assert (opened.kind, opened.answerable) == ("grounded", False)


class Unreachable:
    """A KnowledgeSource whose store cannot be read (NATS down): what the library raises then."""

    async def snapshot(self, tenant: str) -> TenantSnapshot:
        raise nats.errors.NoServersError()


async def test_an_unreadable_knowledge_base_fails_the_turn_retryably_rather_than_answer_ungrounded() -> None:
    with pytest.raises(ProviderError, match="knowledge base is unavailable") as failed:
        await plan_turn(Unreachable(), "shop", turn("怎么退货？"), Grounding(), offline=True)
    assert failed.value.retryable and failed.value.status is None  # the edge answers 503


async def test_plan_resolves_a_follow_up_against_the_previous_turn() -> None:
    library = Library(snapshot(3))
    alone = await plan_turn(library, "shop", turn("那运费呢？"), Grounding(), offline=True)
    follow = await plan_turn(library, "shop", turn("怎么退货？", "那运费呢？"), Grounding(), offline=True)
    assert alone.hits[0].chunk.document_id == "shipping" and not alone.follow_up
    assert follow.hits[0].chunk.document_id == "returns" and follow.follow_up


@contextlib.asynccontextmanager
async def knowledge_base() -> AsyncIterator[Provider]:
    provider = KB.plugin({"chunk_delay_s": 0}, PluginContext(plugins_dir=PLUGINS_DIR))
    await provider.setup()
    try:
        yield provider
    finally:
        await provider.aclose()


async def collect(provider: GroundedProvider, messages: Sequence[ChatMessage]) -> tuple[str, CitedFinish]:
    text = ""
    async with contextlib.aclosing(provider.stream(messages, GenerationParams())) as events:
        async for event in events:
            if isinstance(event, Delta):
                text += event.text
            else:
                assert isinstance(event, CitedFinish)
                return text, event
    raise AssertionError("no finish")


async def test_a_turn_in_flight_finishes_on_the_snapshot_it_started_with() -> None:
    library = Library(snapshot(3))
    messages = turn("怎么退货？")
    plan = await plan_turn(library, "shop", messages, Grounding(), offline=True)
    library.current = snapshot(4, RETURNS.replace("7 天", "30 天"))  # a new index lands mid-turn
    async with knowledge_base() as inner:
        text, finish = await collect(GroundedProvider(inner, plan.hits), messages)
        later = await plan_turn(library, "shop", messages, Grounding(), offline=True)
        newer, _ = await collect(GroundedProvider(inner, later.hits), messages)
    assert "7 天内" in text and finish.finish_reason == "stop"
    assert [(c.document_id, c.chunk_id) for c in finish.citations] == [("returns", "returns-3-0")]
    assert finish.citations[0].quote in text
    assert "30 天内" in newer and later.knowledge_version == 4


async def test_offline_passages_that_do_not_answer_give_a_handoff_without_text() -> None:
    async with knowledge_base() as inner:
        text, finish = await collect(GroundedProvider(inner, ()), turn("怎么退货？"))
    assert (text, finish.finish_reason, finish.citations) == ("", "handoff", ())


async def llm_answer(config: FakeUpstreamConfig, hits: Sequence[Hit], question: str) -> tuple[str, CitedFinish]:
    async with FakeUpstream(config) as upstream:
        inner = OPENAI.plugin({"base_url": upstream.base_url, "model": "m"}, PluginContext(plugins_dir=PLUGINS_DIR))
        await inner.setup()
        try:
            prompt = grounded_prompt(turn(question), hits, Grounding())
            return await collect(GroundedProvider(inner, hits), prompt)
        finally:
            await inner.aclose()


async def test_an_llms_markers_become_citations() -> None:
    plan = await plan_turn(Library(snapshot(3)), "shop", turn("退货要运费吗？"), Grounding(), offline=False)
    text, finish = await llm_answer(FakeUpstreamConfig(grounded=True, chunk_count=7), plan.hits, "退货要运费吗？")
    assert text.endswith("[1]") and "退货运费由买家承担" in text and finish.finish_reason == "stop"
    assert [c.document_id for c in finish.citations] == ["returns"] and finish.cited == (0,)


@pytest.mark.parametrize("chunks", [1, 3, 11])
async def test_an_llms_decline_is_a_handoff_and_the_marker_is_never_shown(chunks: int) -> None:
    plan = await plan_turn(Library(snapshot(3)), "shop", turn("怎么退货？"), Grounding(), offline=False)
    config = FakeUpstreamConfig(reply=DEFAULT_DECLINE_MARKER, chunk_count=chunks)
    text, finish = await llm_answer(config, plan.hits, "怎么退货？")
    assert (text, finish.finish_reason, finish.citations) == ("", "handoff", ())


def test_citations_of_keeps_first_use_and_skips_numbers_out_of_range() -> None:
    hits = snapshot(2).retrieve("运费", k=5).hits
    found = citations_of(hits, (1, 0, 1, 9, -1), ("运费", ""))
    assert [c.chunk_id for c in found] == [hits[1].chunk.chunk_id, hits[0].chunk.chunk_id]
    assert found[0].quote == "运费" and found[1].quote == hits[0].chunk.text[:200]


def test_the_cache_key_changes_with_the_knowledge_version_and_stays_without_it() -> None:
    messages, params = turn("怎么退货？"), GenerationParams()

    def key(knowledge: str = "") -> str:
        return CacheKey.of("shop", "default", "v", messages, "怎么退货", params, "0.0.0", knowledge).digest

    assert key(knowledge_part(3, "strict", "")) != key(knowledge_part(4, "strict", ""))
    assert key(knowledge_part(3, "strict", "")) != key(knowledge_part(3, "open", ""))
    assert key() == CacheKey.of("shop", "default", "v", messages, "怎么退货", params, "0.0.0").digest


def test_a_cached_answer_keeps_its_citations() -> None:
    cited = Citation("returns", "退换货政策", "https://shop.example/returns", "returns-3-0", "7 天内可以申请退货")
    answer = CachedAnswer("7 天内可以申请退货", "stop", "knowledge-base", 5, 9, citations=(cited,))
    assert CachedAnswer.from_json(answer.to_json()) == answer
    assert json.loads(answer.to_json())["citations"][0]["document_id"] == "returns"
    assert CachedAnswer.from_json(json.dumps({"text": "t", "finish_reason": "stop", "model": "m",
                                              "prompt_tokens": 1, "completion_tokens": 1}).encode()).citations == ()
