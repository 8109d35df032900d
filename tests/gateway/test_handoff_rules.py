"""Which visitor messages ask for a human (pure)."""

from __future__ import annotations

import pytest

from gateway.live.handoff import HandoffRules
from gateway.settings import GatewaySettings

RULES = HandoffRules(GatewaySettings.model_fields["handoff_keywords"].default)


@pytest.mark.parametrize("text", ["转人工", "我要转人工！", "人工客服在吗", "找真人", "human please", "Agent!",
                                  "can I talk to a live agent?", "ＨＵＭＡＮ", "  人工  "])
def test_short_requests_for_a_human_are_recognised(text: str) -> None:
    assert RULES.asks_for_human(text)


@pytest.mark.parametrize("text", ["人工智能是什么？", "do you have agents in Shanghai", "agency fees?", "humane tea",
                                  "多久发货？", "", "请问" + "很长的问题" * 20 + "人工"])
def test_other_messages_are_not(text: str) -> None:
    assert not RULES.asks_for_human(text)


def test_keywords_are_configurable() -> None:
    rules = HandoffRules(("operator", "客服MM"))
    assert rules.asks_for_human("operator?") and rules.asks_for_human("找客服mm")
    assert not rules.asks_for_human("转人工")
    assert not HandoffRules(()).asks_for_human("human")
