"""Greetings, thanks and goodbyes in Chinese and English: a short reply instead of a search (or a handoff)."""

from __future__ import annotations

import re
import unicodedata

from services.llm_worker.knowledge.analysis import is_cjk
from services.llm_worker.knowledge.models import SmallTalk, SmallTalkKind

MAX_CHARS = 40
"""Longer messages are never small talk: they carry something to answer."""

_PHRASES: dict[SmallTalkKind, tuple[str, ...]] = {
    "greeting": (
        "你好", "您好", "你们好", "大家好", "嗨", "哈喽", "哈啰", "哈罗", "在吗", "在不在", "有人吗",
        "有人在吗", "早上好", "上午好", "中午好", "下午好", "晚上好", "早安", "早", "喂",
        "hello", "hi", "hey", "hiya", "howdy", "good morning", "good afternoon", "good evening", "greetings",
        "anyone there", "is anyone there", "are you there", "yo",
    ),
    "thanks": (
        "谢谢", "多谢", "感谢", "谢了", "谢啦", "谢谢啦", "非常感谢", "万分感谢", "辛苦了",
        "thanks", "thank you", "thankyou", "thx", "ty", "many thanks", "cheers", "much appreciated", "appreciate it",
    ),
    "goodbye": (
        "再见", "拜拜", "拜", "回见", "下次见", "晚安",
        "bye", "goodbye", "good bye", "bye bye", "see you", "see ya", "good night", "take care", "have a nice day",
        "have a good day",
    ),
}
# Words that may stand around a phrase without making it a question.
_FILLERS = (
    "啊", "呀", "哈", "呢", "啦", "哦", "喔", "嗯", "嗯嗯", "亲", "亲亲", "你", "您", "了", "哈哈", "好的",
    "好", "客服", "小姐姐", "老板", "掌柜",
    "ok", "okay", "so", "very", "much", "a", "lot", "there", "all", "again", "very much", "you", "guys", "folks",
    "everyone", "team", "and", "then", "oh", "ah", "well", "great", "sir", "madam", "friend",
)

_KIND_OF = {phrase: kind for kind, phrases in _PHRASES.items() for phrase in phrases}


def _alternation(words: list[str]) -> str:
    # Longest first, so "谢谢啦" is not read as "谢谢" + a stray "啦"; words end on a word edge in Latin text.
    return "|".join(re.escape(w) + (r"\b" if w.isascii() else "") for w in sorted(words, key=len, reverse=True))


_TOKEN = re.compile(f"({_alternation(list(_KIND_OF))})|(?:{_alternation(list(_FILLERS))})")

_REPLIES: dict[tuple[SmallTalkKind, str], str] = {
    ("greeting", "zh"): "您好！请问有什么可以帮您？",
    ("greeting", "en"): "Hi! How can I help you?",
    ("thanks", "zh"): "不客气！还有其他问题随时问我。",
    ("thanks", "en"): "You're welcome! Anything else I can help with?",
    ("goodbye", "zh"): "再见，祝您生活愉快！",
    ("goodbye", "en"): "Goodbye, have a nice day!",
}
_NAMED_GREETINGS = {"zh": "您好！我是{name}，请问有什么可以帮您？", "en": "Hi! I'm {name}. How can I help you?"}
# Thanks or goodbye said last wins over a greeting: "谢谢，再见" is a goodbye.
_PRIORITY: dict[SmallTalkKind, int] = {"greeting": 0, "thanks": 1, "goodbye": 2}


def small_talk(text: str, *, assistant_name: str = "") -> SmallTalk | None:
    """The reply to a message that is only a greeting, thanks or goodbye (with punctuation, emoji or
    fillers such as 啊/呀/亲); None for anything else, e.g. "你好，怎么退货？" (a question)."""
    if len(text) > MAX_CHARS:
        return None
    folded = unicodedata.normalize("NFKC", text).casefold()
    language = "zh" if any(is_cjk(ch) for ch in folded) else "en"
    # Letters and digits only: punctuation and emoji carry no request; apostrophes join ("you're" -> "youre").
    words = " ".join("".join(ch if unicodedata.category(ch)[0] in "LN" else " " for ch in folded.replace("'", ""))
                     .split())
    kinds: list[SmallTalkKind] = []
    position = 0
    while position < len(words):
        if words[position] == " ":
            position += 1
            continue
        match = _TOKEN.match(words, position)
        if match is None:
            return None
        if match.group(1):
            kinds.append(_KIND_OF[match.group(1)])
        position = match.end()
    if not kinds:
        return None
    kind = max(kinds, key=lambda k: _PRIORITY[k])
    if kind == "greeting" and assistant_name.strip():
        reply = _NAMED_GREETINGS[language].format(name=assistant_name.strip())
    else:
        reply = _REPLIES[(kind, language)]
    return SmallTalk(kind=kind, language=language, reply=reply)
