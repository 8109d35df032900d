"""One generation: pick the route's target, ground the turn in the tenant's documents (grounded.py),
answer from the cache when the turn allows, else stream from the provider, fill the cache and schedule
pre-generation of the likely next questions."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TypeGuard, TypeVar

from services.common.errors import NotFound
from services.llm_worker.cache import AnswerCache, CachedAnswer
from services.llm_worker.cache_key import (
    CacheKey,
    cacheable_question,
    knowledge_part,
    normalize_question,
    system_digest,
    target_version,
)
from services.llm_worker.citations import Citation, CitedFinish
from services.llm_worker.flights import Flights
from services.llm_worker.grounded import (
    HANDOFF,
    SMALL_TALK_MODEL,
    GroundedProvider,
    Grounding,
    KnowledgeSource,
    TurnPlan,
    grounded_prompt,
    plan_turn,
)
from services.llm_worker.knowledge.grounding import join_adjacent
from services.llm_worker.metrics import WorkerMetrics
from services.llm_worker.plugin_api import (
    CanonicalQuestions,
    ChatMessage,
    Delta,
    Finish,
    GenerationParams,
    KnowsQuestions,
    Provider,
    ProviderError,
)
from services.llm_worker.plugin_host import Generation, PluginHost, Target
from services.llm_worker.pregen import Pregenerator, PregenJob

log = logging.getLogger(__name__)
REPLAY_CHUNK_CHARS = 24
MAX_SUGGESTIONS = 3
MAX_WARM_QUESTIONS = 100
HelperT = TypeVar("HelperT")


@dataclass(frozen=True, slots=True)
class AnswerRequest:
    route: str
    messages: list[ChatMessage]
    params: GenerationParams
    tenant: str
    sticky_key: str
    """Session (or client) id: keeps a conversation on one canary target."""
    grounding: Grounding = field(default_factory=Grounding)
    """The tenant's grounding mode and assistant name."""
    shareable: bool = False
    """The edge's word that everything that shaped `messages` is server-held: only then may the turn
    use the shared cache or single flight (issue 17: a client-supplied history must not poison them)."""


@dataclass(frozen=True, slots=True)
class AnswerDone:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    cached: bool
    provider: str
    generation: int
    route: str
    citations: tuple[Citation, ...] = ()
    """The tenant's passages the answer cites, in order of first use."""


AnswerEvent = str | AnswerDone


class Answerer:
    def __init__(self, host: PluginHost, metrics: WorkerMetrics, cache: AnswerCache | None = None,
                 pregenerator: Pregenerator | None = None, knowledge: KnowledgeSource | None = None) -> None:
        self._host = host
        self._knowledge = knowledge
        self._metrics = metrics
        self._cache = cache
        self._pregen = pregenerator
        self._flights: Flights | None = None
        if cache is not None:
            # Live turns and pre-generation share one set of flights: a turn joins either.
            self._flights = pregenerator.flights if pregenerator is not None and pregenerator.flights else \
                Flights(cache, metrics, host.hold)
            if pregenerator is not None:
                pregenerator.flights = self._flights
        self._hits = 0
        self._lookups = 0
        self._warmed = WarmedContexts()
        metrics.cache_hit_ratio.set_function(lambda: self._hits / self._lookups if self._lookups else 0.0)
        if cache is not None:
            metrics.cache_local_bytes.set_function(lambda: cache.local.bytes)

    async def answer(self, request: AnswerRequest) -> AsyncGenerator[AnswerEvent, None]:
        # Every delta comes from the generation leased here, even if a reload swaps meanwhile.
        async with self._host.lease() as generation:
            route = generation.route(request.route)
            if route is None:
                raise NotFound(f"no model {request.route!r}")
            target = route.pick(request.sticky_key, str(id(request)))
            plan = await plan_turn(self._knowledge, request.tenant, request.messages, request.grounding,
                                   offline="offline" in target.provider.capabilities)
            self._metrics.grounded_turns.labels(plan.kind).inc()
            if plan.kind in ("grounded", HANDOFF):
                self._metrics.retrieval_seconds.observe(plan.retrieval_seconds)
            if plan.kind != "ungrounded":
                async for event in self._answer_grounded(generation, request, target, plan):
                    yield event
                return
            knower = _knower(generation, target)
            question = None
            if self._cache is not None and request.tenant and request.shareable:
                question = cacheable_question(request.messages, knower.is_standalone if knower else None)
            key = canonical_key = None
            canonical = version = epochs = None
            if question is not None and self._cache is not None:
                version = target_version(generation.fingerprint, target.spec.provider, target.spec.settings)
                epochs = self._cache.epoch_token(request.tenant, request.route)
                key = CacheKey.of(request.tenant, request.route, version,
                                  request.messages, question, request.params, epochs)
                # A paraphrase of a common question is also looked up under its canonical wording,
                # whose entry only ever holds the answer to that wording (see _canonical).
                canonical = self._canonical(generation, target, request)
                if canonical is not None and normalize_question(canonical) not in ("", question):
                    canonical_key = CacheKey.of(request.tenant, request.route, version, request.messages,
                                                normalize_question(canonical), request.params, epochs)
                hit = await self._lookup(key, canonical_key)
                if hit is not None:
                    for start in range(0, len(hit.text), REPLAY_CHUNK_CHARS):
                        yield hit.text[start:start + REPLAY_CHUNK_CHARS]
                    yield AnswerDone(hit.finish_reason, hit.prompt_tokens, hit.completion_tokens, hit.model, True,
                                     target.spec.provider, generation.number, request.route)
                    self._schedule_pregen(generation, request, target)
                    self._schedule_warming(generation, request, target, version, epochs)
                    return
            async for event in self._generate(generation, request, target, key, canonical_key):
                yield event
            if key is not None and version is not None and epochs is not None:
                self._schedule_pregen(generation, request, target, canonical)
                self._schedule_warming(generation, request, target, version, epochs)

    async def _answer_grounded(self, generation: Generation, request: AnswerRequest, target: Target,
                               plan: TurnPlan) -> AsyncIterator[AnswerEvent]:
        """A turn of a tenant with documents (or small talk): from `plan`'s passages only, all of one
        snapshot; cached under that snapshot's knowledge version (first questions only)."""
        done = functools.partial(AnswerDone, cached=False, provider=target.spec.provider,
                                 generation=generation.number, route=request.route)
        if plan.kind == "small_talk":
            yield plan.reply
            yield done("stop", 0, 0, SMALL_TALK_MODEL)
            return
        offline = "offline" in target.provider.capabilities
        if plan.kind == HANDOFF or (offline and not plan.answerable):
            # Nothing in the documents answers (and an extract cannot come from general knowledge).
            yield done(HANDOFF, 0, 0, target.model or target.spec.provider)
            return
        # A model reads neighbouring chunks of a document as one passage (bench-kb: the gold span reaches
        # the prompt for 0.991 of CMRC questions, 0.981 as separate chunks); an extract quotes single chunks.
        hits = plan.hits if offline else tuple(join_adjacent(plan.hits))
        grounded_target = Target(target.spec, GroundedProvider(target.provider, hits))
        grounded = request if offline else replace(
            request, messages=grounded_prompt(request.messages, hits, request.grounding))
        key = None
        question = (cacheable_question(request.messages)
                    if self._cache is not None and request.tenant and request.shareable else None)
        if question is not None and not plan.follow_up and self._cache is not None:
            version = target_version(generation.fingerprint, target.spec.provider, target.spec.settings)
            key = CacheKey.of(request.tenant, request.route, version, request.messages, question, request.params,
                              self._cache.epoch_token(request.tenant, request.route),
                              knowledge_part(plan.knowledge_version, request.grounding.mode,
                                             request.grounding.assistant_name))
            hit = await self._lookup(key)
            if hit is not None:
                for start in range(0, len(hit.text), REPLAY_CHUNK_CHARS):
                    yield hit.text[start:start + REPLAY_CHUNK_CHARS]
                yield AnswerDone(hit.finish_reason, hit.prompt_tokens, hit.completion_tokens, hit.model, True,
                                 target.spec.provider, generation.number, request.route, hit.citations)
                return
        async for event in self._generate(generation, grounded, grounded_target, key):
            yield event

    def _canonical(self, generation: Generation, target: Target, request: AnswerRequest) -> str | None:
        """The canonical wording of the turn's question, from the provider that knows the common
        questions; None when there is none or the provider is unsure."""
        canonizer = _canonizer(generation, target)
        if canonizer is None:
            return None
        try:
            return canonizer.canonical_question(request.messages[-1].content)
        except Exception:
            log.exception("canonical_question failed")
            return None

    async def _lookup(self, key: CacheKey, canonical_key: CacheKey | None = None) -> CachedAnswer | None:
        """One lookup of a turn (counted once): its own wording first, then its canonical one."""
        assert self._cache is not None
        self._lookups += 1
        found = await self._cache.lookup(key)
        if found is None and canonical_key is not None:
            found = await self._cache.lookup(canonical_key)
        if found is None:
            self._metrics.cache_requests.labels("local", "miss").inc()
            self._metrics.cache_requests.labels("shared", "miss").inc()
            return None
        answer, tier = found
        if tier == "shared":
            self._metrics.cache_requests.labels("local", "miss").inc()
        self._metrics.cache_requests.labels(tier, "hit").inc()
        self._hits += 1
        if answer.pregenerated:
            self._metrics.pregenerations.labels("served").inc()
        return answer

    async def _generate(self, generation: Generation, request: AnswerRequest, target: Target,
                        key: CacheKey | None, canonical_key: CacheKey | None = None) -> AsyncIterator[AnswerEvent]:
        """From the provider; a cacheable turn joins the generation already running for its key (or its
        canonical key) or starts one that others may join and that fills the cache."""
        provider = target.spec.provider
        start = time.perf_counter()
        outcome = "error"
        first = True
        flight = None
        if key is not None and self._flights is not None:
            flight = self._flights.get(key) or self._flights.get(canonical_key)
            if flight is None:
                flight = self._flights.launch(key, generation, target, request.messages, request.params,
                                              route=request.route, live=True)
            source: AsyncGenerator[str | Finish, None] = flight.follow()
        else:
            source = self._direct(target, request)
        try:
            async with contextlib.aclosing(source) as events:
                async for event in events:
                    if isinstance(event, str):
                        if not event:
                            continue
                        if first:
                            self._metrics.ttft_seconds.labels(request.route).observe(time.perf_counter() - start)
                            first = False
                        yield event
                    else:
                        outcome = "ok"
                        yield AnswerDone(event.finish_reason, event.usage.prompt_tokens,
                                         event.usage.completion_tokens, event.model, False, provider,
                                         generation.number, request.route,
                                         event.citations if isinstance(event, CitedFinish) else ())
                        break
            if outcome != "ok":
                raise ProviderError(f"provider {provider} ended its stream without a finish", retryable=True)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._metrics.request_seconds.labels(request.route, provider, outcome).observe(time.perf_counter() - start)
            self._metrics.requests.labels(request.route, provider, target.model, outcome).inc()

    async def _direct(self, target: Target, request: AnswerRequest) -> AsyncGenerator[str | Finish, None]:
        """An uncacheable turn's own generation: deltas as text, then the Finish."""
        self._metrics.active_streams.inc()
        try:
            async with contextlib.aclosing(target.provider.stream(request.messages, request.params)) as events:
                async for event in events:
                    if isinstance(event, Delta):
                        yield event.text
                    elif isinstance(event, Finish):
                        self._metrics.prompt_tokens.labels(request.route).inc(event.usage.prompt_tokens)
                        self._metrics.completion_tokens.labels(request.route).inc(event.usage.completion_tokens)
                        yield event
                        return
        finally:
            self._metrics.active_streams.dec()

    def _schedule_pregen(self, generation: Generation, request: AnswerRequest, target: Target,
                         canonical: str | None = None) -> None:
        """The likely next questions, and after a miss on a paraphrase its canonical question (so the
        next paraphrase hits), are pre-generated before any warming job."""
        if self._pregen is None:
            return
        knower = _knower(generation, target)
        if knower is None:
            return
        question = [m.content for m in request.messages if m.role == "user"][-1]
        try:
            suggestions = knower.suggest_next(question, MAX_SUGGESTIONS)[:MAX_SUGGESTIONS]
        except Exception:
            log.exception("suggest_next failed")
            return
        if canonical is not None and normalize_question(canonical) != normalize_question(question):
            suggestions = [canonical, *suggestions]
        system = tuple(m for m in request.messages if m.role == "system")
        version = target_version(generation.fingerprint, target.spec.provider, target.spec.settings)
        self._pregen.schedule([PregenJob(request.tenant, request.route, version, target, system, suggestion,
                                         request.params, generation=generation) for suggestion in suggestions])

    def _schedule_warming(self, generation: Generation, request: AnswerRequest, target: Target, version: str,
                          epochs: str) -> None:
        """Once per tenant, route, serving version, system prompt, parameters, epochs and language: the
        canonical answers to the common questions, pre-generated behind every other job.

        The worker cannot warm at start: the tenants and the system prompt it will be asked with
        arrive with the first request. A model swap or an invalidation gives a new context, so the
        new version is warmed by its first cacheable turn.
        """
        if self._pregen is None:
            return
        canonizer = _canonizer(generation, target)
        if canonizer is None:
            return
        try:
            questions = canonizer.common_questions(request.messages[-1].content, MAX_WARM_QUESTIONS)
        except Exception:
            log.exception("common_questions failed")
            return
        if not questions:
            return
        system = tuple(m for m in request.messages if m.role == "system")
        context = (request.tenant, request.route, version, system_digest(system), str(request.params.max_tokens),
                   str(request.params.temperature), epochs, questions[0])
        if not self._warmed.claim(context):
            return
        self._pregen.schedule([PregenJob(request.tenant, request.route, version, target, system, question,
                                         request.params, warming=True, generation=generation)
                               for question in questions])


def _canonizer(generation: Generation, target: Target) -> CanonicalQuestions | None:
    """Like `_knower`, for the canonical questions."""
    return _helper(generation, target, generation.canonizers, _canonizes)


class WarmedContexts:
    """Contexts already warmed, each for `rewarm_s` (then a turn warms it again: entries expire), bounded."""

    def __init__(self, rewarm_s: float = 900.0, max_contexts: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rewarm_s = rewarm_s
        self._max = max_contexts
        self._clock = clock
        self._seen: OrderedDict[tuple[str, ...], float] = OrderedDict()

    def claim(self, context: tuple[str, ...]) -> bool:
        """True (and remembered) when `context` was not warmed within `rewarm_s`."""
        now = self._clock()
        when = self._seen.get(context)
        if when is not None and now - when < self._rewarm_s:
            return False
        self._seen[context] = now
        self._seen.move_to_end(context)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return True


def _knower(generation: Generation, target: Target) -> KnowsQuestions | None:
    """The route's own provider if it knows the common questions, else any provider of the
    generation that does (the knowledge base serves an LLM route too)."""
    return _helper(generation, target, generation.knowers, _knows)


def _knows(provider: Provider) -> TypeGuard[KnowsQuestions]:
    return isinstance(provider, KnowsQuestions)


def _canonizes(provider: Provider) -> TypeGuard[CanonicalQuestions]:
    return isinstance(provider, CanonicalQuestions)


def _helper(generation: Generation, target: Target, found: dict[int, HelperT | None],
            implements: Callable[[Provider], TypeGuard[HelperT]]) -> HelperT | None:
    """The target's own provider if it `implements` the helper, else the generation's first that does; looked
    up once per target (`found`, kept by the generation, keyed by id: `target` must be one of the generation's
    routes', never a per-turn wrapper such as the grounded one)."""
    if id(target) not in found:
        candidates = (c.provider for route in generation.routes.values() for c in route.targets)
        found[id(target)] = next((p for p in (target.provider, *candidates) if implements(p)), None)
    return found[id(target)]
