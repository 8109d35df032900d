"""gRPC wiring of the LLM worker: protobuf <-> plugin host, nothing else."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from kefu.llm.v1 import knowledge_pb2_grpc, llm_pb2, llm_pb2_grpc
from services.common.errors import NotFound
from services.common.grpc_server import (
    add_health_and_reflection,
    bind,
    create_grpc_server,
    stop_gracefully,
    wait_for_stop_signal,
)
from services.common.lexicon.model import Action
from services.common.logs import request_id_var
from services.common.metrics import start_metrics_server
from services.common.nats_client import close_nats, connect_nats
from services.llm_worker.answering import AnswerDone, Answerer, AnswerRequest
from services.llm_worker.cache import INVALIDATE_SUBJECT, AnswerCache, CachedAnswer, LocalTier
from services.llm_worker.coalesce import windowed
from services.llm_worker.grounded import Grounding
from services.llm_worker.kb.runtime import start_knowledge
from services.llm_worker.kb.server import SERVICE_NAME as KNOWLEDGE_SERVICE_NAME
from services.llm_worker.kb.server import KnowledgeServicer
from services.llm_worker.lexicon_feed import LexiconFeed, Ready
from services.llm_worker.metrics import WorkerMetrics
from services.llm_worker.output_filter import Blocked, Verdict, screened
from services.llm_worker.plugin_api import ChatMessage, GenerationParams, ProviderError
from services.llm_worker.plugin_host import PluginHost, PluginLoadError
from services.llm_worker.pregen import Pregenerator
from services.llm_worker.routes import RouteSpec
from services.llm_worker.settings import WorkerSettings
from services.llm_worker.watcher import watch_plugins

log = logging.getLogger(__name__)
SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name
MAX_CONTEXT_MESSAGES = 1000
ERROR_TRAILER = "kefu-error"
CONTENT_FILTER = "content_filter"
"""Done.finish_reason of an answer the output filter stopped (OpenAI's name for it)."""


def route_overrides(settings: WorkerSettings) -> dict[str, RouteSpec]:
    """KEFU_OPENAI_BASE_URL replaces the `default` route with the OpenAI-compatible provider."""
    if not settings.openai_base_url:
        return {}
    return {"default": RouteSpec.single("default", "openai_compatible", {
        "base_url": settings.openai_base_url, "api_key": settings.openai_api_key,
        "model": settings.model, "total_timeout_s": settings.upstream_timeout_s})}


def status_of(error: ProviderError) -> grpc.StatusCode:
    """Upstream failures as gRPC codes; the edge turns them into HTTP statuses and error codes."""
    if isinstance(error.__cause__, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    status = error.status
    if status == 429:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if status is None or status >= 500:
        return grpc.StatusCode.UNAVAILABLE
    if status in (401, 403):
        return grpc.StatusCode.FAILED_PRECONDITION  # our key or account, not the client's request
    if 400 <= status < 500:
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.UNKNOWN


class LlmServicer(llm_pb2_grpc.LlmServiceServicer):
    def __init__(self, host: PluginHost, answerer: Answerer, cache: AnswerCache | None, lexicon: LexiconFeed,
                 metrics: WorkerMetrics, stream_window_s: float = 0.0) -> None:
        self._host = host
        self._window_s = stream_window_s
        self._answerer = answerer
        self._cache = cache
        self._lexicon = lexicon
        # Bound once: labels() costs a lock and a dict lookup.
        self._filtered = {action: metrics.output_filtered.labels(action.name.lower()) for action in Action}

    async def Generate(
        self, request: llm_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext[llm_pb2.GenerateRequest, llm_pb2.GenerateResponse],
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        if not request.messages or len(request.messages) > MAX_CONTEXT_MESSAGES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"messages must hold 1..{MAX_CONTEXT_MESSAGES} entries")
        # The lexicon of this whole answer: one published meanwhile applies from the next turn on.
        matcher = self._lexicon.matcher
        if matcher is None:
            # Fail closed: no answer text leaves the worker unchecked.
            context.set_trailing_metadata(((ERROR_TRAILER, "moderation_unavailable"),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "output moderation has no lexicon yet")
        answer = AnswerRequest(
            route=request.route or "default",
            messages=[ChatMessage(m.role, m.content) for m in request.messages],
            params=GenerationParams(max_tokens=request.max_tokens or None,
                                    temperature=request.temperature if request.HasField("temperature") else None),
            tenant=request.tenant, sticky_key=request.session_id or request_id_var.get(),
            grounding=Grounding.of(request.grounding, request.assistant_name),
            shareable=request.shareable)
        try:
            # Filter first, then window: a tail the filter holds back never delays the first token.
            async for event in windowed(screened(self._answerer.answer(answer), matcher), self._window_s):
                if isinstance(event, str):
                    yield llm_pb2.GenerateResponse(delta=event)
                elif isinstance(event, Verdict):
                    self._filtered[event.action].inc()
                elif isinstance(event, Blocked):
                    self._filtered[Action.BLOCK].inc()
                    yield llm_pb2.GenerateResponse(done=llm_pb2.Done(
                        finish_reason=CONTENT_FILTER, blocked=True, route=answer.route))
                    return
                elif isinstance(event, AnswerDone):
                    yield llm_pb2.GenerateResponse(done=llm_pb2.Done(
                        finish_reason=event.finish_reason, model=event.model, cached=event.cached,
                        provider=event.provider, generation=event.generation, route=event.route,
                        usage=llm_pb2.Usage(prompt_tokens=event.prompt_tokens,
                                            completion_tokens=event.completion_tokens),
                        citations=[llm_pb2.Citation(**c.to_json()) for c in event.citations]))
        except NotFound as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, error.message)
        except ProviderError as error:
            log.warning("route %s: %s", answer.route, error)
            await context.abort(status_of(error), str(error))

    async def ListModels(
        self, request: llm_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[llm_pb2.ListModelsRequest, llm_pb2.ListModelsResponse],
    ) -> llm_pb2.ListModelsResponse:
        generation = self._host.current
        return llm_pb2.ListModelsResponse(generation=generation.number, models=[
            llm_pb2.Model(name=route.name, targets=[
                llm_pb2.Target(provider=t.spec.provider, model=t.model, weight=t.spec.weight)
                for t in route.targets])
            for route in generation.routes.values()])

    async def InvalidateCache(
        self, request: llm_pb2.InvalidateCacheRequest,
        context: grpc.aio.ServicerContext[llm_pb2.InvalidateCacheRequest, llm_pb2.InvalidateCacheResponse],
    ) -> llm_pb2.InvalidateCacheResponse:
        scope = "tenant" if request.tenant else "route" if request.route else "all"
        if self._cache is not None:
            await self._cache.invalidate(request.tenant, "" if request.tenant else request.route)
        log.info("cache invalidated: %s", scope)
        return llm_pb2.InvalidateCacheResponse(scope=scope)


async def create_server(settings: WorkerSettings, servicer: LlmServicer, metrics: WorkerMetrics,
                        knowledge: KnowledgeServicer | None = None,
                        ) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """Build the server with health and reflection and bind it; do not start."""
    # A PutDocument carries a whole document.
    server = create_grpc_server(metrics.registry, settings.internal_token,
                                max_receive_bytes=settings.kb_max_document_bytes + 1024 * 1024)
    llm_pb2_grpc.add_LlmServiceServicer_to_server(servicer, server)
    names = [SERVICE_NAME]
    if knowledge is not None:
        knowledge_pb2_grpc.add_KnowledgeServiceServicer_to_server(knowledge, server)
        names.append(KNOWLEDGE_SERVICE_NAME)
    health_servicer = await add_health_and_reflection(server, names)
    port = bind(server, settings.host, settings.grpc_port)
    return server, health_servicer, port


async def open_cache(settings: WorkerSettings, metrics: WorkerMetrics, nc: NatsClient) -> AnswerCache | None:
    if not settings.cache_enabled:
        return None

    def dropped(answer: CachedAnswer, served: bool) -> None:
        if answer.pregenerated and not served:
            metrics.pregenerations.labels("wasted").inc()

    local = LocalTier(settings.cache_local_max_bytes, settings.cache_ttl_s, on_drop=dropped)
    if not settings.cache_shared:
        return AnswerCache(local)
    cache = await AnswerCache.with_nats(local, nc, settings.cache_ttl_s, settings.nats_replicas)

    async def on_invalidate(message: Msg) -> None:
        # {"tenant": "..."} or {"route": "..."} or {} for all; one replica (queue group) bumps the epoch.
        try:
            scope = json.loads(message.data or b"{}")
            await cache.invalidate(str(scope.get("tenant", "")), str(scope.get("route", "")))
        except (ValueError, AttributeError) as error:
            log.warning("bad message on %s: %s", INVALIDATE_SUBJECT, error)

    await nc.subscribe(INVALIDATE_SUBJECT, queue="kefu-llm-worker", cb=on_invalidate)
    return cache


def readiness(health_servicer: health.aio.HealthServicer) -> Ready:
    """Readiness follows the lexicon: a worker without one cannot answer (fail closed)."""

    async def ready(serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)

    return ready


async def serve(settings: WorkerSettings) -> None:
    metrics = WorkerMetrics()
    host = PluginHost(settings.plugins_dir, settings.routes_file, route_overrides(settings))
    try:
        await host.start()
    except PluginLoadError as error:
        await host.aclose()
        raise SystemExit(f"llm_worker: cannot start, plugins in {settings.plugins_dir} are broken: {error}") from None
    metrics.plugin_generation.set(host.current.number)
    # Always: the output filter's lexicon comes from NATS KV, the shared cache too.
    nc = await connect_nats(settings.nats_url, "kefu-llm-worker")
    lexicon = LexiconFeed(metrics)
    feed: asyncio.Task[None] | None = None
    cache = await open_cache(settings, metrics, nc)
    knowledge = await start_knowledge(settings, metrics.registry)
    pregen = None
    if cache is not None and settings.pregen_enabled:
        pregen = Pregenerator(cache, metrics, live_streams=lambda: int(metrics.active_streams._value.get()),
                              concurrency=settings.pregen_concurrency,
                              tokens_per_minute=settings.pregen_tokens_per_minute,
                              max_live_streams=settings.pregen_max_live_streams)
    answerer = Answerer(host, metrics, cache, pregen, knowledge=knowledge.library)
    metrics_server = start_metrics_server(metrics.registry, settings.metrics_port, settings.host)
    stop_watching = asyncio.Event()
    watcher = asyncio.create_task(watch_plugins(host, metrics, stop_watching), name="plugin-watcher")
    try:
        servicer = LlmServicer(host, answerer, cache, lexicon, metrics,
                               stream_window_s=settings.stream_window_ms / 1000)
        server, health_servicer, port = await create_server(settings, servicer, metrics,
                                                            KnowledgeServicer(knowledge.base))
        ready = readiness(health_servicer)
        await ready(False)  # until the first lexicon is in
        feed = asyncio.create_task(lexicon.follow(nc, ready), name="lexicon-feed")
        await server.start()
        log.info("llm worker on %s:%d, routes %s", settings.host, port, sorted(host.current.routes))
        await wait_for_stop_signal()
        stop_watching.set()
        await stop_gracefully(server, health_servicer, settings.grace_s)
    finally:
        stop_watching.set()
        if feed is not None:
            feed.cancel()
            await asyncio.wait([feed])
        await asyncio.wait([watcher], timeout=5)
        if pregen is not None:
            await pregen.aclose()
        if cache is not None:
            await cache.aclose()
        await knowledge.aclose()
        await close_nats(nc)
        await host.aclose()
        metrics_server.close()
