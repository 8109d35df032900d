"""The knowledge core's values: parsed documents, chunks, hits, retrievals, extracts and small talk."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

ChunkKind = Literal["text", "faq"]
SmallTalkKind = Literal["greeting", "thanks", "goodbye"]


class DocumentFormat(StrEnum):
    MARKDOWN = "markdown"
    TEXT = "text"
    HTML = "html"
    PDF = "pdf"
    DOCX = "docx"
    FAQ_JSON = "faq_json"
    FAQ_CSV = "faq_csv"


@dataclass(frozen=True, slots=True)
class Section:
    """A run of paragraphs under one heading path (outermost heading first; () before any heading)."""

    heading: tuple[str, ...]
    paragraphs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FaqItem:
    question: str
    answer: str
    alternates: tuple[str, ...] = ()
    """Other phrasings of `question`."""
    handoff: bool = False
    """The answer itself hands the visitor over to a human (e.g. "can I talk to a person?")."""


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    """A document's text, structured: sections of paragraphs, or FAQ items (an FAQ list has no sections)."""

    format: DocumentFormat
    sections: tuple[Section, ...] = ()
    faqs: tuple[FaqItem, ...] = ()
    title: str = ""
    """A title the document gives itself (the first heading, the PDF's metadata), "" when none."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """One retrievable piece of a document: a passage of a section, or one FAQ item."""

    chunk_id: str
    """f"{document_id}-{version}-{n}", n counting from 0 in document order."""
    document_id: str
    version: int
    title: str
    url: str
    heading: str
    """The section's heading path joined with " > " ("" for none; the question for an FAQ item)."""
    text: str
    """The passage (an FAQ item: its question and alternates, one a line)."""
    kind: ChunkKind = "text"
    answer: str = ""
    """An FAQ item's answer ("" for text)."""
    handoff: bool = False
    """An FAQ item whose answer hands the visitor over to a human."""

    @property
    def indexed_text(self) -> str:
        """What retrieval matches against: an FAQ item's phrasings; a passage with its title and headings."""
        if self.kind == "faq":
            return self.text
        return "\n".join(part for part in (self.title, self.heading, self.text) if part)


@dataclass(frozen=True, slots=True)
class Hit:
    """A chunk retrieved for a query, with what the answer-or-hand-off decision reads."""

    chunk: Chunk
    score: float
    """The BM25 score."""
    coverage: float = 0.0
    """The IDF-weighted share of the query's terms that this chunk contains, in [0, 1]."""
    matched_terms: tuple[str, ...] = ()
    """The query's terms this chunk contains, in the query's order."""
    tf_score: float = 0.0
    """The BM25 score with the chunk's length normalisation capped (index.LENGTH_NORM_CAP): what
    answerability reads, so a long passage among short FAQ items is not doubted for its length."""
    similarity: float = 0.0
    """Cosine similarity of the chunk's embedding to the query's (dense retrieval; 0 without)."""


@dataclass(frozen=True, slots=True)
class Retrieval:
    hits: tuple[Hit, ...]
    """Best first."""
    answerable: bool
    """Whether the hits support an answer; False means: do not guess, hand the visitor over."""
    query: str
    """The text that was searched (a follow-up question joined with the turn it follows)."""
    confidence: float = 0.0
    """The answerability score the decision thresholds, in [0, 1]."""


@dataclass(frozen=True, slots=True)
class Extract:
    """An answer taken from the hits themselves (no model)."""

    text: str
    cited: tuple[int, ...]
    """Indexes into the hits the answer came from."""
    quotes: tuple[str, ...]
    """Per cited hit, the words of that hit the answer uses."""


@dataclass(frozen=True, slots=True)
class SmallTalk:
    kind: SmallTalkKind
    language: str
    """"zh" or "en"."""
    reply: str
