"""Pre-generation: answer the questions a visitor is likely to ask next, in the background, into the cache.

It never delays live traffic: it waits while live streams are above a threshold, runs at most
`concurrency` generations per tenant, and spends at most `tokens_per_minute` per tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.llm_worker.cache import AnswerCache, CachedAnswer
from services.llm_worker.cache_key import CacheKey, normalize_question
from services.llm_worker.metrics import WorkerMetrics
from services.llm_worker.plugin_api import ChatMessage, Delta, Finish, GenerationParams, ProviderError
from services.llm_worker.plugin_host import Target

log = logging.getLogger(__name__)


@dataclass
class _TenantBudget:
    semaphore: asyncio.Semaphore
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
    clock: Callable[[], float] = time.monotonic
    _budgets: dict[str, _TenantBudget] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _in_flight: set[str] = field(default_factory=set)
    """Keys being pre-generated: two visitors' overlapping suggestions run once."""

    def schedule(self, jobs: list[PregenJob]) -> None:
        for job in jobs:
            task = asyncio.create_task(self._run(job), name=f"pregen-{job.tenant}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, job: PregenJob) -> None:
        key = CacheKey.of(job.tenant, job.route, job.version, [*job.system, ChatMessage("user", job.question)],
                          normalize_question(job.question), job.params,
                          self.cache.epoch_token(job.tenant, job.route))
        if self.cache.contains_locally(key) or key.kv_key in self._in_flight:
            return
        self._in_flight.add(key.kv_key)
        try:
            await self._run_once(job, key)
        finally:
            self._in_flight.discard(key.kv_key)

    async def _run_once(self, job: PregenJob, key: CacheKey) -> None:
        budget = self._budgets.setdefault(job.tenant, _TenantBudget(asyncio.Semaphore(self.concurrency)))
        deadline = self.clock() + self.max_wait_s
        while self.live_streams() >= self.max_live_streams:  # live requests first
            if self.clock() > deadline:
                self.metrics.pregenerations.labels("skipped").inc()
                return
            await asyncio.sleep(0.05)
        async with budget.semaphore:
            if not self._spend(budget, 0):
                self.metrics.pregenerations.labels("skipped").inc()
                return
            self.metrics.pregenerations.labels("started").inc()
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
