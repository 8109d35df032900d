"""gRPC wiring of the session service: protobuf <-> domain, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health

from kefu.session.v1 import session_pb2, session_pb2_grpc
from services.common.grpc_server import (
    add_health_and_reflection,
    bind,
    create_grpc_server,
    grpc_errors,
    stop_gracefully,
    wait_for_stop_signal,
)
from services.common.metrics import start_metrics_server
from services.common.nats_client import close_nats, connect_nats
from services.session.context import build_context
from services.session.metrics import SessionMetrics
from services.session.models import Principal, StoredMessage
from services.session.settings import SessionSettings
from services.session.store import SessionStore
from services.session.tokens import TokenCounters

log = logging.getLogger(__name__)
WATCH_READY_HEADER = "kefu-watch"
"""Initial metadata of a Watch that passed its access check (the edge waits for it)."""
SERVICE_NAME = session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name


def principal_of(request: session_pb2.AppendRequest | session_pb2.BuildContextRequest
                 | session_pb2.ListMessagesRequest | session_pb2.DeleteSessionRequest
                 | session_pb2.WatchRequest) -> Principal:
    p = request.principal
    return Principal(tenant=p.tenant, subject=p.subject, role=p.role)


def to_proto(message: StoredMessage) -> session_pb2.Message:
    return session_pb2.Message(id=message.id, role=message.role, content=message.content,
                               created_at=message.created_at, tokens=message.tokens, seq=message.seq)


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, settings: SessionSettings, store: SessionStore, counters: TokenCounters,
                 metrics: SessionMetrics) -> None:
        self._settings = settings
        self._store = store
        self._counters = counters
        self._metrics = metrics

    async def Append(self, request: session_pb2.AppendRequest,
                     context: grpc.aio.ServicerContext) -> session_pb2.AppendResponse:
        async with grpc_errors(context):
            with self._metrics.operation_seconds.labels("append").time():
                result = await self._store.append(principal_of(request), request.session_id, request.role,
                                                  request.content, request.message_id)
        if result.created:
            self._metrics.sessions_created.inc()
        if not result.duplicate:
            self._metrics.messages_appended.labels(result.message.role).inc()
        return session_pb2.AppendResponse(session_id=result.session_id, message=to_proto(result.message),
                                          created=result.created, duplicate=result.duplicate)

    async def BuildContext(self, request: session_pb2.BuildContextRequest,
                           context: grpc.aio.ServicerContext) -> session_pb2.BuildContextResponse:
        async with grpc_errors(context):
            with self._metrics.operation_seconds.labels("build_context").time():
                meta, history = await self._store.messages(principal_of(request), request.session_id)
                counter = await self._counters.for_model(request.model)
                budget = request.max_tokens if request.max_tokens > 0 else self._settings.default_context_tokens
                built = build_context(history, request.system_prompt, budget, counter)
        self._metrics.context_tokens.labels(counter.name).observe(built.total_tokens)
        return session_pb2.BuildContextResponse(
            messages=[to_proto(m) for m in built.messages], total_tokens=built.total_tokens,
            truncated=built.truncated, user_message_count=meta.user_message_count)

    async def ListMessages(self, request: session_pb2.ListMessagesRequest,
                           context: grpc.aio.ServicerContext) -> session_pb2.ListMessagesResponse:
        async with grpc_errors(context):
            with self._metrics.operation_seconds.labels("list").time():
                _, history = await self._store.messages(principal_of(request), request.session_id)
        return session_pb2.ListMessagesResponse(session_id=request.session_id,
                                                messages=[to_proto(m) for m in history])

    async def DeleteSession(self, request: session_pb2.DeleteSessionRequest,
                            context: grpc.aio.ServicerContext) -> session_pb2.DeleteSessionResponse:
        async with grpc_errors(context):
            with self._metrics.operation_seconds.labels("delete").time():
                deleted = await self._store.delete(principal_of(request), request.session_id)
        return session_pb2.DeleteSessionResponse(deleted_messages=deleted)

    async def Watch(self, request: session_pb2.WatchRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[session_pb2.WatchResponse]:
        async with grpc_errors(context):
            messages = await self._store.watch(principal_of(request), request.session_id, request.after_seq)
        # Access is checked: this header tells the caller so before any message arrives.
        await context.send_initial_metadata(((WATCH_READY_HEADER, "on"),))
        try:
            async with grpc_errors(context):
                async for message in messages:
                    yield session_pb2.WatchResponse(message=to_proto(message))
        finally:
            await messages.aclose()


async def create_server(settings: SessionSettings, servicer: SessionServicer,
                        metrics: SessionMetrics) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """Build the server with health and reflection and bind it; do not start."""
    server = create_grpc_server(metrics.registry)
    session_pb2_grpc.add_SessionServiceServicer_to_server(servicer, server)
    health_servicer = await add_health_and_reflection(server, [SERVICE_NAME])
    port = bind(server, settings.host, settings.grpc_port)
    return server, health_servicer, port


async def serve(settings: SessionSettings) -> None:
    metrics = SessionMetrics()
    metrics_server = start_metrics_server(metrics.registry, settings.metrics_port, settings.host)
    counters = TokenCounters(settings.encoding)
    counters.preload()  # the default encoding; others load on their first model
    nc = await connect_nats(settings.nats_url, "kefu-session")
    expiry_watch: asyncio.Task[None] | None = None
    try:
        store = await SessionStore.open(
            nc, counters.default_counter, max_history=settings.max_history_messages,
            max_message_chars=settings.max_message_chars, ttl_s=settings.session_ttl_s,
            replicas=settings.nats_replicas)
        expiry_watch = asyncio.create_task(store.watch_expired(metrics.sessions_expired.inc))
        server, health_servicer, port = await create_server(
            settings, SessionServicer(settings, store, counters, metrics), metrics)
        await server.start()
        log.info("session service on %s:%d", settings.host, port)
        await wait_for_stop_signal()
        await stop_gracefully(server, health_servicer, settings.grace_s)
    finally:
        if expiry_watch is not None:
            expiry_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry_watch
        await close_nats(nc)
        metrics_server.close()
