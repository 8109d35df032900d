"""The lexicon the output filter uses: read from NATS KV at start, followed as moderation republishes it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from services.common.lexicon.matcher import Matcher
from services.common.lexicon.wire import LEXICON_BUCKET, LEXICON_KEY, LexiconWireError, decode
from services.llm_worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

RETRY_S = 1.0
CHECK_S = 5.0
"""A quiet watch compares the stored revision this often: a watch lost with a restarted nats-server
delivers nothing, so without it a worker would keep an old lexicon."""

Ready = Callable[[bool], Awaitable[None]]
"""Told True when the worker has a lexicon, False when it has none (readiness)."""


def _build(data: bytes) -> Matcher:
    return Matcher(decode(data))


class LexiconFeed:
    """Owns the matcher in use. A turn reads `matcher` once and keeps it to its end, so a new lexicon
    (one reference assignment) applies from the next turn on, never half-way through an answer."""

    def __init__(self, metrics: WorkerMetrics, matcher: Matcher | None = None) -> None:
        self._metrics = metrics
        self._matcher = matcher
        self._revision = 0
        """KV revision of the lexicon in use; 0 before the first one (or a fixed one)."""

    @property
    def matcher(self) -> Matcher | None:
        """None: no lexicon yet (or it was deleted), and no answer text may leave the worker."""
        return self._matcher

    @property
    def revision(self) -> int:
        return self._revision

    async def follow(self, nc: NatsClient, ready: Ready) -> None:
        """Keep `matcher` the lexicon in the bucket until cancelled; NATS failures are retried."""
        js = nc.jetstream()
        waiting_logged = False
        while True:
            try:
                kv = await js.key_value(LEXICON_BUCKET)
            except BucketNotFoundError:
                if not waiting_logged:
                    log.warning("no lexicon bucket yet: answers fail until moderation publishes one")
                    waiting_logged = True
                await asyncio.sleep(RETRY_S)
                continue
            except (nats.errors.Error, TimeoutError, OSError) as error:
                log.warning("cannot open the lexicon bucket (retrying): %s", error or type(error).__name__)
                await asyncio.sleep(RETRY_S)
                continue
            try:
                await self._watch(kv, ready)
            except (nats.errors.Error, TimeoutError, OSError) as error:
                log.warning("lexicon watch failed (restarting it): %s", error or type(error).__name__)
                await asyncio.sleep(RETRY_S)
            except Exception:
                # Never let the feed die quietly: the worker would keep its lexicon forever.
                log.exception("lexicon watch failed unexpectedly (restarting it)")
                await asyncio.sleep(RETRY_S)

    async def _watch(self, kv: KeyValue, ready: Ready) -> None:
        """Apply every value of the key until the watch seems lost; then return (the caller watches anew)."""
        watcher = await kv.watch(LEXICON_KEY)
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=CHECK_S)
                except nats.errors.TimeoutError:
                    if await self._stored_revision(kv) != self._revision:
                        return
                    continue
                if entry is None:  # the initial values are all in
                    if self._matcher is None:
                        log.warning("the lexicon bucket holds no lexicon: answers fail until moderation publishes one")
                    continue
                if entry.operation in (KV_DEL, KV_PURGE):
                    await self._drop(entry.revision, ready)
                elif entry.value is not None:
                    await self._apply(entry.value, entry.revision, ready)
        finally:
            with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
                await watcher.stop()

    async def _stored_revision(self, kv: KeyValue) -> int:
        try:
            entry = await kv.get(LEXICON_KEY)
        except KeyNotFoundError:
            # Gone: what we hold already says so, unless we still hold a lexicon (watch again, see the delete).
            return self._revision if self._matcher is None else -1
        return entry.revision or 0

    async def _apply(self, data: bytes, revision: int, ready: Ready) -> None:
        if revision == self._revision and self._matcher is not None:
            return
        try:
            # Off the event loop: a 20,000-word lexicon takes about 0.1 s to build.
            matcher = await asyncio.to_thread(_build, data)
        except LexiconWireError as error:
            # Moderation validated it, so this is a version skew: the lexicon in use (if any) keeps serving.
            log.error("lexicon revision %d cannot be used, revision %d keeps serving: %s", revision,
                      self._revision, error)
            return
        self._matcher = matcher
        self._revision = revision
        self._metrics.lexicon_revision.set(revision)
        log.info("lexicon revision %d in use: %d words", revision, matcher.word_count)
        await ready(True)

    async def _drop(self, revision: int, ready: Ready) -> None:
        if self._matcher is not None:
            log.warning("the lexicon was deleted: answers fail until moderation publishes one")
        self._matcher = None
        self._revision = revision
        self._metrics.lexicon_revision.set(0)
        await ready(False)
