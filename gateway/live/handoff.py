"""When a visitor's words ask for a human (人工/转人工/human/agent: KEFU_HANDOFF_KEYWORDS)."""

from __future__ import annotations

import re
import unicodedata

MAX_REQUEST_CHARS = 60
"""Only a short message is a request for a human; a long one that mentions "agent" is a question."""
NOT_A_REQUEST = ("人工智能",)
"""Phrases that contain a keyword without asking for anyone ("artificial intelligence")."""


class HandoffRules:
    def __init__(self, keywords: tuple[str, ...]) -> None:
        words = [unicodedata.normalize("NFKC", k).casefold() for k in keywords if k.strip()]
        # Latin keywords match whole words only ("agents" and "agency" do not ask for one).
        latin = [re.escape(w) for w in words if w.isascii()]
        self._latin = re.compile(r"\b(?:" + "|".join(latin) + r")\b") if latin else None
        self._other = tuple(w for w in words if not w.isascii())

    def asks_for_human(self, text: str) -> bool:
        folded = unicodedata.normalize("NFKC", text).casefold().strip()
        if not folded or len(folded) > MAX_REQUEST_CHARS:
            return False
        for phrase in NOT_A_REQUEST:
            folded = folded.replace(phrase, " ")
        if self._latin is not None and self._latin.search(folded):
            return True
        return any(word in folded for word in self._other)
