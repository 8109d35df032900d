"""An answer without a model: the FAQ answer, or the sentences of the best passage that answer the question."""

from __future__ import annotations

import math
from collections.abc import Sequence

from services.llm_worker.knowledge.analysis import Analyzer, default_analyzer, split_sentences
from services.llm_worker.knowledge.models import Extract, Hit

PASSAGES = 3
"""How many of the first hits the answer sentence is looked for in."""
RANK_PENALTY = 0.5
"""Subtracted from a sentence's score per rank of its hit below the first."""
MAX_CHARS = 300
"""About how long an extract may be (the best sentence alone may be longer)."""


def _window(sentences: list[str], best: int, max_chars: int) -> tuple[int, int]:
    """The best sentence, then the one after it, then the one before, while they fit in `max_chars`.

    The sentence after the best-matching one comes first: a question usually restates the sentence
    that introduces a fact, and the fact itself often follows it. On the CMRC trial set the gold
    answer is inside the extract for 0.65 of the answerable questions with the best sentence alone.
    """
    start, end = best, best + 1
    size = len(sentences[best])
    grew = True
    while grew:
        grew = False
        for candidate in (end, start - 1):
            if 0 <= candidate < len(sentences) and size + len(sentences[candidate]) <= max_chars:
                size += len(sentences[candidate])
                start, end = min(start, candidate), max(end, candidate + 1)
                grew = True
                break
    return start, end


def _join(sentences: Sequence[str]) -> str:
    text = ""
    for sentence in sentences:
        if text and sentence and text[-1].isascii() and sentence[0].isascii():
            text += " "
        text += sentence
    return text


def extract_answer(question: str, hits: Sequence[Hit], *, analyzer: Analyzer | None = None,
                   max_chars: int = MAX_CHARS) -> Extract | None:
    """The answer to `question` taken from `hits` (best first), citing the hit it came from; None without hits.

    An FAQ hit answers with its answer. A passage answers with its sentence that shares the most of the
    question's terms (weighted by how rare each term is among the passage's sentences), with its
    neighbours up to `max_chars`, in document order.
    """
    if not hits:
        return None
    top = hits[0].chunk
    if top.kind == "faq":
        return Extract(text=top.answer, cited=(0,), quotes=(top.answer,))
    analyzer = analyzer or default_analyzer()
    wanted = set(analyzer.terms(question))
    # Sentences of the passages among the first `PASSAGES` hits (FAQ items have none).
    candidates = [(number, [s for line in hit.chunk.text.splitlines() for s in split_sentences(line)])
                  for number, hit in enumerate(hits[:PASSAGES]) if hit.chunk.kind == "text"]
    found = [(number, position, set(analyzer.terms(sentence)) & wanted)
             for number, sentences in candidates for position, sentence in enumerate(sentences)]
    if not found:
        return None
    rarity = {t: math.log(1 + len(found) / sum(t in terms for _, _, terms in found))
              for t in wanted if any(t in terms for _, _, terms in found)}
    number, best, _ = max(found, key=lambda f: (sum(rarity[t] for t in f[2]) - RANK_PENALTY * f[0], -f[0], -f[1]))
    sentences = dict(candidates)[number]
    start, end = _window(sentences, best, max_chars)
    text = _join(sentences[start:end])
    return Extract(text=text, cited=(number,), quotes=(text,))
