"""Embeddings from the upstream's OpenAI-compatible `POST /embeddings`: chunks at ingestion, questions per turn."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import numpy as np

from services.common.errors import Unavailable
from services.llm_worker.knowledge.index import normalised

log = logging.getLogger(__name__)

MAX_BATCH = 2048
"""OpenAI's limit of inputs per request."""
CONCURRENT_BATCHES = 4
"""Ingestion requests in flight: a 100,000-chunk tenant is 1,563 batches of 64."""


class EmbeddingsUnavailable(Unavailable):
    """The upstream did not embed (unreachable, timed out, an error status, a malformed answer): retryable."""


@dataclass(frozen=True, slots=True)
class EmbeddingsConfig:
    """Where and how to embed (picklable: the build process gets it)."""

    base_url: str
    """KEFU_OPENAI_BASE_URL, `/v1` included."""
    model: str
    api_key: str = field(default="", repr=False)
    batch: int = 64
    """Texts per request at ingestion."""
    timeout_s: float = 60.0
    """One ingestion request."""
    attempts: int = 3
    """Tries per ingestion batch (backing off 0.5 s, 1 s...)."""
    query_timeout_s: float = 2.0
    """A turn's question: past this the turn retrieves with BM25 alone."""
    dimensions: int = 0
    """Ask for vectors this long (OpenAI's `dimensions`, text-embedding-3 models); 0: the model's own."""

    def __post_init__(self) -> None:
        if not self.base_url or not self.model:
            raise ValueError("embeddings need a base URL and a model")
        if not 1 <= self.batch <= MAX_BATCH:
            raise ValueError(f"embedding batch must be 1..{MAX_BATCH}, got {self.batch}")
        if self.timeout_s <= 0 or self.query_timeout_s <= 0 or self.attempts < 1 or self.dimensions < 0:
            raise ValueError("embedding timeouts must be > 0, attempts >= 1 and dimensions >= 0")

    @property
    def identity(self) -> str:
        """What the vectors are comparable by (stored in the index): the model, and the dimensions asked for."""
        return f"{self.model}@{self.dimensions}" if self.dimensions else self.model


def parse_vectors(body: object, count: int) -> np.ndarray:
    """The `count` vectors of an OpenAI embeddings response, in input order, normalised; ValueError if malformed."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != count:
        raise ValueError(f"expected {count} embeddings, got {len(data) if isinstance(data, list) else 'none'}")
    rows: list[list[float] | None] = [None] * count
    for position, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError("an embedding item is not an object")
        index = item.get("index", position)
        vector = item.get("embedding")
        if type(index) is not int or not 0 <= index < count or rows[index] is not None:
            raise ValueError(f"bad or repeated embedding index {index!r}")
        if not isinstance(vector, list) or not vector or not all(
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in vector):
            raise ValueError("an embedding is not a list of finite numbers (base64 encoding is not asked for)")
        rows[index] = vector
    if len({len(row) for row in rows if row is not None}) != 1:
        raise ValueError("embeddings of different dimensions")
    return normalised(np.asarray(rows, dtype=np.float32))


async def embed(session: aiohttp.ClientSession, config: EmbeddingsConfig, texts: Sequence[str], *,
                timeout_s: float | None = None) -> np.ndarray:
    """One request: the vectors of `texts`; EmbeddingsUnavailable on any failure (never with the texts)."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    # An empty input is refused by OpenAI; a blank text gets a vector all the same.
    body: dict[str, object] = {"model": config.model, "input": [text if text.strip() else " " for text in texts]}
    if config.dimensions:
        body["dimensions"] = config.dimensions
    try:
        async with asyncio.timeout(timeout_s or config.timeout_s):
            async with session.post(f"{config.base_url}/embeddings", json=body, headers=headers) as response:
                if response.status != 200:
                    raise EmbeddingsUnavailable(f"the embeddings upstream answered HTTP {response.status}")
                payload = await response.json(content_type=None)
        return parse_vectors(payload, len(texts))
    except TimeoutError:
        raise EmbeddingsUnavailable("the embeddings upstream timed out") from None
    except (aiohttp.ClientError, ValueError, OSError) as error:
        if isinstance(error, EmbeddingsUnavailable):
            raise
        raise EmbeddingsUnavailable(f"embeddings failed: {type(error).__name__}: {error}"[:300]) from None


async def embed_all(config: EmbeddingsConfig, texts: Sequence[str]) -> np.ndarray:
    """Every text's vector (rows in order), in batches of `config.batch` (CONCURRENT_BATCHES in flight), each
    tried `config.attempts` times; EmbeddingsUnavailable when one batch keeps failing (no partial result)."""
    starts = range(0, len(texts), config.batch)
    if not starts:
        return np.zeros((0, 0), dtype=np.float32)
    gate = asyncio.Semaphore(CONCURRENT_BATCHES)

    async def one(session: aiohttp.ClientSession, start: int) -> np.ndarray:
        batch = texts[start:start + config.batch]
        async with gate:
            for attempt in range(1, config.attempts + 1):
                try:
                    return await embed(session, config, batch)
                except EmbeddingsUnavailable as error:
                    if attempt == config.attempts:
                        raise
                    log.warning("embedding batch %d failed (%s); retrying", start // config.batch, error)
                    await asyncio.sleep(0.5 * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    try:
        async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(session, start)) for start in starts]
    except ExceptionGroup as failed:  # the first failing batch stops the others
        unavailable = [error for error in failed.exceptions if isinstance(error, EmbeddingsUnavailable)]
        if unavailable:
            raise unavailable[0] from None
        raise
    parts = [task.result() for task in tasks]
    if len({part.shape[1] for part in parts}) != 1:
        raise EmbeddingsUnavailable("the embeddings upstream changed dimensions between batches")
    return np.concatenate(parts)


def embed_blocking(config: EmbeddingsConfig, texts: Sequence[str]) -> np.ndarray:
    """`embed_all` for the build process (no event loop of its own)."""
    return asyncio.run(embed_all(config, texts))


class QueryVectors(Protocol):
    """What a turn asks for its question's vector (QueryEmbedder)."""

    @property
    def model(self) -> str: ...

    async def vector(self, text: str) -> np.ndarray | None:
        """The text's normalised vector, None when it cannot be had now (the turn then uses BM25 alone)."""


class QueryEmbedder:
    """Questions' vectors for turns: one request each with a short timeout, a small LRU of recent ones
    (visitors ask the same questions), failures counted and logged at most once a `warn_every_s`."""

    def __init__(self, config: EmbeddingsConfig, *, on_failure: Callable[[], object] | None = None,
                 cache_size: int = 2048, warn_every_s: float = 60.0) -> None:
        """`on_failure`: told of every failure (a metric's inc)."""
        self.config = config
        self._on_failure = on_failure
        self._session: aiohttp.ClientSession | None = None
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._warn_every_s = warn_every_s
        self._warned_at = -math.inf
        self._failures_since_warning = 0

    @property
    def model(self) -> str:
        """The vectors' identity (EmbeddingsConfig.identity): an index's vectors must be of the same."""
        return self.config.identity

    async def vector(self, text: str) -> np.ndarray | None:
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            return cached
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            found: np.ndarray = (await embed(self._session, self.config, [text],
                                             timeout_s=self.config.query_timeout_s))[0]
        except EmbeddingsUnavailable as error:
            self._failed(error)
            return None
        self._cache[text] = found
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return found

    def _failed(self, error: Exception) -> None:
        if self._on_failure is not None:
            self._on_failure()
        self._failures_since_warning += 1
        now = time.monotonic()
        if now - self._warned_at >= self._warn_every_s:
            log.warning("question embedding failed %d time(s) (last: %s); those turns retrieve with BM25 alone",
                        self._failures_since_warning, error)
            self._warned_at, self._failures_since_warning = now, 0

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
