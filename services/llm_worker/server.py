"""gRPC wiring of the LLM worker: protobuf <-> plugin host, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health

from kefu.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.grpc_server import (
    add_health_and_reflection,
    bind,
    create_grpc_server,
    stop_gracefully,
    wait_for_stop_signal,
)
from services.common.logs import request_id_var
from services.common.metrics import start_metrics_server
from services.llm_worker.metrics import WorkerMetrics
from services.llm_worker.plugin_api import ChatMessage, Delta, Finish, GenerationParams, ProviderError
from services.llm_worker.plugin_host import PluginHost, PluginLoadError
from services.llm_worker.routes import RouteSpec
from services.llm_worker.settings import WorkerSettings
from services.llm_worker.watcher import watch_plugins

log = logging.getLogger(__name__)
SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name
MAX_CONTEXT_MESSAGES = 1000


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
    def __init__(self, host: PluginHost, metrics: WorkerMetrics) -> None:
        self._host = host
        self._metrics = metrics

    async def Generate(self, request: llm_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[llm_pb2.GenerateResponse]:
        route_name = request.route or "default"
        if not request.messages or len(request.messages) > MAX_CONTEXT_MESSAGES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"messages must hold 1..{MAX_CONTEXT_MESSAGES} entries")
        messages = [ChatMessage(m.role, m.content) for m in request.messages]
        params = GenerationParams(
            max_tokens=request.max_tokens or None,
            temperature=request.temperature if request.HasField("temperature") else None)
        # Every delta of this stream comes from the generation leased here, even if a reload
        # swaps in a new one meanwhile.
        async with self._host.lease() as generation:
            route = generation.route(route_name)
            if route is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {route_name!r}")
                return
            target = route.pick(request.session_id, request_id_var.get() or uuid.uuid4().hex)
            provider_name = target.spec.provider
            start = time.perf_counter()
            outcome = "error"
            first = True
            self._metrics.active_streams.inc()
            try:
                async with contextlib.aclosing(target.provider.stream(messages, params)) as events:
                    async for event in events:
                        if isinstance(event, Delta):
                            if not event.text:
                                continue
                            if first:
                                self._metrics.ttft_seconds.labels(route_name).observe(time.perf_counter() - start)
                                first = False
                            yield llm_pb2.GenerateResponse(delta=event.text)
                        elif isinstance(event, Finish):
                            self._metrics.prompt_tokens.labels(route_name).inc(event.usage.prompt_tokens)
                            self._metrics.completion_tokens.labels(route_name).inc(event.usage.completion_tokens)
                            outcome = "ok"
                            yield llm_pb2.GenerateResponse(done=llm_pb2.Done(
                                finish_reason=event.finish_reason, model=event.model, cached=False,
                                provider=provider_name, generation=generation.number, route=route_name,
                                usage=llm_pb2.Usage(prompt_tokens=event.usage.prompt_tokens,
                                                    completion_tokens=event.usage.completion_tokens)))
                            break
                if outcome != "ok":
                    raise ProviderError(f"provider {provider_name} ended its stream without a finish")
            except ProviderError as error:
                log.warning("route %s (%s): %s", route_name, provider_name, error)
                await context.abort(status_of(error), str(error))
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            finally:
                self._metrics.active_streams.dec()
                self._metrics.request_seconds.labels(route_name, provider_name, outcome).observe(
                    time.perf_counter() - start)
                self._metrics.requests.labels(route_name, provider_name, target.model, outcome).inc()

    async def ListModels(self, request: llm_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> llm_pb2.ListModelsResponse:
        generation = self._host.current
        return llm_pb2.ListModelsResponse(generation=generation.number, models=[
            llm_pb2.Model(name=route.name, targets=[
                llm_pb2.Target(provider=t.spec.provider, model=t.model, weight=t.spec.weight)
                for t in route.targets])
            for route in generation.routes.values()])


async def create_server(settings: WorkerSettings, servicer: LlmServicer,
                        metrics: WorkerMetrics) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """Build the server with health and reflection and bind it; do not start."""
    server = create_grpc_server(metrics.registry)
    llm_pb2_grpc.add_LlmServiceServicer_to_server(servicer, server)
    health_servicer = await add_health_and_reflection(server, [SERVICE_NAME])
    port = bind(server, settings.host, settings.grpc_port)
    return server, health_servicer, port


async def serve(settings: WorkerSettings) -> None:
    metrics = WorkerMetrics()
    host = PluginHost(settings.plugins_dir, settings.routes_file, route_overrides(settings))
    try:
        await host.start()
    except PluginLoadError as error:
        await host.aclose()
        raise SystemExit(f"llm_worker: cannot start, plugins in {settings.plugins_dir} are broken: {error}") from None
    metrics.plugin_generation.set(host.current.number)
    metrics_server = start_metrics_server(metrics.registry, settings.metrics_port, settings.host)
    stop_watching = asyncio.Event()
    watcher = asyncio.create_task(watch_plugins(host, metrics, stop_watching), name="plugin-watcher")
    try:
        server, health_servicer, port = await create_server(settings, LlmServicer(host, metrics), metrics)
        await server.start()
        log.info("llm worker on %s:%d, routes %s", settings.host, port, sorted(host.current.routes))
        await wait_for_stop_signal()
        stop_watching.set()
        await stop_gracefully(server, health_servicer, settings.grace_s)
    finally:
        stop_watching.set()
        await asyncio.wait([watcher], timeout=5)
        await host.aclose()
        metrics_server.close()
