"""A route's fixed FAQ: its entries per language, and the matcher that finds the entry a question asks.

Questions and phrasings become features (characters and their pairs in scripts written without spaces,
stemmed words and their letter pairs elsewhere, traditional Chinese folded to simplified), compared by TF-IDF
cosine similarity. plugins/knowledge_base.py answers from it; this module does no I/O.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import opencc

LANGUAGES = ("zh", "en")

# Han, kana and hangul: scripts written without spaces, matched by characters instead of words.
_CJK_CLASS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\U00020000-\U0003134f"
_CJK = re.compile(f"[{_CJK_CLASS}]")
_RUNS = re.compile(f"[{_CJK_CLASS}]+|[^\\s{_CJK_CLASS}]+")
_ZH_STOP = re.compile("[的了吗呢吧啊呀嘛哦哈我你您他她它们是在和与么什怎请问这那个就都也还要想能会可以]+")
_EN_STOP = frozenset(
    "a an the is are am was were be been do does did i me my mine you your we our us it its this that these "
    "those to of in on at for with from by and or but if so can could will would should shall may might must "
    "how what when where which why who whom there here please hi hello hey thanks thank ok any some".split()
)


@functools.lru_cache(maxsize=1)
def _t2s() -> opencc.OpenCC:
    # Built on first use, not at import: the worker and its plugins do no such work at import time.
    return opencc.OpenCC("t2s")


def normalize(text: str) -> str:
    """NFKC, traditional folded to simplified, case folded, every non letter or digit a space."""
    folded = _t2s().convert(unicodedata.normalize("NFKC", text)).casefold()
    kept = "".join(ch if unicodedata.category(ch)[0] in "LN" else " " for ch in folded)
    return " ".join(kept.split())


def _stem(word: str) -> str:
    """A crude English suffix strip, enough for "returns" ~ "return" and "shipped" ~ "shipping" ~ "ship"."""
    for suffix, keep in (("ies", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            stem = word[: -len(suffix)] + keep
            if suffix in ("ing", "ed") and stem[-1] == stem[-2] and stem[-1] not in "lsz":
                stem = stem[:-1]  # shipp -> ship
            return stem
    return word


def features(text: str) -> Counter[str]:
    """Character unigrams and bigrams of CJK runs; stemmed words and their character bigrams elsewhere.

    Function words carry no topic; with only a few dozen entries IDF alone cannot silence them, so
    they are dropped (CJK ones split a run, so "退款什么时候到" gives 退款 and 时候到).
    """
    found: Counter[str] = Counter()
    for run in _RUNS.findall(normalize(text)):
        if _CJK.match(run):
            for part in _ZH_STOP.split(run):
                found.update("c" + ch for ch in part)
                found.update("b" + part[i : i + 2] for i in range(len(part) - 1))
        elif run not in _EN_STOP:
            word = _stem(run)
            found["w" + word] += 1
            padded = f"<{word}>"  # bigrams at word edges, so "ship" still resembles "shipping"
            found.update("g" + padded[i : i + 2] for i in range(len(padded) - 1))
    return found


def detect_language(text: str, default: str = "zh") -> str:
    """ "zh" when CJK characters carry the text, else "en"; `default` when it has no letters at all.

    A CJK character counts double: the same content needs far fewer of them than Latin letters, so
    "iPhone 怎么退货" reads as Chinese and "How do I brew 普洱?" as English.
    """
    cjk = len(_CJK.findall(text))
    latin = sum(1 for ch in text if ch.isalpha()) - cjk
    if not cjk and not latin:
        return default
    return "zh" if cjk * 2 >= latin else "en"


@dataclass(frozen=True, slots=True)
class Match:
    """The FAQ entry closest to a question."""

    entry_id: str
    score: float
    """The confidence: cosine similarity in [0, 1] with the closest phrasing of the entry."""
    question: str
    """That phrasing."""


class FaqMatcher:
    """TF-IDF cosine similarity between a question and every phrasing of every FAQ entry.

    IDF is counted over entries rather than phrasings, so words that one entry repeats in all its
    phrasings stay distinctive. A feature of the question that no entry has still lengthens the
    question's vector, so off-topic questions score low instead of matching on one shared word.
    """

    def __init__(self, phrasings: Iterable[tuple[str, str]]) -> None:
        """`phrasings`: (entry id, question) pairs; an entry's first phrasing wins ties."""
        docs = [(entry_id, question, features(question)) for entry_id, question in phrasings]
        entries: dict[str, set[str]] = defaultdict(set)
        for entry_id, _, feats in docs:
            entries[entry_id].update(feats)
        df = Counter(feat for feats in entries.values() for feat in feats)
        self._count = len(entries)
        self._idf = {feat: math.log((1 + self._count) / (1 + n)) + 1e-3 for feat, n in df.items()}
        self._docs = [(entry_id, question) for entry_id, question, _ in docs]
        self._postings: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for index, (_, _, feats) in enumerate(docs):
            for feat, weight in self._vector(feats).items():
                self._postings[feat].append((index, weight))

    def __len__(self) -> int:
        return self._count

    def best(self, text: str) -> Match | None:
        """The closest entry, or None when nothing shares a feature with `text`."""
        query = self._vector(features(text))
        scores: dict[int, float] = defaultdict(float)
        for feat, weight in query.items():
            for index, doc_weight in self._postings.get(feat, ()):
                scores[index] += weight * doc_weight
        if not scores:
            return None
        index = max(scores, key=lambda i: (scores[i], -i))
        entry_id, question = self._docs[index]
        return Match(entry_id=entry_id, score=min(1.0, scores[index]), question=question)

    def ranked(self, text: str, limit: int = 2) -> list[Match]:
        """The `limit` closest entries, best first, each with its closest phrasing (one per entry)."""
        query = self._vector(features(text))
        scores: dict[int, float] = defaultdict(float)
        for feat, weight in query.items():
            for index, doc_weight in self._postings.get(feat, ()):
                scores[index] += weight * doc_weight
        best_per_entry: dict[str, int] = {}
        for index in sorted(scores, key=lambda i: (-scores[i], i)):
            best_per_entry.setdefault(self._docs[index][0], index)
            if len(best_per_entry) == limit:
                break
        return [Match(entry_id=self._docs[i][0], score=min(1.0, scores[i]), question=self._docs[i][1])
                for i in best_per_entry.values()]

    def _vector(self, feats: Counter[str]) -> dict[str, float]:
        unknown_idf = math.log(1 + self._count)
        weighted = {f: (1 + math.log(n)) * self._idf.get(f, unknown_idf) for f, n in feats.items()}
        norm = math.sqrt(sum(w * w for w in weighted.values())) or 1.0
        return {f: w / norm for f, w in weighted.items()}


@dataclass(frozen=True, slots=True)
class FaqEntry:
    id: str
    questions: Mapping[str, tuple[str, ...]]
    """Phrasings per language ("zh", "en")."""
    answer: Mapping[str, str]
    related: tuple[str, ...]
    """Ids of entries a visitor asking this one is likely to ask next."""
    tags: tuple[str, ...] = ()
    """Free-form topics ("shipping", "refunds") for the tenant's own grouping; matching ignores them."""
    handoff: bool = False
    """The answer itself hands over to a human (e.g. "transfer me to an agent"): finish with "handoff"."""


@dataclass(frozen=True, slots=True)
class Faq:
    entries: Mapping[str, FaqEntry]
    fallback: Mapping[str, str]
    """The reply, per language, when nothing matches: a hand-over to a human agent."""

    @classmethod
    def from_json(cls, data: object) -> Faq:
        """Validate the FAQ document; ValueError names the entry and what is wrong."""
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list) or not data["entries"]:
            raise ValueError('expected an object with a non-empty "entries" list')
        fallback = _per_language(data.get("fallback"), "fallback")
        entries: dict[str, FaqEntry] = {}
        for index, raw in enumerate(data["entries"]):
            entry = _entry(raw, index)
            if entry.id in entries:
                raise ValueError(f"entry {entry.id!r} appears twice")
            entries[entry.id] = entry
        for entry in entries.values():
            missing = [r for r in entry.related if r not in entries]
            if missing:
                raise ValueError(f"entry {entry.id!r}: related ids {missing} do not exist")
        return cls(entries=entries, fallback=fallback)

    def matcher(self) -> FaqMatcher:
        return FaqMatcher((e.id, q) for e in self.entries.values() for lang in LANGUAGES for q in e.questions[lang])

    def related_questions(self, entry_id: str, language: str) -> list[str]:
        """The first phrasing, in `language`, of each entry related to `entry_id`, in the FAQ's order.

        An id this FAQ does not have gives [] (it may come from before a reload replaced the file).
        """
        if language not in LANGUAGES:
            raise ValueError(f"language must be one of {list(LANGUAGES)}, got {language!r}")
        entry = self.entries.get(entry_id)
        if entry is None:
            return []
        return [self.entries[related].questions[language][0] for related in entry.related]


def _per_language(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(value.get(lang), str) and value[lang] for lang in LANGUAGES):
        raise ValueError(f"{where}: expected a non-empty text for each of {list(LANGUAGES)}")
    return {lang: value[lang] for lang in LANGUAGES}


def _entry(raw: object, index: int) -> FaqEntry:
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
        raise ValueError(f"entry #{index}: expected an object with a non-empty string id")
    where = f"entry {raw['id']!r}"
    questions = raw.get("questions")
    if not isinstance(questions, dict) or not all(
        isinstance(questions.get(lang), list)
        and questions[lang]
        and all(isinstance(q, str) and q for q in questions[lang])
        for lang in LANGUAGES
    ):
        raise ValueError(f"{where}: questions must list non-empty strings for each of {list(LANGUAGES)}")
    related = raw.get("related", [])
    if not isinstance(related, list) or not all(isinstance(r, str) for r in related):
        raise ValueError(f"{where}: related must be a list of entry ids")
    tags = raw.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise ValueError(f"{where}: tags must be a list of non-empty strings")
    handoff = raw.get("handoff", False)
    if not isinstance(handoff, bool):
        raise ValueError(f"{where}: handoff must be true or false")
    return FaqEntry(
        id=raw["id"],
        questions={lang: tuple(questions[lang]) for lang in LANGUAGES},
        answer=_per_language(raw.get("answer"), f"{where} answer"),
        related=tuple(related),
        tags=tuple(tags),
        handoff=handoff,
    )
