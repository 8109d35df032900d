"""Building a tenant's index: parse, chunk and index in a worker process, off the answering event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.common.errors import KefuError
from services.llm_worker.kb.embeddings import EmbeddingsConfig, embed_blocking
from services.llm_worker.knowledge.chunking import chunk_document
from services.llm_worker.knowledge.index import IndexFormatError, KnowledgeIndex
from services.llm_worker.knowledge.models import Chunk
from services.llm_worker.knowledge.parsing import DocumentParseError, UnsupportedFormat, parse_document

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SourceDocument:
    """A document version to parse (picklable: it crosses to the build process)."""

    document_id: str
    version: int
    title: str
    url: str
    filename: str
    format: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    version: int
    chunks: int = 0
    title: str = ""
    error: str = ""
    """One line; "" when the document parsed."""


@dataclass(frozen=True, slots=True)
class BuildResult:
    index: bytes | None
    """KnowledgeIndex.to_bytes(), None when no chunk is left."""
    documents: dict[str, int]
    """Document id -> version inside the index."""
    outcomes: dict[str, Outcome]
    """Per parsed document."""
    chunks: int


class UnreadableIndex(KefuError):
    """The previous index is not one this version reads (an older format, damaged): rebuild from the files."""


FORMAT_EXTENSIONS = {"markdown": ".md", "text": ".txt", "html": ".html", "pdf": ".pdf", "docx": ".docx",
                     "faq_json": ".json", "faq_csv": ".csv"}


def parse_source(source: SourceDocument) -> tuple[list[Chunk], Outcome]:
    """The chunks of one document version, or none and a one-line error naming why it does not parse."""
    # The stored format decides (the name may lack an extension, e.g. JSON `text`).
    name = "document" + FORMAT_EXTENSIONS.get(source.format, "")
    try:
        parsed = parse_document(source.data, name)
    except (DocumentParseError, UnsupportedFormat) as error:
        return [], Outcome(source.version, error=error.message)
    title = source.title or parsed.title or source.filename or source.document_id
    chunks = chunk_document(parsed, document_id=source.document_id, version=source.version, title=title,
                            url=source.url)
    return chunks, Outcome(source.version, chunks=len(chunks), title=title)


def build_index(previous: bytes | None, keep: Mapping[str, int], sources: Sequence[SourceDocument],
                embeddings: EmbeddingsConfig | None = None) -> BuildResult:
    """The index of `keep`'s chunks taken from `previous` plus the chunks of `sources` (which win).

    `keep`: document id -> the version whose chunks `previous` holds and which stays. `embeddings`: also
    store every chunk's vector from that model (kept chunks reuse `previous`'s when it used the same
    model); EmbeddingsUnavailable when the upstream fails, and then no index at all (retried by the job).
    """
    chunks: list[Chunk] = []
    documents: dict[str, int] = {}
    outcomes: dict[str, Outcome] = {}
    for source in sources:
        try:
            parsed, outcome = parse_source(source)
        except Exception as error:  # noqa: BLE001 - one bad document must not stop the others
            log.warning("document %s version %d: chunking failed: %s", source.document_id, source.version,
                        type(error).__name__)
            parsed, outcome = [], Outcome(source.version, error=f"could not be chunked: {type(error).__name__}")
        outcomes[source.document_id] = outcome
        if not outcome.error:
            chunks.extend(parsed)
            documents[source.document_id] = source.version
    # What stays from the previous index; a document whose new version failed keeps its previous one.
    kept = {doc: version for doc, version in keep.items() if doc not in documents}
    reused: dict[str, np.ndarray] = {}
    if previous is not None and kept:
        try:
            old = KnowledgeIndex.from_bytes(previous)
        except IndexFormatError as error:
            raise UnreadableIndex(str(error)) from None
        same_model = embeddings is not None and old.vectors is not None and old.embeddings_model == embeddings.identity
        for row, chunk in enumerate(old.chunks.values()):
            if kept.get(chunk.document_id) == chunk.version:
                chunks.append(chunk)
                if same_model and old.vectors is not None:
                    reused[chunk.chunk_id] = old.vectors[row]
    documents.update(kept)
    if not chunks:
        return BuildResult(None, documents, outcomes, 0)
    if embeddings is None:
        return BuildResult(KnowledgeIndex.build(chunks).to_bytes(), documents, outcomes, len(chunks))
    vectors = chunk_vectors(chunks, reused, embeddings)
    index = KnowledgeIndex.build(chunks, vectors=vectors, embeddings_model=embeddings.identity)
    return BuildResult(index.to_bytes(), documents, outcomes, len(chunks))


def chunk_vectors(chunks: Sequence[Chunk], reused: Mapping[str, np.ndarray], config: EmbeddingsConfig) -> np.ndarray:
    """One vector per chunk: `reused` ones as they are, the others embedded (their indexed text)."""
    missing = [chunk for chunk in chunks if chunk.chunk_id not in reused]
    fresh = dict(zip((chunk.chunk_id for chunk in missing),
                     embed_blocking(config, [chunk.indexed_text for chunk in missing]), strict=True))
    dimensions = {len(vector) for vector in (*reused.values(), *fresh.values())}
    if len(dimensions) != 1:
        # The model's dimensions changed under the same name: embed everything again.
        return embed_blocking(config, [chunk.indexed_text for chunk in chunks])
    return np.stack([fresh[chunk.chunk_id] if chunk.chunk_id in fresh else reused[chunk.chunk_id]
                     for chunk in chunks]).astype(np.float32)


class IndexBuilder:
    """One build process, started on first use; `build` awaits it without blocking the event loop.

    `embeddings`: every index it builds also holds the chunks' vectors from that model."""

    def __init__(self, embeddings: EmbeddingsConfig | None = None) -> None:
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self.embeddings = embeddings

    async def build(self, previous: bytes | None, keep: Mapping[str, int], sources: Sequence[SourceDocument], *,
                    timeout_s: float | None = None) -> BuildResult:
        if self._executor is None:
            # spawn, not fork: the worker's gRPC and NATS threads must not be forked mid-flight.
            self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                return await loop.run_in_executor(self._executor, build_index, previous, dict(keep), list(sources),
                                                  self.embeddings)
        except TimeoutError:
            self._stop_process()  # stuck: a new process for the next build
            raise
        except concurrent.futures.process.BrokenProcessPool:
            # The process died (a parser crashed, out of memory): start a new one next time.
            self._stop_process()
            raise

    def _stop_process(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # Python 3.11's executor cannot stop a running task; kill its process (3.14 has terminate_workers()).
        for process in list(getattr(executor, "_processes", {}).values()):
            process.kill()
        executor.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)
