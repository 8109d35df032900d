"""Token budgets: the newest turns that fit, and cuts that never break a character, in both encodings."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.session.context import build_context
from services.session.models import StoredMessage
from services.session.tokens import CL100K, MESSAGE_OVERHEAD_TOKENS, O200K, TokenCounter

COUNTERS = {name: TokenCounter.named(name) for name in (CL100K, O200K)}
COUNTER = COUNTERS[CL100K]
encodings = st.sampled_from(sorted(COUNTERS))


def message(role: str, content: str, counter: TokenCounter = COUNTER) -> StoredMessage:
    return StoredMessage(id="x", role=role, content=content, created_at=time.time(),
                         tokens=counter.count(content), encoding=counter.name)


# Customer-service text: Han characters (3 UTF-8 bytes, often split across tokens), English,
# full-width punctuation, digits, emoji including ZWJ sequences, flags, skin tones and
# combining marks (4-byte and multi-code-point), and any other valid character.
PIECES = [*"您好订单物流退款请帮我查一下谢谢快递还没到亲", "order", " shipping", "refund", " the", "OK", "ABC",
          "20240518001", " ", "  ", "\n", "\t", "，", "。", "！", "？", "：", "“", "”", "...", "!?", "'s", "’",
          "🙂", "👍🏽", "👨‍👩‍👧", "🇨🇳", "❤️", "é", "e\u0301", "ß", "<|endoftext|>", "\u200b", "𠀀", "ｶﾀｶﾅ"]
mixed_text = st.lists(st.sampled_from(PIECES) | st.characters(codec="utf-8"), max_size=120).map("".join)


@given(text=mixed_text, budget=st.integers(min_value=0, max_value=200), encoding=encodings)
@settings(max_examples=400, deadline=None)
def test_cut_prefix_fits_is_prefix_and_valid(text: str, budget: int, encoding: str) -> None:
    counter = COUNTERS[encoding]
    cut = counter.cut_prefix(text, budget)
    assert counter.count(cut) <= budget
    assert text.startswith(cut)  # documented: the beginning is kept
    assert "\ufffd" not in cut or "\ufffd" in text
    cut.encode("utf-8")  # whole characters only: no lone surrogate from a split code point
    if counter.count(text) <= budget:
        assert cut == text


@pytest.mark.parametrize("encoding", [CL100K, O200K])
def test_cut_prefix_chinese_never_yields_replacement_character(encoding: str) -> None:
    counter = COUNTERS[encoding]
    text = "您好，我的订单号是20240518001，快递三天了还没到，请帮我查一下物流状态，谢谢！👨‍👩‍👧 OK?"
    previous = ""
    for budget in range(counter.count(text) + 1):
        cut = counter.cut_prefix(text, budget)
        assert "\ufffd" not in cut and text.startswith(cut)
        assert counter.count(cut) <= budget
        assert len(cut) >= len(previous)  # a bigger budget never keeps less
        previous = cut
    assert previous == text


def test_cut_prefix_drops_a_character_split_across_tokens() -> None:
    # A rare Han character is several byte-level tokens: a budget that ends inside it keeps none of it.
    counter = COUNTERS[CL100K]
    rare = "𠀀"
    assert counter.count(rare) > 1
    assert counter.cut_prefix(rare, counter.count(rare) - 1) == ""
    assert counter.cut_prefix("好" + rare, counter.count("好")) == "好"


def test_encodings_count_chinese_differently() -> None:
    text = "您好，我的订单号是20240518001，快递三天了还没到，请帮我查一下物流状态，谢谢！"
    assert COUNTERS[CL100K].count(text) == 38
    assert COUNTERS[O200K].count(text) == 28


def test_context_keeps_newest_turns_that_fit() -> None:
    history = [message("user", f"question number {i} " * 5) for i in range(10)]
    one_cost = history[0].tokens + MESSAGE_OVERHEAD_TOKENS
    built = build_context(history, "", one_cost * 3, COUNTER)
    assert [m.content for m in built.messages] == [m.content for m in history[-3:]]
    assert built.truncated and built.total_tokens <= one_cost * 3


def test_context_puts_system_prompt_first_and_counts_it() -> None:
    history = [message("user", "你好"), message("assistant", "您好，请问有什么可以帮您？")]
    built = build_context(history, "You are a shop assistant.", 1000, COUNTER)
    assert [m.role for m in built.messages] == ["system", "user", "assistant"]
    assert not built.truncated
    assert built.total_tokens == sum(m.tokens + MESSAGE_OVERHEAD_TOKENS for m in built.messages)


def test_context_cuts_an_overlong_newest_message() -> None:
    history = [message("user", "物流" * 500)]
    built = build_context(history, "", 50, COUNTER)
    assert len(built.messages) == 1 and built.truncated
    assert history[0].content.startswith(built.messages[0].content)
    assert built.total_tokens <= 50


def test_context_recounts_messages_stored_in_another_encoding() -> None:
    text = "您好，我的订单号是20240518001，快递三天了还没到，请帮我查一下物流状态，谢谢！"
    history = [message("user", text, COUNTERS[CL100K])]
    built = build_context(history, "", 1000, COUNTERS[O200K])
    assert [(m.tokens, m.encoding) for m in built.messages] == [(28, O200K)]
    assert built.total_tokens == 28 + MESSAGE_OVERHEAD_TOKENS
    # Stored before the encoding was recorded: counted again, never trusted.
    legacy = StoredMessage(id="x", role="user", content=text, created_at=0.0, tokens=1)
    assert build_context([legacy], "", 1000, COUNTERS[CL100K]).messages[0].tokens == 38


@given(texts=st.lists(mixed_text, min_size=1, max_size=8), budget=st.integers(min_value=5, max_value=400),
       prompt=mixed_text, stored_in=encodings, built_with=encodings)
@settings(max_examples=150, deadline=None)
def test_context_never_exceeds_budget(texts: list[str], budget: int, prompt: str, stored_in: str,
                                      built_with: str) -> None:
    history = [message("user", t, COUNTERS[stored_in]) for t in texts if t]
    counter = COUNTERS[built_with]
    built = build_context(history, prompt, budget, counter)
    assert built.total_tokens <= budget
    assert sum(m.tokens + MESSAGE_OVERHEAD_TOKENS for m in built.messages) == built.total_tokens
    assert all(m.tokens == counter.count(m.content) for m in built.messages)
    kept = [m for m in built.messages if m.role != "system"]
    # The newest turns, oldest first; only the newest may be cut, and only to a prefix.
    originals = [m.content for m in history[len(history) - len(kept):]]
    assert [m.content for m in kept[:-1]] == originals[:-1]
    if kept:
        assert originals[-1].startswith(kept[-1].content)
