"""Citations of an answer: which of the tenant's passages it quotes, as the edge and the cache carry them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.llm_worker.plugin_api import Finish, Hit

QUOTE_CHARS = 200
"""A citation's quote is at most this long (the passage's start when the answer names no words)."""


@dataclass(frozen=True, slots=True)
class Citation:
    document_id: str
    title: str
    url: str
    chunk_id: str
    quote: str

    def to_json(self) -> dict[str, str]:
        return {"document_id": self.document_id, "title": self.title, "url": self.url,
                "chunk_id": self.chunk_id, "quote": self.quote}

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> Citation:
        return cls(*(str(raw.get(name, "")) for name in ("document_id", "title", "url", "chunk_id", "quote")))


@dataclass(frozen=True, slots=True)
class CitedFinish(Finish):
    """The worker's own Finish of a grounded answer: `cited` already turned into citations."""

    citations: tuple[Citation, ...] = ()


def citations_of(hits: Sequence[Hit], cited: Sequence[int], quotes: Sequence[str] = ()) -> tuple[Citation, ...]:
    """The cited hits (indexes into `hits`, out-of-range ones ignored, first use wins) as citations."""
    found: list[Citation] = []
    seen: set[int] = set()
    for position, index in enumerate(cited):
        if not 0 <= index < len(hits) or index in seen:
            continue
        seen.add(index)
        chunk = hits[index].chunk
        quote = quotes[position] if position < len(quotes) and quotes[position] else _start(chunk.answer or chunk.text)
        found.append(Citation(chunk.document_id, chunk.title, chunk.url, chunk.chunk_id, quote[:QUOTE_CHARS]))
    return tuple(found)


def _start(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS - 1] + "…"
