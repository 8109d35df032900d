"""Small talk: greetings, thanks and goodbyes get a short reply in the visitor's language; questions do not."""

from __future__ import annotations

import pytest

from services.llm_worker.knowledge.smalltalk import small_talk


@pytest.mark.parametrize(("text", "kind", "language"), [
    ("你好", "greeting", "zh"), ("您好！", "greeting", "zh"), ("你好呀😊", "greeting", "zh"),
    ("亲，在吗？", "greeting", "zh"),
    ("hi", "greeting", "en"), ("Hello!!", "greeting", "en"), ("hey there 👋", "greeting", "en"),
    ("谢谢", "thanks", "zh"), ("好的，谢谢你~", "thanks", "zh"), ("thanks", "thanks", "en"),
    ("Thank you very much!", "thanks", "en"),
    ("再见", "goodbye", "zh"), ("谢谢，再见！", "goodbye", "zh"), ("bye", "goodbye", "en"),
    ("ok thanks, bye", "goodbye", "en"),
])
def test_small_talk_is_recognised(text: str, kind: str, language: str) -> None:
    found = small_talk(text)
    assert found is not None and (found.kind, found.language) == (kind, language)
    assert found.reply


@pytest.mark.parametrize("text", ["你好，怎么退货？", "hi, how do I return a teapot?", "谢谢，运费多少？",
                                  "hello 12345", "退货", "", "🙂",
                                  "thanks for nothing, your tea arrived broken and I want a refund"])
def test_a_question_is_not_small_talk(text: str) -> None:
    assert small_talk(text) is None


def test_greeting_reply_names_the_assistant_in_the_visitors_language() -> None:
    zh, en = small_talk("你好", assistant_name="小福"), small_talk("hello", assistant_name="Fu")
    assert zh is not None and "小福" in zh.reply and "您好" in zh.reply
    assert en is not None and "Fu" in en.reply and en.reply.startswith("Hi")


def test_thanks_and_goodbye_replies_differ_by_language() -> None:
    zh, en = small_talk("谢谢"), small_talk("thanks")
    assert zh is not None and en is not None and zh.reply != en.reply and "不客气" in zh.reply
