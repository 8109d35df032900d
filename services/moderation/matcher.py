"""Aho-Corasick matching of the lexicon over normalised text, hits mapped back to the original."""

from __future__ import annotations

from dataclasses import dataclass

import ahocorasick

from services.moderation.lexicon import Action, Lexicon
from services.moderation.normalize import Normalized, normalize, normalize_word

MASK_CHAR = "*"


@dataclass(frozen=True, slots=True)
class Hit:
    category: str
    word: str
    action: Action
    start: int
    """Index in the original text of the first matched character."""
    end: int
    """Index in the original text just past the last matched character."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    verdict: Action
    masked_text: str
    hits: tuple[Hit, ...]


class Matcher:
    """Immutable once built; a lexicon reload builds a new one."""

    def __init__(self, lexicon: Lexicon) -> None:
        self.lexicon = lexicon
        self._words = ahocorasick.Automaton()
        entries: dict[str, list[tuple[str, Action]]] = {}
        for category in lexicon.categories:
            for word in category.words:
                if normalized := normalize_word(word):
                    entries.setdefault(normalized, []).append((category.name, category.action))
        for word, owners in entries.items():
            self._words.add_word(word, (word, tuple(owners)))
        self._whitelist = ahocorasick.Automaton()
        whitelisted = {w for w in map(normalize_word, lexicon.whitelist) if w}
        for phrase in whitelisted:
            self._whitelist.add_word(phrase, len(phrase))
        self._has_words = bool(entries)
        self._has_whitelist = bool(whitelisted)
        if self._has_words:
            self._words.make_automaton()
        if self._has_whitelist:
            self._whitelist.make_automaton()
        # Every proper or full prefix of a word or whitelisted phrase: a stream tail that is
        # one of these may still become a hit (or stop being one), so it is held back.
        self._prefixes = frozenset(
            term[:n] for term in (*entries, *whitelisted) for n in range(1, len(term) + 1))
        self.longest_term = max((len(t) for t in (*entries, *whitelisted)), default=0)

    def hits(self, norm: Normalized) -> list[Hit]:
        if not self._has_words:
            return []
        allowed: list[tuple[int, int]] = []
        if self._has_whitelist:
            allowed = [(end - length + 1, end) for end, length in self._whitelist.iter(norm.text)]
        found: list[Hit] = []
        for end, (word, owners) in self._words.iter(norm.text):
            start = end - len(word) + 1
            if any(a <= start and end <= b for a, b in allowed):
                continue
            for category, action in owners:
                found.append(Hit(category, word, action, norm.origin[start], norm.origin[end] + 1))
        found.sort(key=lambda h: (h.start, h.end))
        return found

    def check(self, text: str) -> CheckResult:
        hits = self.hits(normalize(text))
        return CheckResult(verdict_of(hits), apply_masks(text, hits), tuple(hits))

    def open_tail_start(self, norm: Normalized) -> int:
        """Normalised index where the longest suffix that could still grow into a term begins."""
        text = norm.text
        for start in range(max(0, len(text) - self.longest_term), len(text)):
            if text[start:] in self._prefixes:
                return start
        return len(text)


def verdict_of(hits: list[Hit]) -> Action:
    return max((h.action for h in hits), default=Action.ALLOW)


def apply_masks(text: str, hits: list[Hit]) -> str:
    """Replace every character of each MASK hit's original span, noise included, by `*`."""
    masked = [False] * len(text)
    for hit in hits:
        if hit.action is Action.MASK:
            masked[hit.start:hit.end] = [True] * (hit.end - hit.start)
    if not any(masked):
        return text
    return "".join(MASK_CHAR if m else c for c, m in zip(text, masked))
