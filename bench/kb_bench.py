"""`python -m bench.kb_bench` (`make bench-kb`): knowledge retrieval and grounded answers on CMRC 2018, offline.

Every article of the CMRC 2018 trial set (bench/data/, 256 Chinese Wikipedia passages, 1,002 questions
with their answer spans) is one document (title = the article's title), parsed, chunked and indexed in
process exactly as ingestion does. Then:

- ingest: documents and chunks per second for parse + chunk + index;
- retrieval: recall@1 / recall@5 / MRR@10 of the cited document (the document of the top hit; documents
  ranked by their best chunk);
- offline answers: the share of questions whose gold span is inside kefu's answer (answered, not handed
  off, and the extract contains the span), and inside the extract whatever the decision;
- LLM mode: the share whose gold span is inside the prompt `grounded_messages` builds from the top
  `--passages` hits (and the same with adjacent chunks of one document joined, as the model reads them);
- answer or hand off: with half of the articles held out (a deterministic split by a hash of the article
  id), balanced accuracy of answering the questions of indexed articles and handing off the others, at
  the shipped threshold (`retrieval.MIN_CONFIDENCE`); also how the threshold was tuned: the best threshold
  on each of four different splits and its balanced accuracy on the other three;
- scale: retrieval latency (wall and CPU per query) and RSS with 10,000 and 100,000 synthetic chunks (runs
  of CMRC sentences) in one tenant, and with 1,000 tenants of 100 chunks each loaded from their bytes;
  each in a fresh process, so RSS is its own.

The questions go through `Knowledge`, so an HTTP path (`--http URL`: ingest through the API, answers from
/v1/chat) can be added beside `OfflineKnowledge` without touching the metrics.

Results: a markdown table on stdout and bench/results/kb-<UTC>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from bench.cmrc import DATA, PROMPT_PASSAGES, Article, Question, load_articles
from bench.kb_report import markdown
from bench.kb_scale import scale_runs
from bench.results_io import RESULTS_DIR, write_atomic
from services.llm_worker.kb.embeddings import EmbeddingsConfig, embed_blocking
from services.llm_worker.knowledge.chunking import MAX_TOKENS, chunk_document
from services.llm_worker.knowledge.extractive import extract_answer
from services.llm_worker.knowledge.fusion import fuse
from services.llm_worker.knowledge.grounding import grounded_messages, join_adjacent
from services.llm_worker.knowledge.index import KnowledgeIndex
from services.llm_worker.knowledge.models import Chunk, Hit, Retrieval
from services.llm_worker.knowledge.parsing import parse_document
from services.llm_worker.knowledge.retrieval import MIN_CONFIDENCE, confidence, retrieve
from services.llm_worker.plugin_api import ChatMessage

SYSTEM_PROMPT = "你是一个知识库问答助手。"
SPLIT_SALTS = ("", "b", "c", "d")


def kept(article_id: str, salt: str) -> bool:
    """The deterministic half of the articles that is indexed in the held-out runs."""
    return hashlib.sha256((salt + article_id).encode()).digest()[0] % 2 == 0


def squash(text: str) -> str:
    return "".join(text.split())


@dataclass(frozen=True, slots=True)
class Answer:
    """What kefu did with one question, as the metrics need it."""

    documents: tuple[str, ...]
    """Documents ranked by their best chunk (the first is the cited one), up to 10."""
    answered: bool
    """Not handed off."""
    extract: str
    """The offline answer's text ("" when handed off or nothing was found)."""
    extract_any: str
    """The extract whatever the decision."""
    prompt: str
    """The system message of the LLM prompt (passages included)."""
    passages: tuple[Hit, ...]


@dataclass(frozen=True, slots=True)
class IngestFigures:
    documents: int
    chunks: int
    parse_chunk_s: float
    index_s: float


class Knowledge(Protocol):
    """Where the questions go: in process here; an HTTP implementation would use the API."""

    def ingest(self, articles: Sequence[Article]) -> IngestFigures: ...

    def ask(self, question: str) -> Answer: ...


class OfflineKnowledge:
    """The knowledge core in this process: parse, chunk, index; retrieve, extract, build the prompt."""

    def __init__(self, passages: int = PROMPT_PASSAGES, max_tokens: int = MAX_TOKENS,
                 embeddings: EmbeddingsConfig | None = None) -> None:
        """`embeddings`: hybrid retrieval as with KEFU_EMBEDDINGS_MODEL (chunks and questions embedded there)."""
        self.passages = passages
        self.max_tokens = max_tokens
        self.embeddings = embeddings
        self.index = KnowledgeIndex.build([])

    def ingest(self, articles: Sequence[Article]) -> IngestFigures:
        started = time.perf_counter()
        chunks: list[Chunk] = []
        for article in articles:
            doc = parse_document(article.context.encode(), f"{article.id}.txt", "text/plain")
            chunks += chunk_document(doc, document_id=article.id, version=1, title=article.title,
                                     max_tokens=self.max_tokens)
        parsed = time.perf_counter()
        if self.embeddings is None:
            self.index = KnowledgeIndex.build(chunks)
        else:
            vectors = embed_blocking(self.embeddings, [chunk.indexed_text for chunk in chunks])
            self.index = KnowledgeIndex.build(chunks, vectors=vectors, embeddings_model=self.embeddings.identity)
        return IngestFigures(len(articles), len(chunks), parsed - started, time.perf_counter() - parsed)

    def ask(self, question: str) -> Answer:
        found = retrieve(self.index, question, k=self.passages)
        candidates = self.index.search(question, 40)
        if self.embeddings is not None:
            # As a turn with embeddings does: the (follow-up resolved) query embedded, fused with BM25.
            vector = embed_blocking(self.embeddings, [found.query])[0]
            dense = self.index.dense_search(vector, 40)
            found = fuse(found, dense[:self.passages], self.passages)
            candidates = list(fuse(Retrieval(tuple(candidates), False, question), dense, 40).hits)
        extract = extract_answer(question, found.hits)
        ranked = list(dict.fromkeys(hit.chunk.document_id for hit in candidates))[:10]
        # As the worker sends it: neighbouring chunks of a document joined into one passage.
        prompt = grounded_messages(SYSTEM_PROMPT, join_adjacent(found.hits), [ChatMessage("user", question)])[0].content
        text = extract.text if extract else ""
        return Answer(documents=tuple(ranked), answered=found.answerable,
                      extract=text if found.answerable else "", extract_any=text, prompt=prompt, passages=found.hits)


def joined_passages(hits: Sequence[Hit]) -> list[str]:
    """The passages' texts with consecutive chunks of one document joined (their overlap once)."""
    by_document: dict[str, list[Chunk]] = {}
    for hit in hits:
        by_document.setdefault(hit.chunk.document_id, []).append(hit.chunk)
    texts = []
    for chunks in by_document.values():
        chunks.sort(key=lambda c: int(c.chunk_id.rsplit("-", 1)[1]))
        current, last = squash(chunks[0].text), int(chunks[0].chunk_id.rsplit("-", 1)[1])
        for chunk in chunks[1:]:
            number, text = int(chunk.chunk_id.rsplit("-", 1)[1]), squash(chunk.text)
            if number == last + 1:
                overlap = next((size for size in range(min(len(current), len(text)), 0, -1)
                                if current.endswith(text[:size])), 0)
                current += text[overlap:]
            else:
                texts.append(current)
                current = text
            last = number
        texts.append(current)
    return texts


def contains_span(question: Question, *texts: str) -> bool:
    return any(squash(answer) in squash(text) for answer in question.answers for text in texts)


def quality(knowledge: Knowledge, articles: Sequence[Article]) -> dict[str, float]:
    """Retrieval and answer figures with every article indexed."""
    figures = {"recall_at_1": 0.0, "recall_at_5": 0.0, "mrr_at_10": 0.0, "span_in_answer": 0.0,
               "span_in_extract": 0.0, "answered": 0.0, "span_in_prompt": 0.0, "span_in_prompt_joined": 0.0}
    count = 0
    for article in articles:
        for question in article.questions:
            answer = knowledge.ask(question.text)
            count += 1
            rank = answer.documents.index(article.id) + 1 if article.id in answer.documents else 0
            figures["recall_at_1"] += rank == 1
            figures["recall_at_5"] += 0 < rank <= 5
            figures["mrr_at_10"] += 1 / rank if 0 < rank <= 10 else 0
            figures["answered"] += answer.answered
            figures["span_in_answer"] += answer.answered and contains_span(question, answer.extract)
            figures["span_in_extract"] += contains_span(question, answer.extract_any)
            figures["span_in_prompt"] += contains_span(question, answer.prompt)
            figures["span_in_prompt_joined"] += contains_span(question, *joined_passages(answer.passages))
    return {name: round(value / count, 4) for name, value in figures.items()} | {"questions": count}


def balanced_accuracy(predicted: Sequence[bool], truth: Sequence[bool]) -> float:
    positives = [p for p, t in zip(predicted, truth, strict=True) if t]
    negatives = [not p for p, t in zip(predicted, truth, strict=True) if not t]
    return (sum(positives) / len(positives) + sum(negatives) / len(negatives)) / 2


@dataclass
class Split:
    salt: str
    truth: list[bool] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    right_document: list[bool] = field(default_factory=list)
    raw_score: list[float] = field(default_factory=list)
    """The top BM25 score (the reference a raw threshold uses)."""


def held_out(articles: Sequence[Article], salts: Sequence[str] = SPLIT_SALTS) -> dict[str, Any]:
    """Answer-or-hand-off with half of the articles indexed: at MIN_CONFIDENCE, and the tuning sweep."""
    splits = []
    for salt in salts:
        knowledge = OfflineKnowledge()
        knowledge.ingest([a for a in articles if kept(a.id, salt)])
        split = Split(salt)
        for article in articles:
            for question in article.questions:
                terms = knowledge.index.query_terms(question.text)
                hits = knowledge.index.search(terms, PROMPT_PASSAGES)
                split.truth.append(kept(article.id, salt))
                split.confidence.append(confidence(knowledge.index, terms, hits))
                split.right_document.append(bool(hits) and hits[0].chunk.document_id == article.id)
                split.raw_score.append(hits[0].score if hits else 0.0)
        splits.append(split)

    def accuracy(split: Split, threshold: float, strict: bool = False) -> float:
        """Balanced accuracy; `strict`: answering an answerable question from the wrong document is wrong."""
        answered = [c >= threshold for c in split.confidence]
        right = [a and (r or not strict) for a, r in zip(answered, split.right_document, strict=True)]
        sensitivity = sum(r for r, t in zip(right, split.truth, strict=True) if t) / sum(split.truth)
        specificity = sum(not a for a, t in zip(answered, split.truth, strict=True) if not t) / (
            len(split.truth) - sum(split.truth))
        return (sensitivity + specificity) / 2

    candidates = sorted({round(c, 4) for split in splits for c in split.confidence if 0.1 <= c <= 0.5})
    tuning = []
    for split in splits:
        best = max(candidates, key=lambda t: accuracy(split, t))
        others = [accuracy(other, best) for other in splits if other is not split]
        tuning.append({"split": split.salt or "-", "best_threshold": best,
                       "tuned_on_itself": round(accuracy(split, best), 4),
                       "on_the_other_splits": round(statistics.mean(others), 4)})
    shipped = [accuracy(split, MIN_CONFIDENCE) for split in splits]
    answered_right = [sum(c >= MIN_CONFIDENCE and r for c, r, t in zip(s.confidence, s.right_document, s.truth,
                                                                        strict=True) if t) / sum(s.truth)
                      for s in splits]
    return {
        "threshold": MIN_CONFIDENCE,
        "balanced_accuracy": round(shipped[0], 4),
        "balanced_accuracy_all_splits": [round(a, 4) for a in shipped],
        "balanced_accuracy_strict": round(accuracy(splits[0], MIN_CONFIDENCE, strict=True), 4),
        "answered_with_right_document": round(answered_right[0], 4),
        "raw_bm25_best": round(max(balanced_accuracy([s >= t for s in splits[0].raw_score], splits[0].truth)
                                   for t in sorted(set(splits[0].raw_score))), 4),
        "tuning": tuning,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.kb_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--passages", type=int, default=PROMPT_PASSAGES, help="passages in the LLM prompt")
    parser.add_argument("--chunk-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--scales", default="10000,100000",
                        help="chunk counts of the one-tenant runs ('' for none)")
    parser.add_argument("--tenants", type=int, default=1000, help="tenants of the many-tenants run (0 for none)")
    parser.add_argument("--tenant-chunks", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="times each question is asked in the scale runs")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--embeddings-url", default="",
                        help="hybrid retrieval: the OpenAI-compatible base URL to embed with (e.g. python -m "
                             "devtools.fake_upstream's), key from KEFU_OPENAI_API_KEY")
    parser.add_argument("--embeddings-model", default="", help="the embeddings model (with --embeddings-url)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    articles = load_articles(args.data)
    embeddings = EmbeddingsConfig(args.embeddings_url.rstrip("/"), args.embeddings_model,
                                  os.environ.get("KEFU_OPENAI_API_KEY", "")) if args.embeddings_url else None
    knowledge = OfflineKnowledge(passages=args.passages, max_tokens=args.chunk_tokens, embeddings=embeddings)
    figures = knowledge.ingest(articles)
    ingest_s = figures.parse_chunk_s + figures.index_s
    report: dict[str, Any] = {
        "timestamp": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": " ".join(["python -m bench.kb_bench", *(argv if argv is not None else sys.argv[1:])]),
        "chunk_tokens": args.chunk_tokens,
        "passages": args.passages,
        "embeddings_model": embeddings.identity if embeddings else "",
        "ingest": asdict(figures) | {"documents_per_s": round(figures.documents / ingest_s, 1),
                                     "chunks_per_s": round(figures.chunks / ingest_s, 1)},
    }
    print(f"ingested {figures.documents} documents, {figures.chunks} chunks in {ingest_s:.2f} s",
          file=sys.stderr)
    report["quality"] = quality(knowledge, articles)
    print(f"quality: {report['quality']}", file=sys.stderr)
    report["held_out"] = held_out(articles)
    print(f"held out: balanced accuracy {report['held_out']['balanced_accuracy']}", file=sys.stderr)
    report["rounds"] = args.rounds
    runs = [(1, int(c)) for c in args.scales.split(",") if c.strip()]
    runs += [(args.tenants, args.tenant_chunks)] if args.tenants else []
    report["scale"] = scale_runs(runs, args.rounds)
    report["duration_s"] = round(time.perf_counter() - started, 1)
    text = markdown(report)
    print(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"kb-{report['timestamp']}.json"
    write_atomic(path, json.dumps(report | {"markdown": text}, ensure_ascii=False, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
