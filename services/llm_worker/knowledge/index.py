"""A BM25 index of a tenant's chunks (bm25s, numpy backend) with a self-contained byte format."""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from typing import Any

import bm25s
import numpy as np

from services.common.errors import KefuError
from services.llm_worker.knowledge.analysis import ZH_STOP_WORDS, Analyzer, default_analyzer
from services.llm_worker.knowledge.models import Chunk, Hit

FORMAT_VERSION = 4
"""4: optional chunk vectors (`vectors.npy`, float32, L2-normalised) and `embeddings_model` in meta.json."""
READABLE_FORMATS = frozenset({3, 4})
"""Format 3 is format 4 without vectors: an index written before dense retrieval keeps serving."""
LENGTH_NORM_CAP = 1.5
"""`Hit.tf_score` judges a chunk longer than 1.5x the average as if it were 1.5x: a passage among short FAQ
items keeps the support its words give (on CMRC, where chunks are alike, this changes nothing: balanced
accuracy with half held out 0.944-0.955 on four splits either way; a cap of 1.0, no length effect at all,
costs 0.3-0.6 points there)."""
_CHUNK_FIELDS = tuple(f.name for f in fields(Chunk))
MAX_RESPLIT_CHARS = 16
"""Longer unknown words are left as they are (query_terms)."""
_ALL_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]+")
# BM25 parameters (Lucene's variant), bm25s' defaults. On the CMRC trial set (bench/kb_bench.py) k1 1.2-2.0
# and b 0.5-0.9 move cited-document recall@1 by at most 0.002 and no pair beats these on the tuned
# answer-or-hand-off balanced accuracy on held-out splits (0.946-0.951 against 0.949-0.951).
K1 = 1.5
B = 0.75


class IndexFormatError(KefuError, ValueError):
    """Bytes that are not an index this version wrote (damaged, truncated or from another format)."""


class KnowledgeIndex:
    """The chunks of one tenant's knowledge and their BM25 scores; immutable once built.

    A turn searches the index it started with: a new version of a document builds a new index.
    """

    def __init__(self, chunks: Sequence[Chunk] | _ChunkTable, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray,
                 vocabulary: Sequence[str], lengths: np.ndarray, analyzer: Analyzer | None = None, *,
                 vectors: np.ndarray | None = None, embeddings_model: str = "") -> None:
        """Use `build` or `from_bytes`. `data`/`indices`/`indptr`: the (chunks x terms) BM25 score matrix in
        compressed sparse column form, row indexes sorted within each column; `vocabulary`: the terms of
        the columns in order; `lengths`: each chunk's number of terms; `vectors`: one L2-normalised float32
        row per chunk from `embeddings_model` (dense retrieval), None without."""
        if vectors is not None and (vectors.dtype != np.float32 or vectors.ndim != 2
                                    or vectors.shape[0] != len(chunks) or not embeddings_model):
            raise ValueError("vectors must be float32, one row per chunk, with the model that made them")
        self._vectors = vectors
        self._embeddings_model = embeddings_model if vectors is not None else ""
        self._chunks = chunks if isinstance(chunks, _ChunkTable) else _ChunkTable.of(chunks)
        # Terms are looked up by their hash in a sorted array, not in a dict of strings: 16 bytes a term
        # instead of ~180, which is most of a small tenant's index (this process's hash; never stored).
        hashes = np.fromiter((hash(term) for term in vocabulary), dtype=np.int64, count=len(vocabulary))
        order = np.argsort(hashes, kind="stable")
        self._term_hashes = hashes[order]
        self._term_order = order.astype(np.int32)
        # Kept for to_bytes only (a worker never writes an index), so compressed: a third of its size.
        self._vocabulary_z = zlib.compress(json.dumps(list(vocabulary), ensure_ascii=False).encode())
        self._analyzer = analyzer or default_analyzer()
        # int32 offsets in memory (half the per-term cost; a tenant has far fewer than 2**31 postings).
        self._data, self._indices = data, indices
        self._indptr = indptr.astype(np.int32) if len(data) < 2**31 else indptr
        self._count = len(self._chunks)
        self._lengths = lengths
        # BM25's length normalisation per chunk, to cap it for `Hit.tf_score`.
        self._length_norm = (1 - B + B * lengths / max(float(lengths.mean()), 1.0)) if len(lengths) else lengths
        self._unknown_idf = math.log1p((self._count + 0.5) / 0.5)
        self._bm25 = bm25s.BM25(k1=K1, b=B, method="lucene", backend="numpy")
        self._bm25.scores = {"data": data, "indices": indices, "indptr": self._indptr, "num_docs": self._count}
        self._bm25.nonoccurrence_array = None
        arrays = (data, indices, self._indptr, self._term_order, self._term_hashes, lengths, self._length_norm)
        self._nbytes = sum(a.nbytes for a in arrays) + len(self._vocabulary_z) + self._chunks.nbytes + (
            vectors.nbytes if vectors is not None else 0)

    def _column(self, term: str) -> int | None:
        """The term's column, None when no chunk has it."""
        key = hash(term)
        at = int(np.searchsorted(self._term_hashes, key))
        if at < len(self._term_hashes) and self._term_hashes[at] == key:
            return int(self._term_order[at])
        return None

    @classmethod
    def build(cls, chunks: Sequence[Chunk], analyzer: Analyzer | None = None, *, vectors: np.ndarray | None = None,
              embeddings_model: str = "") -> KnowledgeIndex:
        """The index of `chunks`; `vectors` (optional): their embeddings by `embeddings_model`, row per chunk."""
        analyzer = analyzer or default_analyzer()
        dense_vectors = normalised(vectors) if vectors is not None else None
        corpus = [analyzer.terms(chunk.indexed_text) for chunk in chunks]
        vocabulary = sorted({term for terms in corpus for term in terms})
        if not vocabulary:
            empty_i = np.zeros(0, dtype=np.int32)
            return cls(chunks, np.zeros(0, dtype=np.float32), empty_i, np.zeros(len(vocabulary) + 1, np.int64),
                       vocabulary, np.asarray([len(t) for t in corpus], dtype=np.float32), analyzer,
                       vectors=dense_vectors, embeddings_model=embeddings_model)
        numbers = {term: number for number, term in enumerate(vocabulary)}
        bm25 = bm25s.BM25(k1=K1, b=B, method="lucene", backend="numpy")
        # Ids, not strings: bm25s then keeps our vocabulary order and adds no empty-token column.
        bm25.index([[numbers[t] for t in terms] for terms in corpus], create_empty_token=False, show_progress=False)
        data = np.asarray(bm25.scores["data"], dtype=np.float32)
        indices = np.asarray(bm25.scores["indices"], dtype=np.int32)
        indptr = np.asarray(bm25.scores["indptr"], dtype=np.int64)
        if len(indptr) != len(vocabulary) + 1:
            raise RuntimeError(f"bm25s returned {len(indptr) - 1} columns for {len(vocabulary)} terms")
        lengths = np.asarray([len(terms) for terms in corpus], dtype=np.float32)
        return cls(chunks, *_sorted_columns(data, indices, indptr), vocabulary, lengths, analyzer,
                   vectors=dense_vectors, embeddings_model=embeddings_model)

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def chunks(self) -> Mapping[str, Chunk]:
        """Every chunk by its id, in index order."""
        return self._chunks

    @property
    def analyzer(self) -> Analyzer:
        return self._analyzer

    @property
    def nbytes(self) -> int:
        """Approximate resident size in bytes (arrays, vocabulary, chunks), for a byte-bounded cache."""
        return self._nbytes

    @property
    def vectors(self) -> np.ndarray | None:
        """The chunks' embeddings (row i: chunk i in index order), None for an index built without them."""
        return self._vectors

    @property
    def embeddings_model(self) -> str:
        """The model of `vectors` ("" without)."""
        return self._embeddings_model

    def dense_search(self, vector: np.ndarray, k: int = 5) -> list[Hit]:
        """The `k` chunks whose vectors are nearest `vector` (cosine), best first; [] without vectors.

        The hits carry `similarity`; their BM25 fields stay 0 (fusion keeps those of the BM25 hit)."""
        if self._vectors is None or k < 1 or not len(self._vectors):
            return []
        query = np.asarray(vector, dtype=np.float32).ravel()
        if query.shape[0] != self._vectors.shape[1]:
            raise ValueError(f"a {query.shape[0]}-dimension query for {self._vectors.shape[1]}-dimension vectors")
        norm = float(np.linalg.norm(query))
        if norm == 0.0:
            return []
        similarities = self._vectors @ (query / norm)
        count = min(k, len(similarities))
        rows = np.argpartition(-similarities, count - 1)[:count]
        rows = rows[np.argsort(-similarities[rows], kind="stable")]
        return [Hit(chunk=self._chunks.row(int(row)), score=0.0, similarity=float(similarities[row]))
                for row in rows.tolist()]

    def query_terms(self, text: str) -> list[str]:
        """The analyzer's terms of a query, each Chinese word no chunk has re-cut into words chunks have.

        The segmenter cuts a question differently from the document now and then: it glues a name to the
        next character ("刘七是怎么死的" gives "刘七是") or splits a name the document keeps whole ("锦地罗"
        as 锦地 + 罗), and a word unknown to the index counts as the rarest there is, against answering.
        So an unknown word that splits into words of the index (with stop words between, at least one part
        of two characters) is those words, and two neighbouring words, one unknown, that together are a
        word of the index are that word. A name the index does not have ("马飚": 马 + 飚) stays unknown.
        On CMRC with half of the articles held out: recall@1 of the answerable questions 0.971 -> 0.980
        and answer-or-hand-off balanced accuracy 0.949 -> 0.957 at the shipped threshold, better on all
        four splits.
        """
        terms = self._analyzer.terms(text)
        if not any(_ALL_CJK.fullmatch(term) and self._column(term) is None for term in terms):
            return terms
        found: list[str] = []
        for term in terms:
            parts = self._resplit(term) if self._resplittable(term) else None
            found.extend(parts if parts is not None else (term,))
        # The other way round: the question cut "锦地罗" as 锦地 + 罗 where the document has 锦地罗.
        joined: list[str] = []
        at = 0
        while at < len(found):
            term = found[at]
            if at + 1 < len(found) and _ALL_CJK.fullmatch(term) and _ALL_CJK.fullmatch(found[at + 1]) and (
                    self._column(term) is None or self._column(found[at + 1]) is None) and self._column(
                    term + found[at + 1]) is not None:
                joined.append(term + found[at + 1])
                at += 2
                continue
            joined.append(term)
            at += 1
        return joined

    def _resplittable(self, term: str) -> bool:
        return 2 <= len(term) <= MAX_RESPLIT_CHARS and _ALL_CJK.fullmatch(term) is not None \
            and self._column(term) is None

    def _resplit(self, term: str) -> list[str] | None:
        """`term` as the fewest words of the index and stop words; None when it is not one or has no part
        of two characters or more."""
        best: list[list[str] | None] = [None] * (len(term) + 1)
        best[0] = []
        for start in range(len(term)):
            done = best[start]
            if done is None:
                continue
            for end in range(start + 1, len(term) + 1):
                part = term[start:end]
                if part == term:
                    continue
                held = best[end]
                if (held is None or len(held) > len(done) + 1) and (
                        part in ZH_STOP_WORDS or self._column(part) is not None):
                    best[end] = [*done, part]
        parts = best[-1]
        if not parts or not any(len(part) >= 2 and part not in ZH_STOP_WORDS for part in parts):
            return None
        return [part for part in parts if part not in ZH_STOP_WORDS]

    def idf(self, term: str) -> float:
        """The term's IDF in this index (the highest value for a term no chunk has)."""
        return self._idf(self._column(term))

    def _idf(self, column: int | None) -> float:
        """Lucene's IDF, the one the scores use (computed, not stored: terms outnumber postings in a small
        tenant's index)."""
        if column is None:
            return self._unknown_idf
        frequency = int(self._indptr[column + 1]) - int(self._indptr[column])
        return math.log1p((self._count - frequency + 0.5) / (frequency + 0.5))

    def search(self, query: str | Sequence[str], k: int = 5) -> list[Hit]:
        """The `k` best chunks for `query` (text, or terms from this index's analyzer), best first; only
        chunks sharing a term with the query."""
        terms = list(dict.fromkeys(self.query_terms(query) if isinstance(query, str) else query))
        columns = [(term, self._column(term)) for term in terms]
        known = [(term, number) for term, number in columns if number is not None]
        numbers = [number for _, number in known]
        if not numbers or k < 1:
            return []
        scores = self._bm25.get_scores_from_ids(numbers)
        rows = _top(scores, k)
        if not rows.size:
            return []
        idf = {term: self._idf(number) for term, number in columns}
        total_idf = sum(idf.values())
        # Which of the query's terms each hit contains (one bisection of each term's postings for all
        # hits), and the term's stored score there, to undo BM25's length normalisation.
        norms = self._length_norm[rows]
        contains = []
        tf_scores = np.zeros(len(rows))
        for term, number in known:
            start = int(self._indptr[number])
            postings = self._indices[start:int(self._indptr[number + 1])]
            at = np.minimum(np.searchsorted(postings, rows), len(postings) - 1)
            found = postings[at] == rows
            contains.append((term, found.tolist()))
            # Lucene's term part is tf / (tf + k1 * norm): recover tf, then score it with norm capped.
            part = np.where(found, self._data[start + at] / idf[term], 0.0)
            tf = part * K1 * norms / np.maximum(1 - part, 1e-6)
            tf_scores += idf[term] * tf / (tf + K1 * np.minimum(norms, LENGTH_NORM_CAP))
        hits = []
        for position, row in enumerate(rows.tolist()):
            matched = tuple(term for term, found in contains if found[position])
            hits.append(Hit(chunk=self._chunks.row(row), score=float(scores[row]),
                            coverage=sum(idf[t] for t in matched) / total_idf, matched_terms=matched,
                            tf_score=float(tf_scores[position])))
        return hits

    def to_bytes(self) -> bytes:
        """A zip of JSON (metadata, vocabulary, chunks) and .npy arrays: no pickle, loadable by `from_bytes`."""
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            meta = {"format": FORMAT_VERSION, "k1": K1, "b": B, "chunks": len(self._chunks),
                    "embeddings_model": self._embeddings_model}
            archive.writestr("meta.json", json.dumps(meta), zipfile.ZIP_DEFLATED)
            archive.writestr("vocabulary.json", zlib.decompress(self._vocabulary_z), zipfile.ZIP_DEFLATED)
            archive.writestr("chunks.json", json.dumps(self._chunks.columns, ensure_ascii=False),
                             zipfile.ZIP_DEFLATED)
            indptr = self._indptr.astype(np.int64)
            arrays = [("data", self._data), ("indices", self._indices), ("indptr", indptr), ("lengths", self._lengths)]
            if self._vectors is not None:
                arrays.append(("vectors", self._vectors))
            for name, array in arrays:
                buffer = io.BytesIO()
                np.save(buffer, array, allow_pickle=False)
                archive.writestr(f"{name}.npy", buffer.getvalue(), zipfile.ZIP_STORED)
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, analyzer: Analyzer | None = None) -> KnowledgeIndex:
        """The index `to_bytes` wrote; IndexFormatError for anything else."""
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                meta = json.loads(archive.read("meta.json"))
                if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
                    raise IndexFormatError(f"index format {meta.get('format') if isinstance(meta, dict) else '?'} "
                                           f"is not one of {sorted(READABLE_FORMATS)}")
                vocabulary = json.loads(archive.read("vocabulary.json"))
                raw_chunks = json.loads(archive.read("chunks.json"))
                arrays = {name: np.load(io.BytesIO(archive.read(f"{name}.npy")), allow_pickle=False)
                          for name in ("data", "indices", "indptr", "lengths")}
                model = meta.get("embeddings_model") or ""
                vectors = (np.load(io.BytesIO(archive.read("vectors.npy")), allow_pickle=False)
                           if model and "vectors.npy" in archive.namelist() else None)
        except IndexFormatError:
            raise
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as error:
            raise IndexFormatError(f"not a knowledge index: {error}") from None
        chunks = _ChunkTable.from_columns(raw_chunks)
        values, indices, indptr, lengths = arrays["data"], arrays["indices"], arrays["indptr"], arrays["lengths"]
        if (
            not isinstance(vocabulary, list)
            or not all(isinstance(term, str) for term in vocabulary)
            or values.dtype != np.float32 or indices.dtype != np.int32 or indptr.dtype != np.int64
            or values.ndim != 1 or indices.shape != values.shape or indptr.shape != (len(vocabulary) + 1,)
            or (len(indptr) and (indptr[0] != 0 or indptr[-1] != len(values) or np.any(np.diff(indptr) < 0)))
            or (len(indices) and (indices.min() < 0 or indices.max() >= len(chunks)))
            or len(set(chunks.columns["chunk_id"])) != len(chunks.columns["chunk_id"])
            or lengths.dtype != np.float32 or lengths.shape != (len(chunks),)
            or not isinstance(model, str)
            or (vectors is not None and (vectors.dtype != np.float32 or vectors.ndim != 2
                                         or vectors.shape[0] != len(chunks) or not np.isfinite(vectors).all()))
        ):
            raise IndexFormatError("not a knowledge index: inconsistent arrays, vocabulary or chunks")
        return cls(chunks, values, indices, indptr, vocabulary, lengths, analyzer, vectors=vectors,
                   embeddings_model=model if vectors is not None else "")


def normalised(vectors: np.ndarray) -> np.ndarray:
    """`vectors` as float32 rows of length 1 (an all-zero row stays zero)."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2 or not np.isfinite(array).all():
        raise ValueError("vectors must be a 2-D array of finite numbers")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    unit: np.ndarray = np.divide(array, norms, out=np.zeros_like(array), where=norms > 0)
    return unit


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the `k` highest positive scores, best first (ties: lower row first).

    k passes of argmax: ~10x cheaper than argpartition for the few hits a turn needs, which on 100,000
    scores that are mostly 0 (ties) takes most of a millisecond.
    """
    if k > 64:
        positive = np.flatnonzero(scores > 0)
        return positive[np.argsort(-scores[positive], kind="stable")[:k]]
    remaining = scores.copy()
    rows = []
    for _ in range(min(k, len(remaining))):
        row = int(remaining.argmax())
        if remaining[row] <= 0:
            break
        rows.append(row)
        remaining[row] = -np.inf
    return np.asarray(rows, dtype=np.int64)


_STR_FIELDS = tuple(name for name in _CHUNK_FIELDS if name not in ("version", "handoff"))
# Fields most chunks of a document share: one string object for all of them.
_SHARED_FIELDS = frozenset({"document_id", "title", "url", "kind", "heading"})


class _ChunkTable(Mapping[str, Chunk]):
    """Chunks kept field by field (a list each), a `Chunk` made when one is asked for: loading an index
    makes no object per chunk, and strings a document's chunks share are stored once."""

    def __init__(self, columns: dict[str, list[Any]]) -> None:
        self.columns = columns
        self._rows = {chunk_id: row for row, chunk_id in enumerate(columns["chunk_id"])}
        self.nbytes = sum(100 + 2 * len(value) for name in _STR_FIELDS if name not in _SHARED_FIELDS
                          for value in columns[name]) + 120 * len(self._rows) + sum(
                              100 + 2 * len(value) for name in _SHARED_FIELDS for value in set(columns[name]))

    @classmethod
    def of(cls, chunks: Sequence[Chunk]) -> _ChunkTable:
        return cls({name: [getattr(chunk, name) for chunk in chunks] for name in _CHUNK_FIELDS})

    @classmethod
    def from_columns(cls, raw: object) -> _ChunkTable:
        """The table `columns` wrote, checked; IndexFormatError otherwise."""
        if not isinstance(raw, dict) or set(raw) != set(_CHUNK_FIELDS) or not all(
                isinstance(column, list) for column in raw.values()):
            raise IndexFormatError("not a knowledge index: chunks have the wrong fields")
        count = len(raw["chunk_id"])
        if (
            any(len(column) != count for column in raw.values())
            or not all(isinstance(value, str) for name in _STR_FIELDS for value in raw[name])
            or not all(type(value) is int for value in raw["version"])
            or not all(type(value) is bool for value in raw["handoff"])
            or not set(raw["kind"]) <= {"text", "faq"}
        ):
            raise IndexFormatError("not a knowledge index: chunks have the wrong types")
        for name in _SHARED_FIELDS:
            shared: dict[str, str] = {}
            raw[name] = [shared.setdefault(value, value) for value in raw[name]]
        return cls(raw)

    def row(self, row: int) -> Chunk:
        return Chunk(*(self.columns[name][row] for name in _CHUNK_FIELDS))

    def __getitem__(self, chunk_id: str) -> Chunk:
        return self.row(self._rows[chunk_id])

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns["chunk_id"])

    def __len__(self) -> int:
        return len(self._rows)


def _sorted_columns(data: np.ndarray, indices: np.ndarray,
                    indptr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same matrix with row indexes ascending within each column (membership tests bisect them)."""
    columns = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    order = np.lexsort((indices, columns))
    return data[order], indices[order], indptr
