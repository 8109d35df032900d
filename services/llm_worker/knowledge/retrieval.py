"""Retrieval for one turn: the question in its conversation (follow-ups), and the answer-or-hand-off decision."""

from __future__ import annotations

import re
from collections.abc import Sequence

from services.llm_worker.knowledge.index import KnowledgeIndex
from services.llm_worker.knowledge.models import Hit, Retrieval

MIN_CONFIDENCE = 0.256
"""Answer only when the top chunk's score per unit of the question's IDF (`confidence`) reaches this.

The score (BM25 with the chunk's length normalisation capped, `Hit.tf_score`) of a chunk containing every
query term once is about 0.4 x the query's total IDF, rising towards 1 x with repeats, so the ratio reads
as "how much of what was asked the best chunk answers", whatever the corpus size or the question's
length; a term no chunk has counts at the highest IDF, so a question about something absent scores low.
Tuned in bench/kb_bench.py on the CMRC 2018 trial set with half of the articles held out, on four
different halves: the best threshold was 0.253-0.272, with balanced accuracy 0.946-0.962 on the half it
was tuned on and 0.943-0.950 (mean) on the three others; at 0.256: 0.944-0.955. Since the query's unknown
words are re-cut into the index's words (KnowledgeIndex.query_terms), at 0.256: 0.946-0.961 (0.957 on the
reported split); the best threshold of each half (0.253-0.274) gives 0.950-0.956 on the three others.
A raw BM25 threshold reaches 0.89 there, the IDF-weighted coverage of the top chunk 0.94; adding
coverage, the gap to the runner-up, phrase matches, the best sentence's coverage or the raw score to this
ratio (logistic fit, AND/OR rules, weighted sums) did not do better on held-out halves.
"""
FOLLOW_UP_MAX_TERMS = 2
"""A question with at most this many content terms may lean on the previous turn ("那运费呢？")."""

# Openers and pronouns that make a question lean on the previous one.
_FOLLOW_UP_START = re.compile(r"^\s*(?:那么|那|还有|另外|然后|and\b|what about\b|how about\b|what of\b|also\b)",
                              re.IGNORECASE)
_PRONOUNS = re.compile(r"它|他们|她们|它们|这个|那个|这些|那些|\b(?:it|its|they|them|their|that|this|those|these)\b",
                       re.IGNORECASE)


def confidence(index: KnowledgeIndex, terms: Sequence[str], hits: Sequence[Hit]) -> float:
    """The top hit's `tf_score` over the total IDF of `terms` (0 without hits or terms); see MIN_CONFIDENCE."""
    total = sum(index.idf(term) for term in dict.fromkeys(terms))
    return hits[0].tf_score / total if hits and total > 0 else 0.0


def leans_back(question: str) -> bool:
    """The question opens with 那/那么/还有/and/what about or points back with a pronoun."""
    return bool(_FOLLOW_UP_START.search(question)) or bool(_PRONOUNS.search(question))


def is_follow_up(question: str, content_terms: int) -> bool:
    """A question that may only make sense with the previous turn: it leans back, or is short."""
    return content_terms <= FOLLOW_UP_MAX_TERMS or leans_back(question)


def retrieve(index: KnowledgeIndex, question: str, *, previous_user_turns: Sequence[str] = (),
             k: int = 5) -> Retrieval:
    """The `k` best chunks for `question`, and whether they support an answer.

    A follow-up is also searched joined with the previous user turn. A question that leans back
    ("那运费呢？", "what about it?") takes the joined result when that is answerable and its best chunk
    has one of the question's own terms (or the question has none); a question that is only short takes
    the better supported of the two. So "那运费呢？" after "无理由退货怎么办？" finds the return-shipping
    passage, and after "多久发货？" (no chunk has both) the shipping-fee one.
    """
    terms = index.query_terms(question)
    hits = index.search(terms, k)
    best = Retrieval(hits=tuple(hits), answerable=False, query=question,
                     confidence=confidence(index, terms, hits))
    previous = next((turn for turn in reversed(previous_user_turns) if turn.strip()), "")
    if previous and is_follow_up(question, len(set(terms))):
        joined_terms = index.query_terms(previous) + terms
        joined_hits = index.search(joined_terms, k)
        own = set(terms)
        if own:
            # The follow-up's own words name what it asks; the previous turn only narrows it down.
            joined_hits.sort(key=lambda hit: not own & set(hit.matched_terms))
        joined = Retrieval(hits=tuple(joined_hits), answerable=False, query=f"{previous}\n{question}",
                           confidence=confidence(index, joined_terms, joined_hits))
        keeps_topic = bool(joined_hits) and (not own or bool(own & set(joined_hits[0].matched_terms)))
        if (leans_back(question) and keeps_topic and joined.confidence >= MIN_CONFIDENCE) \
                or joined.confidence > best.confidence:
            best = joined
    return Retrieval(hits=best.hits, answerable=bool(best.hits) and best.confidence >= MIN_CONFIDENCE,
                     query=best.query, confidence=best.confidence)
