"""Single flight: one generation per cache key at a time, shared by every turn that asks it meanwhile.

A cacheable turn that misses the cache joins the generation already running for its key (a live
turn's or a pre-generation's) instead of asking the upstream again: it gets the deltas produced
so far at once, then the rest as they come. The generation stops when its last reader leaves
(so a client hanging up still cancels the upstream request), unless a background job holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import AbstractAsyncContextManager

from services.llm_worker.cache import AnswerCache, CachedAnswer
from services.llm_worker.cache_key import CacheKey
from services.llm_worker.citations import CitedFinish
from services.llm_worker.metrics import WorkerMetrics
from services.llm_worker.plugin_api import ChatMessage, Delta, Finish, GenerationParams, ProviderError
from services.llm_worker.plugin_host import Generation, GenerationClosed, Target

log = logging.getLogger(__name__)


class Flight:
    """One generation in progress: its deltas so far, then a Finish or an error."""

    def __init__(self, key: str, held: bool) -> None:
        self.key = key
        self.parts: list[str] = []
        self.finish: Finish | None = None
        self.error: ProviderError | None = None
        self.readers = 0
        self.held = held
        """A background job keeps it running with no reader (pre-generation)."""
        self.task: asyncio.Task[None] | None = None
        self.abandoned = False
        """Its last reader left and it is being cancelled: nobody may join it any more."""
        self._changed = asyncio.Event()

    def _publish(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def add(self, text: str) -> None:
        self.parts.append(text)
        self._publish()

    def end(self, finish: Finish) -> None:
        self.finish = finish
        self._publish()

    def fail(self, error: ProviderError) -> None:
        self.error = error
        self._publish()

    @property
    def done(self) -> bool:
        return self.finish is not None or self.error is not None

    async def follow(self) -> AsyncGenerator[str | Finish, None]:
        """Every delta from the first (those already there joined), then the Finish; raises the
        generation's ProviderError."""
        self.readers += 1
        try:
            index = 0
            while True:
                changed = self._changed  # taken before looking: no wake-up is lost
                if index < len(self.parts):
                    # What piled up since the last look goes on as one delta (one hop, not one per chunk).
                    start, index = index, len(self.parts)
                    yield self.parts[start] if index - start == 1 else "".join(self.parts[start:index])
                    continue
                if self.finish is not None:
                    yield self.finish
                    return
                if self.error is not None:
                    error = ProviderError(str(self.error), retryable=self.error.retryable, status=self.error.status)
                    error.__cause__ = self.error.__cause__  # status_of reads the cause (timeouts)
                    raise error
                await changed.wait()
        finally:
            self.readers -= 1
            if self.readers == 0 and not self.held and self.task is not None and not self.task.done():
                self.abandoned = True
                self.task.cancel()  # nobody reads it any more: stop the upstream request


class Flights:
    """The generations running per cache key; each stores its answer in the cache when it finishes."""

    def __init__(self, cache: AnswerCache, metrics: WorkerMetrics,
                 hold: Callable[[Generation], AbstractAsyncContextManager[object]] | None = None) -> None:
        self._cache = cache
        self._metrics = metrics
        self._hold = hold
        """Keeps a plugin generation alive while a flight streams from it (PluginHost.hold)."""
        self._flights: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def get(self, key: CacheKey | None) -> Flight | None:
        """The flight a turn may join for `key` (never one being cancelled)."""
        flight = self._flights.get(key.kv_key) if key is not None else None
        return None if flight is None or flight.abandoned else flight

    def launch(self, key: CacheKey, generation: Generation | None, target: Target,
               messages: Sequence[ChatMessage], params: GenerationParams, *, route: str, live: bool) -> Flight:
        """Start generating `messages` for `key` (which must not be flying). A live flight counts in
        `kefu_active_streams` and the token counters; a pre-generation's (`live=False`) is held
        until it ends and its answer is marked pre-generated."""
        flight = Flight(key.kv_key, held=not live)
        self._flights[key.kv_key] = flight
        flight.task = asyncio.create_task(self._fly(flight, key, generation, target, list(messages), params,
                                                    route, live), name=f"flight-{key.tenant}")
        return flight

    async def _fly(self, flight: Flight, key: CacheKey, generation: Generation | None, target: Target,
                   messages: list[ChatMessage], params: GenerationParams, route: str, live: bool) -> None:
        if live:
            self._metrics.active_streams.inc()
        try:
            async with contextlib.AsyncExitStack() as stack:
                if generation is not None and self._hold is not None:
                    await stack.enter_async_context(self._hold(generation))
                await self._stream(flight, key, target, messages, params, route, live)
        except ProviderError as error:
            flight.fail(error)
        except GenerationClosed as error:  # a pre-generation scheduled before a swap
            flight.fail(ProviderError(str(error), retryable=True))
        except asyncio.CancelledError:
            flight.fail(ProviderError("generation cancelled", retryable=True))
            raise
        except Exception as error:
            log.exception("generation for a cached key failed")
            flight.fail(ProviderError(f"provider {target.spec.provider} failed: {type(error).__name__}",
                                      retryable=True))
        finally:
            if live:
                self._metrics.active_streams.dec()
            if not flight.done:
                flight.fail(ProviderError(f"provider {target.spec.provider} ended its stream without a finish",
                                          retryable=True))
            if self._flights.get(flight.key) is flight:
                del self._flights[flight.key]

    async def _stream(self, flight: Flight, key: CacheKey, target: Target, messages: list[ChatMessage],
                      params: GenerationParams, route: str, live: bool) -> None:
        async with contextlib.aclosing(target.provider.stream(messages, params)) as events:
            async for event in events:
                if isinstance(event, Delta):
                    if event.text:
                        flight.add(event.text)
                elif isinstance(event, Finish):
                    if live:
                        self._metrics.prompt_tokens.labels(route).inc(event.usage.prompt_tokens)
                        self._metrics.completion_tokens.labels(route).inc(event.usage.completion_tokens)
                    flight.end(event)
                    # Stored while the flight is still listed: a turn arriving meanwhile joins it
                    # rather than missing both.
                    if event.finish_reason != "length":
                        await self._cache.store(key, CachedAnswer(
                            "".join(flight.parts), event.finish_reason, event.model, event.usage.prompt_tokens,
                            event.usage.completion_tokens, pregenerated=not live,
                            citations=event.citations if isinstance(event, CitedFinish) else ()))
                    return

    async def aclose(self) -> None:
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
