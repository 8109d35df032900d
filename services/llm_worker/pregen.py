"""Pre-generation: answer the questions a visitor is likely to ask next, in the background, into the cache.

It never delays live traffic: it waits while live streams are above a threshold, runs at most
`concurrency` generations per tenant, and spends at most `tokens_per_minute` per tenant. Warming
jobs (the common questions of a tenant) take a tenant's slots only when no likely-next job waits.
At most `max_queued` jobs wait for a slot; beyond that the oldest waiting one is dropped (issue 17).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from services.llm_worker.cache import AnswerCache, CachedAnswer
from services.llm_worker.cache_key import CacheKey, normalize_question
from services.llm_worker.flights import Flights
from services.llm_worker.metrics import WorkerMetrics
from services.llm_worker.plugin_api import ChatMessage, Delta, Finish, GenerationParams, ProviderError
from services.llm_worker.plugin_host import Generation, Target

log = logging.getLogger(__name__)


class PrioritySlots:
    """`size` slots; a waiter with a lower `priority` number gets a freed slot first, FIFO within one."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: int) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # handed the slot just as the waiter was cancelled: pass it on
            raise

    def _release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():  # cancelled waiters are skipped
                future.set_result(None)
                return
        self._free += 1


@dataclass
class _TenantBudget:
    slots: PrioritySlots
    window_start: float = 0.0
    tokens_used: int = 0


@dataclass(frozen=True, slots=True)
class PregenJob:
    tenant: str
    route: str
    version: str
    target: Target
    system: tuple[ChatMessage, ...]
    question: str
    params: GenerationParams
    warming: bool = False
    """A common question pre-generated to warm the cache: runs after every likely-next job and waits
    longer for live traffic to calm down."""
    generation: Generation | None = None
    """The plugin generation `target` belongs to, kept alive while the job streams from it."""


@dataclass
class Pregenerator:
    cache: AnswerCache
    metrics: WorkerMetrics
    live_streams: Callable[[], int]
    """How many live generations run now; pre-generation waits while it is at `max_live_streams`."""
    concurrency: int = 2
    tokens_per_minute: int = 20_000
    max_live_streams: int = 8
    max_wait_s: float = 30.0
    """How long a job waits for live traffic to calm down before it is skipped."""
    warming_max_wait_s: float = 600.0
    max_queued: int = 256
    """Jobs waiting for a slot, all tenants together; one more drops the oldest waiting (counted
    `dropped`). Every answer schedules a few, and each new system prompt a tenant's warming set, so
    without a bound a burst of turns would pile up tasks faster than the slots drain them."""
    clock: Callable[[], float] = time.monotonic
    flights: Flights | None = None
    """Shared with live turns (the Answerer sets it): a turn asking what is being pre-generated joins it."""
    _budgets: dict[str, _TenantBudget] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _queued: OrderedDict[asyncio.Task[None], None] = field(default_factory=OrderedDict)
    """Tasks not holding a slot yet, oldest first."""
    _in_flight: set[str] = field(default_factory=set)
    """Keys being pre-generated: two visitors' overlapping suggestions run once."""
    _waiting: set[tuple[str, int]] = field(default_factory=set)
    """(key, priority) of jobs waiting for a slot: a job waits only if none as urgent waits for its key."""

    def schedule(self, jobs: list[PregenJob]) -> None:
        for job in jobs:
            task = asyncio.create_task(self._run(job), name=f"pregen-{job.tenant}")
            self._tasks.add(task)
            self._queued[task] = None
            task.add_done_callback(self._forget)
            while len(self._queued) > self.max_queued:
                oldest, _ = self._queued.popitem(last=False)
                oldest.cancel()
                self.metrics.pregenerations.labels("dropped").inc()

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._queued.pop(task, None)

    def queued(self) -> int:
        """Jobs waiting for a slot now."""
        return len(self._queued)

    async def _run(self, job: PregenJob) -> None:
        key = CacheKey.of(job.tenant, job.route, job.version, [*job.system, ChatMessage("user", job.question)],
                          normalize_question(job.question), job.params,
                          self.cache.epoch_token(job.tenant, job.route))
        priority = 1 if job.warming else 0
        if self.cache.contains_locally(key) or key.kv_key in self._in_flight \
                or any((key.kv_key, p) in self._waiting for p in range(priority + 1)):
            return
        budget = self._budgets.setdefault(job.tenant, _TenantBudget(PrioritySlots(self.concurrency)))
        deadline = self.clock() + (self.warming_max_wait_s if job.warming else self.max_wait_s)
        self._waiting.add((key.kv_key, priority))
        try:
            async with budget.slots.slot(priority):
                self._waiting.discard((key.kv_key, priority))
                if (task := asyncio.current_task()) is not None:
                    self._queued.pop(task, None)  # holding a slot: never dropped
                # A more urgent job for the key may have run meanwhile; another replica (or an earlier
                # run of this one) may have it in the shared tier.
                if key.kv_key in self._in_flight or (self.flights is not None and self.flights.get(key)) \
                        or await self.cache.contains(key):
                    return
                self._in_flight.add(key.kv_key)
                try:
                    await self._run_once(job, key, budget, deadline)
                finally:
                    self._in_flight.discard(key.kv_key)
        finally:
            self._waiting.discard((key.kv_key, priority))

    async def _run_once(self, job: PregenJob, key: CacheKey, budget: _TenantBudget, deadline: float) -> None:
        while self.live_streams() >= self.max_live_streams:  # live requests first
            if self.clock() > deadline:
                self.metrics.pregenerations.labels("skipped").inc()
                return
            await asyncio.sleep(0.05)
        if not self._spend(budget, 0):
            self.metrics.pregenerations.labels("skipped").inc()
            return
        self.metrics.pregenerations.labels("started").inc()
        if self.flights is not None:
            if self.flights.get(key) is not None:  # a live turn started it while this job waited
                return
            messages = [*job.system, ChatMessage("user", job.question)]
            flight = self.flights.launch(key, job.generation, job.target, messages, job.params, route=job.route,
                                         live=False)
            assert flight.task is not None
            await asyncio.shield(flight.task)  # stored by the flight; readers may have joined meanwhile
            if flight.error is not None:
                log.info("pre-generation for %s failed: %s", job.tenant, flight.error)
            elif flight.finish is not None:
                self._spend(budget, flight.finish.usage.prompt_tokens + flight.finish.usage.completion_tokens)
            return
        answer = await self._generate(job)
        if answer is None:
            return
        self._spend(budget, answer.prompt_tokens + answer.completion_tokens)
        await self.cache.store(key, answer)

    def _spend(self, budget: _TenantBudget, tokens: int) -> bool:
        now = self.clock()
        if now - budget.window_start >= 60:
            budget.window_start, budget.tokens_used = now, 0
        budget.tokens_used += tokens
        return budget.tokens_used < self.tokens_per_minute

    async def _generate(self, job: PregenJob) -> CachedAnswer | None:
        parts: list[str] = []
        messages = [*job.system, ChatMessage("user", job.question)]
        try:
            async with contextlib.aclosing(job.target.provider.stream(messages, job.params)) as events:
                async for event in events:
                    if isinstance(event, Delta):
                        parts.append(event.text)
                    elif isinstance(event, Finish):
                        return CachedAnswer("".join(parts), event.finish_reason, event.model,
                                            event.usage.prompt_tokens, event.usage.completion_tokens,
                                            pregenerated=True)
        except ProviderError as error:
            log.info("pre-generation for %s failed: %s", job.tenant, error)
        return None

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.flights is not None:
            await self.flights.aclose()
